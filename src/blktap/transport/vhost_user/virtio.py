"""virtio wire format: split virtqueues and virtio-blk (virtio 1.x, little-endian).

Declarations only; the logic is in :mod:`virtqueue` and :mod:`blk`.
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------------------- features
F_NOTIFY_ON_EMPTY = 24
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32

BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14

# ---------------------------------------------------------------------------- split ring
# descriptor: le64 addr, le32 len, le16 flags, le16 next
DESC = struct.Struct("<QIHH")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# avail ring: le16 flags, le16 idx, le16 ring[num], le16 used_event (with EVENT_IDX)
AVAIL_F_NO_INTERRUPT = 1
# used ring: le16 flags, le16 idx, {le32 id, le32 len} ring[num], le16 avail_event
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768


def avail_bytes(num: int) -> int:
    return 4 + 2 * num + 2


def used_bytes(num: int) -> int:
    return 4 + 8 * num + 2


# ---------------------------------------------------------------------------- virtio-blk
SECTOR = 512
# request header (device-readable): le32 type, le32 ioprio, le64 sector
OUTHDR = struct.Struct("<IIQ")
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14
# status byte (device-writable, the chain's last byte)
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
ID_BYTES = 20
# discard / write zeroes segment: le64 sector, le32 num_sectors, le32 flags
DISCARD_SEGMENT = struct.Struct("<QII")
WRITE_ZEROES_F_UNMAP = 1

# struct virtio_blk_config, up to write_zeroes_may_unmap and its padding (60 bytes):
#   le64 capacity @0; le32 size_max @8; le32 seg_max @12;
#   geometry {le16 cylinders @16; u8 heads @18; u8 sectors @19};
#   le32 blk_size @20;
#   topology {u8 physical_block_exp @24; u8 alignment_offset @25; le16 min_io_size @26;
#             le32 opt_io_size @28};
#   u8 writeback @32; u8 unused0 @33; le16 num_queues @34;
#   le32 max_discard_sectors @36; le32 max_discard_seg @40; le32 discard_sector_alignment @44;
#   le32 max_write_zeroes_sectors @48; le32 max_write_zeroes_seg @52;
#   u8 write_zeroes_may_unmap @56; u8 unused1[3] @57
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_WRITEBACK_OFFSET = 32
