"""vhost-user wire format: message header, request types, flags, payloads, feature bits.

Declarations only (QEMU's ``docs/interop/vhost-user.rst``). Every number on this socket is
in the host's byte order; we run on little-endian hosts only (the virtio rings are
little-endian too), so the structures below say ``<``.
"""

from __future__ import annotations

import enum
import struct

# ---------------------------------------------------------------------------- header
# u32 request, u32 flags, u32 size (of the payload that follows)
HEADER = struct.Struct("<III")

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# A payload larger than this is not read: the front-end is dropped. The largest we take
# is a memory table of 8 regions (8 + 8*32 bytes) or a config space (12 + 256 bytes).
MAX_PAYLOAD = 4096
# File descriptors one message may carry (a memory table of 8 regions).
MAX_FDS = 8


class Req(enum.IntEnum):
    """Front-end request types."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# ---------------------------------------------------------------------------- payloads
U64 = struct.Struct("<Q")
# vring state: u32 index, u32 num
VRING_STATE = struct.Struct("<II")
# vring address: u32 index, u32 flags, u64 descriptor, u64 used, u64 available, u64 log
VRING_ADDR = struct.Struct("<IIQQQQ")
VRING_F_LOG = 0x1
# SET_VRING_KICK/CALL/ERR: the u64 holds the ring index in bits 0-7; bit 8 says no fd.
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
# memory table: u32 number of regions, u32 padding, then up to 8 regions
MEM_TABLE_HEADER = struct.Struct("<II")
MAX_MEM_REGIONS = 8
# a region: u64 guest physical address, u64 size, u64 front-end user address, u64 mmap offset
MEM_REGION = struct.Struct("<QQQQ")
# ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")
# config space: u32 offset, u32 size, u32 flags, then size bytes
CONFIG_HEADER = struct.Struct("<III")
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1
MAX_CONFIG_SIZE = 256
# inflight description: u64 mmap size, u64 mmap offset, u16 queues, u16 queue size (QEMU's
# struct has 4 bytes of tail padding: 24 bytes on the wire)
INFLIGHT = struct.Struct("<QQHH4x")
INFLIGHT_MIN = 20

# Payload sizes each request must carry (exactly, or at least for the variable ones).
PAYLOAD_SIZE: dict[int, int] = {
    Req.SET_FEATURES: U64.size,
    Req.SET_PROTOCOL_FEATURES: U64.size,
    Req.SET_VRING_NUM: VRING_STATE.size,
    Req.SET_VRING_BASE: VRING_STATE.size,
    Req.GET_VRING_BASE: VRING_STATE.size,
    Req.SET_VRING_ENABLE: VRING_STATE.size,
    Req.SET_VRING_ADDR: VRING_ADDR.size,
    Req.SET_VRING_KICK: U64.size,
    Req.SET_VRING_CALL: U64.size,
    Req.SET_VRING_ERR: U64.size,
    Req.ADD_MEM_REG: SINGLE_MEM_REGION.size,
    Req.REM_MEM_REG: SINGLE_MEM_REGION.size,
}
PAYLOAD_MIN: dict[int, int] = {
    Req.SET_MEM_TABLE: MEM_TABLE_HEADER.size,
    Req.GET_CONFIG: CONFIG_HEADER.size,
    Req.SET_CONFIG: CONFIG_HEADER.size,
    Req.GET_INFLIGHT_FD: INFLIGHT_MIN,
    Req.SET_INFLIGHT_FD: INFLIGHT_MIN,
}


# ---------------------------------------------------------------------------- features
# vhost-user's own bit in the virtio feature word: protocol features are negotiated.
F_PROTOCOL_FEATURES = 30


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def bit(n: int) -> int:
    return 1 << n
