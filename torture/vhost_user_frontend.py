"""A vhost-user front-end for virtio-blk: the part QEMU plays, written for the tests.

It is an independent reading of two specs, with its own struct layouts: QEMU's
docs/interop/vhost-user.rst (the messages on the UNIX socket, memory regions passed as fds,
eventfds for kick and call) and virtio 1.1 (split virtqueues, virtio-blk requests). It was
proved first against qemu-storage-daemon's vhost-user-blk export (tests/test_vhost_user.py
runs every test against qsd too), so that a test failing against our backend accuses the
backend, not this file.

Layers, from the bottom:
- ``Frontend``: one connection; every message of the protocol as a method, and ``send_raw``
  for messages that break its rules (truncated, oversized, unknown, fds missing);
- ``GuestMemory``: a memfd as "guest RAM", cut into two regions whose guest-physical and
  front-end-virtual addresses differ (so a backend that confuses them reads the wrong bytes);
- ``SplitQueue``: a descriptor table, avail ring and used ring laid out in that memory, with
  indirect tables and EVENT_IDX, plus raw descriptor writes for crafting bad chains;
- ``BlkClient``: the usual setup sequence and virtio-blk requests (read, write, flush,
  GET_ID, discard, write zeroes).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

# ------------------------------------------------------------------------------ constants


class Req(IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""
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
    SET_BACKEND_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


# header flags: bits 0-1 the version (1), bit 2 "this is a reply", bit 3 "ack this message"
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER = struct.Struct("<III")          # request, flags, payload size

# protocol features (GET/SET_PROTOCOL_FEATURES bits)
PF_MQ = 0
PF_LOG_SHMFD = 1
PF_REPLY_ACK = 3
PF_BACKEND_REQ = 5
PF_CONFIG = 9
PF_INFLIGHT_SHMFD = 12
PF_CONFIGURE_MEM_SLOTS = 15

# virtio feature bits: device (virtio-blk), ring, transport-independent
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
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30    # VHOST_USER_F_PROTOCOL_FEATURES, in GET/SET_FEATURES
F_VERSION_1 = 32

# the features this front-end knows how to drive
KNOWN_FEATURES = sum(1 << b for b in (
    BLK_F_SIZE_MAX, BLK_F_SEG_MAX, BLK_F_GEOMETRY, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH,
    BLK_F_TOPOLOGY, BLK_F_CONFIG_WCE, BLK_F_MQ, BLK_F_DISCARD, BLK_F_WRITE_ZEROES,
    F_INDIRECT_DESC, F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1))
KNOWN_PROTOCOL = (1 << PF_MQ) | (1 << PF_REPLY_ACK) | (1 << PF_CONFIG)
# CONFIGURE_MEM_SLOTS is known too, but asked for only by tests of ADD/REM_MEM_REG

# split virtqueue descriptor flags, and the ring flags
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")            # addr, len, flags, next
USED_ELEM = struct.Struct("<II")         # id, len

# virtio-blk request types and status values
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
OUTHDR = struct.Struct("<IIQ")           # type, ioprio, sector
SEGMENT = struct.Struct("<QII")          # sector, num_sectors, flags (discard / write zeroes)
WZ_F_UNMAP = 1
ID_BYTES = 20
SECTOR = 512

# struct virtio_blk_config, field by field (offsets in the comments)
CONFIG_FIELDS = (
    ("capacity", "Q"),                    # 0
    ("size_max", "I"),                    # 8
    ("seg_max", "I"),                     # 12
    ("cylinders", "H"),                   # 16
    ("heads", "B"),                       # 18
    ("sectors", "B"),                     # 19
    ("blk_size", "I"),                    # 20
    ("physical_block_exp", "B"),          # 24
    ("alignment_offset", "B"),            # 25
    ("min_io_size", "H"),                 # 26
    ("opt_io_size", "I"),                 # 28
    ("writeback", "B"),                   # 32
    ("unused0", "B"),                     # 33
    ("num_queues", "H"),                  # 34
    ("max_discard_sectors", "I"),         # 36
    ("max_discard_seg", "I"),             # 40
    ("discard_sector_alignment", "I"),    # 44
    ("max_write_zeroes_sectors", "I"),    # 48
    ("max_write_zeroes_seg", "I"),        # 52
    ("write_zeroes_may_unmap", "B"),      # 56
    ("unused1", "3s"),                    # 57
)
CONFIG = struct.Struct("<" + "".join(f for _, f in CONFIG_FIELDS))
assert CONFIG.size == 60


class Dropped(ConnectionError):
    """The back-end closed the connection."""


class Nack(OSError):
    """A REPLY_ACK came back non-zero."""


class BlkError(OSError):
    """A virtio-blk request completed with a status other than OK."""

    def __init__(self, status: int, what: str = "") -> None:
        super().__init__(f"virtio-blk status {status} {what}".strip())
        self.status = status


def parse_config(data: bytes) -> dict[str, int | bytes]:
    padded = data.ljust(CONFIG.size, b"\0")[:CONFIG.size]
    return dict(zip((n for n, _ in CONFIG_FIELDS), CONFIG.unpack(padded), strict=True))


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.1 2.6.7.2: notify when event_idx lies in [old_idx, new_idx) mod 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# ------------------------------------------------------------------------------ the socket


class Frontend:
    """One vhost-user connection, blocking, with a timeout on every read."""

    def __init__(self, path: str | os.PathLike, timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.reply_ack = False          # set once REPLY_ACK is negotiated

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw bytes

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, with fds (SCM_RIGHTS) on the first byte."""
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Dropped(f"back-end gone while sending: {e}") from e

    def send(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = VERSION,
             size: int | None = None) -> None:
        """A message; ``size`` overrides the header's payload size (to lie about it)."""
        size = len(payload) if size is None else size
        self.send_raw(HEADER.pack(req, flags, size) + payload, fds)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError as e:
                raise Dropped(str(e)) from e
            if not chunk:
                raise Dropped(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_reply(self, req: int) -> bytes:
        rreq, flags, size = HEADER.unpack(self.recv_exact(HEADER.size))
        return self._reply_payload(req, rreq, flags, size)

    def recv_reply_fds(self, req: int) -> tuple[bytes, list[int]]:
        """A reply that carries fds (they come with its first bytes)."""
        try:
            head, fds, _, _ = socket.recv_fds(self.sock, HEADER.size, 8)
        except ConnectionResetError as e:
            raise Dropped(str(e)) from e
        if not head:
            raise Dropped("EOF instead of a reply")
        head += self.recv_exact(HEADER.size - len(head))
        return self._reply_payload(req, *HEADER.unpack(head)), fds

    def _reply_payload(self, req: int, rreq: int, flags: int, size: int) -> bytes:
        if rreq != req or not flags & FLAG_REPLY or flags & 0x3 != VERSION:
            raise AssertionError(f"bad reply header: request {rreq} flags {flags:#x} "
                                 f"size {size} (expected a reply to {req})")
        if size > 4096:
            raise AssertionError(f"reply to {req} of {size} bytes")
        return self.recv_exact(size)

    def call(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), reply: bool = False,
             ack: bool | None = None) -> bytes:
        """Send a message and read its reply (``reply``) or its REPLY_ACK (``ack``, by
        default whenever REPLY_ACK was negotiated and the message has no reply of its own).
        A non-zero ack raises Nack."""
        if ack is None:
            ack = self.reply_ack and not reply
        self.send(req, payload, fds, VERSION | (FLAG_NEED_REPLY if ack else 0))
        if reply:
            return self.recv_reply(req)
        if ack:
            data = self.recv_reply(req)
            if len(data) != 8:
                raise AssertionError(f"REPLY_ACK of {len(data)} bytes")
            (value,) = struct.unpack("<Q", data)
            if value:
                raise Nack(f"back-end refused message {req} (ack {value})")
        return b""

    def eof(self, timeout: float = 0.0) -> bool:
        """True when the back-end has closed the connection (waits up to ``timeout``)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except (ConnectionResetError, BlockingIOError):
            return True
        return data == b""

    def probe(self) -> str:
        """After a bad message: "dropped" if the back-end hung up, "alive" if it still answers
        GET_FEATURES."""
        try:
            self.get_features()
        except (Dropped, TimeoutError, OSError):
            return "dropped"
        return "alive"

    # -- the messages

    def get_u64(self, req: int) -> int:
        data = self.call(req, reply=True)
        if len(data) != 8:
            raise AssertionError(f"reply to {req} of {len(data)} bytes, not 8")
        return struct.unpack("<Q", data)[0]

    def get_features(self) -> int:
        return self.get_u64(Req.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(Req.SET_FEATURES, struct.pack("<Q", features))

    def get_protocol_features(self) -> int:
        return self.get_u64(Req.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        # no ack: REPLY_ACK is only in force once this message has been handled
        self.call(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", features), ack=False)
        self.reply_ack = bool(features & (1 << PF_REPLY_ACK))

    def set_owner(self) -> None:
        self.call(Req.SET_OWNER)

    def get_queue_num(self) -> int:
        return self.get_u64(Req.GET_QUEUE_NUM)

    def get_config(self, size: int = CONFIG.size, offset: int = 0) -> bytes:
        data = self.call(Req.GET_CONFIG, struct.pack("<III", offset, size, 0) + bytes(size),
                         reply=True)
        roff, rsize, _ = struct.unpack_from("<III", data)
        if (roff, rsize) != (offset, size) or len(data) != 12 + size:
            raise AssertionError(f"GET_CONFIG reply offset {roff} size {rsize} "
                                 f"({len(data)} bytes) for offset {offset} size {size}")
        return data[12:]

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """Write config space bytes (flags 0: by the driver; 1: a migration restoring it)."""
        self.call(Req.SET_CONFIG, struct.pack("<III", offset, len(data), flags) + data)

    def set_mem_table(self, mem: GuestMemory, fds: Sequence[int] | None = None) -> None:
        payload = struct.pack("<II", len(mem.regions), 0) + b"".join(
            struct.pack("<QQQQ", r.gpa, r.size, r.uva, r.offset) for r in mem.regions)
        self.call(Req.SET_MEM_TABLE, payload,
                  [mem.fd] * len(mem.regions) if fds is None else fds)

    def get_max_mem_slots(self) -> int:
        return self.get_u64(Req.GET_MAX_MEM_SLOTS)

    def add_mem_reg(self, region: Region, fd: int | None) -> None:
        """One region (CONFIGURE_MEM_SLOTS): a u64 of padding, then the region."""
        self.call(Req.ADD_MEM_REG, struct.pack("<QQQQQ", 0, region.gpa, region.size,
                                               region.uva, region.offset),
                  [] if fd is None else [fd])

    def rem_mem_reg(self, region: Region) -> None:
        self.call(Req.REM_MEM_REG, struct.pack("<QQQQQ", 0, region.gpa, region.size,
                                               region.uva, region.offset))

    INFLIGHT = struct.Struct("<QQHH4x")   # mmap size, mmap offset, queues, queue size

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int]:
        """INFLIGHT_SHMFD: the back-end's region for requests in flight; returns (fd,
        mmap size, mmap offset). The front-end keeps it across back-end restarts."""
        self.send(Req.GET_INFLIGHT_FD, self.INFLIGHT.pack(0, 0, num_queues, queue_size))
        data, fds = self.recv_reply_fds(Req.GET_INFLIGHT_FD)
        size, offset, _, _ = self.INFLIGHT.unpack(data)
        if len(fds) != 1:
            raise AssertionError(f"GET_INFLIGHT_FD reply with {len(fds)} fds")
        return fds[0], size, offset

    def set_inflight_fd(self, fd: int, size: int, offset: int, num_queues: int,
                        queue_size: int) -> None:
        self.call(Req.SET_INFLIGHT_FD, self.INFLIGHT.pack(size, offset, num_queues, queue_size),
                  [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        self.call(Req.SET_VRING_NUM, struct.pack("<II", index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(Req.SET_VRING_BASE, struct.pack("<II", index, base))

    def get_vring_base(self, index: int) -> int:
        data = self.call(Req.GET_VRING_BASE, struct.pack("<II", index, 0), reply=True)
        rindex, num = struct.unpack("<II", data)
        if rindex != index:
            raise AssertionError(f"GET_VRING_BASE reply for ring {rindex}, not {index}")
        return num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0,
                       log: int = 0) -> None:
        """Ring addresses are front-end virtual addresses (the ``uva`` of a region)."""
        self.call(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, flags, desc, used, avail, log))

    def _vring_fd(self, req: int, index: int, fd: int | None) -> None:
        payload = struct.pack("<Q", index | (0x100 if fd is None else 0))
        self.call(req, payload, [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Req.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Req.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Req.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(Req.SET_VRING_ENABLE, struct.pack("<II", index, int(enable)))


# ------------------------------------------------------------------------------ guest RAM


@dataclass
class Region:
    gpa: int        # guest-physical address (what descriptors hold)
    size: int
    uva: int        # the front-end's virtual address (what SET_VRING_ADDR holds)
    offset: int     # offset in the memfd


@dataclass
class Buf:
    """A piece of guest memory."""
    mem: GuestMemory
    offset: int     # in the memfd
    size: int

    @property
    def gpa(self) -> int:
        return self.mem.gpa(self.offset)

    @property
    def uva(self) -> int:
        return self.mem.uva(self.offset)

    def read(self, n: int | None = None, at: int = 0) -> bytes:
        n = self.size - at if n is None else n
        return bytes(self.mem.map[self.offset + at:self.offset + at + n])

    def write(self, data: bytes, at: int = 0) -> None:
        self.mem.map[self.offset + at:self.offset + at + len(data)] = data


class GuestMemory:
    """A memfd mapped here and offered to the back-end as two regions. Region 0 is at
    guest-physical 0, region 1 at 4 GiB; their front-end virtual addresses are unrelated
    to either, as in QEMU."""

    GPA_BASES = (0x0, 0x1_0000_0000)
    UVA_BASES = (0x7F12_3400_0000, 0x7F56_7800_0000)

    def __init__(self, size: int = 64 << 20, nregions: int = 2,
                 gpa_bases: Sequence[int] = GPA_BASES,
                 uva_bases: Sequence[int] = UVA_BASES) -> None:
        self.size = size
        self.fd = os.memfd_create("vhost-user-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        part = size // nregions
        self.regions = [Region(gpa_bases[i], part, uva_bases[i], i * part)
                        for i in range(nregions)]
        self._next = [r.offset for r in self.regions]    # bump allocator, per region

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def _region(self, offset: int) -> Region:
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r
        raise ValueError(f"offset {offset:#x} outside guest memory")

    def gpa(self, offset: int) -> int:
        r = self._region(offset)
        return r.gpa + offset - r.offset

    def uva(self, offset: int) -> int:
        r = self._region(offset)
        return r.uva + offset - r.offset

    def alloc(self, size: int, align: int = 64, region: int | None = None) -> Buf:
        """Zeroed memory that does not cross a region boundary (the last region first, so
        that most data lives away from guest-physical 0)."""
        order = [region] if region is not None else reversed(range(len(self.regions)))
        for i in order:
            r = self.regions[i]
            start = -(-self._next[i] // align) * align
            if start + size <= r.offset + r.size:
                self._next[i] = start + size
                self.map[start:start + size] = bytes(size)
                return Buf(self, start, size)
        raise MemoryError(f"guest memory full ({size} bytes asked)")

    @contextmanager
    def scratch(self) -> Iterator[None]:
        """Whatever is allocated inside the block is freed at its end."""
        saved = list(self._next)
        try:
            yield
        finally:
            self._next = saved

    def hole_gpa(self) -> int:
        """A guest-physical address in no region."""
        return 0x2_0000_0000 + 0x1000


# ------------------------------------------------------------------------------ a split ring


@dataclass
class Used:
    head: int
    length: int


class SplitQueue:
    """A split virtqueue in guest memory (virtio 1.1 2.6): the descriptor table (16-byte
    aligned), the available ring (2) and the used ring (4)."""

    def __init__(self, mem: GuestMemory, index: int, size: int = 128) -> None:
        if size & (size - 1):
            raise ValueError("queue size must be a power of 2")
        self.mem = mem
        self.index = index
        self.size = size
        self.desc = mem.alloc(DESC.size * size, align=16)
        self.avail = mem.alloc(4 + 2 * size + 2, align=2)
        self.used = mem.alloc(4 + USED_ELEM.size * size + 2, align=4)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.event_idx = False
        self.kicks = 0
        self.calls = 0
        self.chain_of: dict[int, list[int]] = {}      # head -> descriptor indexes it holds

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)

    # -- ring fields

    def used_idx(self) -> int:
        return struct.unpack("<H", self.used.read(2, 2))[0]

    def used_flags(self) -> int:
        return struct.unpack("<H", self.used.read(2, 0))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.used.read(2, 4 + USED_ELEM.size * self.size))[0]

    def set_used_event(self, value: int) -> None:
        self.avail.write(struct.pack("<H", value & 0xFFFF), 4 + 2 * self.size)

    def used_elem(self, slot: int) -> Used:
        head, length = USED_ELEM.unpack(self.used.read(8, 4 + 8 * (slot % self.size)))
        return Used(head, length)

    # -- descriptors

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                   table: Buf | None = None) -> None:
        """Raw write of descriptor ``i`` of the ring (or of an indirect ``table``)."""
        (table or self.desc).write(DESC.pack(addr, length, flags, next_), DESC.size * i)

    def take(self, n: int) -> list[int]:
        if len(self.free) < n:
            raise RuntimeError(f"ring {self.index}: {n} descriptors asked, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def add_chain(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Put a chain of (gpa, length, device-writable) buffers in the table; returns its
        head. With ``indirect`` the chain goes into an indirect table that one ring
        descriptor points to."""
        if indirect:
            table = self.mem.alloc(DESC.size * len(bufs), align=16)
            for k, (addr, length, writable) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.write_desc(k, addr, length, (0 if last else DESC_F_NEXT)
                                | (DESC_F_WRITE if writable else 0), 0 if last else k + 1,
                                table=table)
            (head,) = self.take(1)
            self.write_desc(head, table.gpa, table.size, DESC_F_INDIRECT)
            self.chain_of[head] = [head]
            return head
        idx = self.take(len(bufs))
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(idx[k], addr, length, (0 if last else DESC_F_NEXT)
                            | (DESC_F_WRITE if writable else 0), 0 if last else idx[k + 1])
        self.chain_of[idx[0]] = idx
        return idx[0]

    # -- driver side of the protocol

    def publish(self, heads: Iterable[int], kick: bool = True) -> None:
        """Make chains available, then kick if the device asked for it."""
        old = self.avail_idx
        for head in heads:
            self.avail.write(struct.pack("<H", head), 4 + 2 * (self.avail_idx % self.size))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        # the ring entries are stored before the index (x86 keeps stores in order)
        self.avail.write(struct.pack("<H", self.avail_idx), 2)
        if not kick:
            return
        if self.event_idx:
            wanted = need_event(self.avail_event(), self.avail_idx, old)
        else:
            wanted = not self.used_flags() & 1      # VIRTQ_USED_F_NO_NOTIFY
        if wanted:
            self.kick()

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def reap(self) -> list[Used]:
        """Take whatever the device has put in the used ring, freeing the descriptors."""
        out = []
        while (end := self.used_idx()) != self.last_used:
            while self.last_used != end:
                elem = self.used_elem(self.last_used)
                if elem.head not in self.chain_of:
                    raise AssertionError(f"ring {self.index}: used entry for head "
                                         f"{elem.head}, which is not in flight")
                self.free.extend(self.chain_of.pop(elem.head))
                out.append(elem)
                self.last_used = (self.last_used + 1) & 0xFFFF
            if self.event_idx:
                # the device may have added entries while it still saw the old used_event
                # (and so did not signal): look again after moving it, as Linux does
                self.set_used_event(self.last_used)
        return out

    def wait(self, count: int, frontend: Frontend | None = None, timeout: float = 10.0,
             require_call: bool = True) -> list[Used]:
        """Wait for ``count`` completions, woken by the call eventfd. A device that fills the
        used ring without signalling fails with ``require_call``; a back-end that hangs up
        (seen on ``frontend``'s socket) raises Dropped."""
        got: list[Used] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            fds = [self.call_fd] + ([frontend.sock] if frontend else [])
            r, _, _ = select.select(fds, [], [], max(left, 0) if require_call else
                                    min(max(left, 0), 0.05))
            if not r and not require_call and time.monotonic() < deadline:
                got += self.reap()      # polling: whatever came without a signal
                continue
            if self.call_fd in r:
                os.eventfd_read(self.call_fd)
                self.calls += 1
                got += self.reap()
                continue
            if frontend and frontend.sock in r:
                if frontend.eof():
                    raise Dropped(f"back-end hung up with {count - len(got)} requests in "
                                  "flight")
                raise AssertionError("the back-end sent a message nobody asked for: "
                                     f"{frontend.sock.recv(64, socket.MSG_PEEK)!r}")
            if not r:
                late = self.reap()
                if late and require_call:
                    raise AssertionError(f"ring {self.index}: {len(late)} completions without "
                                         "a call notification")
                got += late
                if len(got) < count:
                    raise TimeoutError(f"ring {self.index}: {len(got)} of {count} requests "
                                       f"completed in {timeout} s")
        return got


# ------------------------------------------------------------------------------ virtio-blk


@dataclass
class Request:
    queue: SplitQueue
    head: int
    header: Buf
    data: list[Buf]
    status: Buf
    in_bytes: int                       # device-writable bytes (data in + status)
    used: Used | None = None
    result: bytes = b""                 # the data in, copied out once completed

    @property
    def status_byte(self) -> int:
        return self.status.read(1)[0]

    def payload(self) -> bytes:
        return b"".join(b.read() for b in self.data)


@dataclass
class BlkClient:
    """A virtio-blk driver on a vhost-user connection.

    ``connect()`` runs the sequence QEMU runs (features, protocol features, queue count,
    owner, config, memory table, the rings, enable); each step is a method of its own so
    that a test can run them in other orders or leave some out."""

    path: str | os.PathLike
    num_queues: int = 1
    queue_size: int = 128
    want: int = KNOWN_FEATURES              # features to accept (masked by the offer)
    want_protocol: int = KNOWN_PROTOCOL
    mem_size: int = 64 << 20
    timeout: float = 10.0
    config_size: int = CONFIG.size
    fe: Frontend = field(init=False)
    mem: GuestMemory = field(init=False)
    queues: list[SplitQueue] = field(init=False, default_factory=list)
    offered: int = 0
    features: int = 0
    protocol: int = 0
    config: dict = field(init=False, default_factory=dict)
    closed: bool = False
    crafted_status: list[Buf] = field(init=False, default_factory=list)   # for hand-made chains

    def __post_init__(self) -> None:
        self.fe = Frontend(self.path, self.timeout)
        self.mem = GuestMemory(self.mem_size)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fe.close()
        for q in self.queues:
            q.close()
        self.mem.close()

    def __enter__(self) -> BlkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup

    def negotiate(self) -> None:
        fe = self.fe
        self.offered = fe.get_features()
        if not self.offered & (1 << F_PROTOCOL_FEATURES):
            raise AssertionError(f"back-end offers no protocol features ({self.offered:#x})")
        offered_protocol = fe.get_protocol_features()
        self.protocol = offered_protocol & self.want_protocol
        fe.set_protocol_features(self.protocol)
        if self.protocol & (1 << PF_MQ):
            nq = fe.get_queue_num()
            if nq < self.num_queues:
                raise AssertionError(f"back-end has {nq} queues, {self.num_queues} wanted")
        fe.set_owner()
        if self.protocol & (1 << PF_CONFIG):
            self.config = parse_config(fe.get_config(self.config_size))
        self.features = self.offered & self.want
        fe.set_features(self.features)

    def setup_memory(self) -> None:
        """The memory table, or one ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS was
        negotiated (as QEMU does then)."""
        if self.protocol & (1 << PF_CONFIGURE_MEM_SLOTS):
            slots = self.fe.get_max_mem_slots()
            if slots < len(self.mem.regions):
                raise AssertionError(f"back-end has {slots} memory slots")
            for r in self.mem.regions:
                self.fe.add_mem_reg(r, self.mem.fd)
        else:
            self.fe.set_mem_table(self.mem)

    def new_queues(self) -> None:
        """Fresh rings in fresh memory (what a driver reset does)."""
        for q in self.queues:
            q.close()
        self.queues = [SplitQueue(self.mem, i, self.queue_size) for i in range(self.num_queues)]
        for q in self.queues:
            q.event_idx = bool(self.features & (1 << F_EVENT_IDX))

    def start_queue(self, q: SplitQueue, base: int = 0) -> None:
        fe = self.fe
        fe.set_vring_num(q.index, q.size)
        fe.set_vring_base(q.index, base)
        fe.set_vring_addr(q.index, q.desc.uva, q.used.uva, q.avail.uva)
        fe.set_vring_call(q.index, q.call_fd)
        fe.set_vring_kick(q.index, q.kick_fd)
        if self.features & (1 << F_PROTOCOL_FEATURES):
            fe.set_vring_enable(q.index, True)
        q.kick()    # for back-ends that wait for a first kick (vhost-user.rst: SHOULD inject)

    def stop_queue(self, q: SplitQueue) -> int:
        """SET_VRING_ENABLE 0 then GET_VRING_BASE, as QEMU stops a ring; returns the base."""
        if self.features & (1 << F_PROTOCOL_FEATURES):
            self.fe.set_vring_enable(q.index, False)
        return self.fe.get_vring_base(q.index)

    def connect(self) -> BlkClient:
        self.negotiate()
        self.setup_memory()
        self.new_queues()
        for q in self.queues:
            self.start_queue(q)
        return self

    # -- requests

    def has(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def build(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, q: int = 0,
              segments: int = 1, indirect: bool = False, split_header: bool = False,
              ioprio: int = 0, odd_cuts: bool = False) -> Request:
        """A request in guest memory, data in or out cut into ``segments`` buffers; not yet
        published."""
        queue = self.queues[q]
        header = self.mem.alloc(OUTHDR.size)
        header.write(OUTHDR.pack(rtype, ioprio, sector))
        bufs: list[tuple[int, int, bool]] = []
        if split_header:    # the 16-byte header over two descriptors, as drivers may do
            bufs += [(header.gpa, 8, False), (header.gpa + 8, 8, False)]
        else:
            bufs.append((header.gpa, OUTHDR.size, False))
        data: list[Buf] = []
        total = len(out) if out else in_len
        if total:
            # buffers of whole sectors, as Linux makes them, unless ``odd_cuts``: the spec
            # asks only the total to be whole sectors
            unit = 1 if odd_cuts or total % SECTOR else SECTOR
            cuts = [total // unit * k // segments * unit for k in range(segments)] + [total]
            for a, b in zip(cuts, cuts[1:], strict=False):
                if a == b:
                    continue
                buf = self.mem.alloc(b - a, align=1 if odd_cuts else SECTOR)
                if out:
                    buf.write(out[a:b])
                data.append(buf)
                bufs.append((buf.gpa, buf.size, not out))
        status = self.mem.alloc(1)
        status.write(b"\xff")       # anything but a valid status, to see it written
        bufs.append((status.gpa, 1, True))
        head = queue.add_chain(bufs, indirect=indirect)
        return Request(queue, head, header, data, status, (0 if out else total) + 1)

    def run(self, reqs: Sequence[Request]) -> list[Request]:
        """Publish requests (per ring, in one batch) and wait for all of them."""
        by_queue: dict[int, list[Request]] = {}
        for r in reqs:
            by_queue.setdefault(r.queue.index, []).append(r)
        for qi, rs in by_queue.items():
            self.queues[qi].publish([r.head for r in rs])
        for qi, rs in by_queue.items():
            done = {u.head: u for u in self.queues[qi].wait(len(rs), self.fe, self.timeout)}
            for r in rs:
                if r.head not in done:
                    raise AssertionError(f"head {r.head} not completed (got {sorted(done)})")
                r.used = done[r.head]
        return list(reqs)

    def do(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
           **kw: object) -> Request:
        """One request, run, its memory freed after; raises BlkError unless status OK."""
        with self.mem.scratch():
            (r,) = self.run([self.build(rtype, sector, out, in_len, **kw)])  # type: ignore[arg-type]
            r.result = r.payload()
        if r.status_byte != S_OK:
            raise BlkError(r.status_byte, f"type {rtype} sector {sector}")
        return r

    def read(self, sector: int, length: int, **kw: object) -> bytes:
        r = self.do(T_IN, sector, in_len=length, **kw)
        assert r.used is not None and r.used.length == length + 1, \
            f"used len {r.used.length if r.used else None} for a {length}-byte read"
        return r.result

    def write(self, sector: int, data: bytes, **kw: object) -> None:
        self.do(T_OUT, sector, out=data, **kw)

    def flush(self, **kw: object) -> None:
        self.do(T_FLUSH, **kw)

    def get_id(self, **kw: object) -> bytes:
        r = self.do(T_GET_ID, in_len=ID_BYTES, **kw)
        return r.result

    def discard(self, ranges: Sequence[tuple[int, int]], **kw: object) -> None:
        self.do(T_DISCARD, out=b"".join(SEGMENT.pack(s, n, 0) for s, n in ranges), **kw)

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: bool = False,
                     **kw: object) -> None:
        flags = WZ_F_UNMAP if unmap else 0
        self.do(T_WRITE_ZEROES, out=b"".join(SEGMENT.pack(s, n, flags) for s, n in ranges),
                **kw)
