"""A test front-end for the vhost-user-blk back-end: guest RAM in a memfd, split rings we
write ourselves, vhost-user messages from our own struct layouts (not the back-end's).

The back-end runs in a thread with its own event loop, so the tests talk to it with
plain blocking sockets and look at guest memory directly.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
DESC = struct.Struct("<QIHH")
OUTHDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")

# requests
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE = 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38
NEED_REPLY = 0x8
REPLY = 0x4

# feature bits
VERSION_1, PROTOCOL_FEATURES, INDIRECT, EVENT_IDX = 32, 30, 28, 29
P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT = 0, 3, 9, 12
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

MiB = 1 << 20
GPA = 0x4000_0000
UVA = 0x7F12_0000_0000
RAM = 16 * MiB


class Guest:
    """Guest RAM: one memfd, one region; a bump allocator for buffers."""

    def __init__(self, size: int = RAM) -> None:
        self.size = size
        self.fd = os.memfd_create("test-guest")
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
        self.next = 1 * MiB  # below: rings

    def alloc(self, n: int, align: int = 512) -> int:
        off = -(-self.next // align) * align
        self.next = off + n
        assert self.next <= self.size, "test guest out of memory"
        return off

    def gpa(self, off: int) -> int:
        return GPA + off

    def write(self, off: int, data: bytes) -> None:
        self.mem[off : off + len(data)] = data

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.mem[off : off + n])

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class Ring:
    """A split ring in guest RAM, as a driver fills it."""

    def __init__(self, guest: Guest, index: int, num: int = 16) -> None:
        self.g = guest
        self.index = index
        self.num = num
        base = index * 0x10000
        self.desc_off = base
        self.avail_off = base + 16 * num
        self.used_off = base + 0x8000
        guest.mem[base : base + 0x10000] = bytes(0x10000)  # a driver starts from zeros
        self.avail_idx = 0
        self.next_desc = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    # driver-side writes
    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        DESC.pack_into(self.g.mem, self.desc_off + 16 * i, addr, length, flags, nxt)

    def chain(self, bufs: list[tuple[int, int, int]], *, indirect: bool = False) -> int:
        """Descriptors for (guest offset, length, flags) buffers; returns the head."""
        if indirect:
            table = self.g.alloc(16 * len(bufs), 16)
            for i, (off, n, fl) in enumerate(bufs):
                last = i == len(bufs) - 1
                DESC.pack_into(self.g.mem, table, self.g.gpa(off), n,
                               fl | (0 if last else F_NEXT), 0 if last else i + 1)
                table += 16
            head = self._take(1)[0]
            self.desc(head, self.g.gpa(table - 16 * len(bufs)), 16 * len(bufs), F_INDIRECT)
            return head
        ids = self._take(len(bufs))
        for k, (off, n, fl) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(ids[k], self.g.gpa(off), n, fl | (0 if last else F_NEXT),
                      0 if last else ids[k + 1])
        return ids[0]

    def _take(self, n: int) -> list[int]:
        out = [(self.next_desc + i) % self.num for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.num
        return out

    def publish(self, *heads: int, kick: bool = True) -> None:
        m = self.g.mem
        for h in heads:
            struct.pack_into("<H", m, self.avail_off + 4 + 2 * (self.avail_idx % self.num), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", m, self.avail_off + 2, self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.g.mem, self.avail_off, flags)

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.g.mem, self.avail_off + 4 + 2 * self.num, value)

    # device-side results
    @property
    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.g.mem, self.used_off + 2)[0]

    @property
    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.g.mem, self.used_off + 4 + 8 * self.num)[0]

    def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[tuple[int, int]]:
        """The next ``count`` used entries (id, len), waiting for them."""
        deadline = time.monotonic() + timeout
        while (self.used_idx - self.used_seen) & 0xFFFF < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"used idx {self.used_idx}, waiting for "
                                   f"{self.used_seen + count}")
            time.sleep(0.002)
        out = []
        for _ in range(count):
            slot = self.used_seen % self.num
            out.append(struct.unpack_from("<II", self.g.mem, self.used_off + 4 + 8 * slot))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def called(self, timeout: float = 0.0) -> bool:
        """Whether the device signalled the call eventfd (and clear it)."""
        r, _, _ = select.select([self.call], [], [], timeout)
        if not r:
            return False
        os.eventfd_read(self.call)
        return True

    def close(self) -> None:
        for fd in (self.kick, self.call):
            try:
                os.close(fd)
            except OSError:
                pass


class Front:
    """The front-end's end of the vhost-user socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(10)

    def send(self, req: int, payload: bytes = b"", fds: list[int] | tuple = (),
             flags: int = 0x1) -> None:
        data = HDR.pack(req, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self) -> tuple[int, int, bytes]:
        req, flags, size = HDR.unpack(self._exact(HDR.size))
        return req, flags, self._exact(size)

    def recv_with_fds(self) -> tuple[int, bytes, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.sock, HDR.size, 4)
        req, flags, size = HDR.unpack(data)
        return req, self._exact(size), fds

    def call(self, req: int, payload: bytes = b"") -> bytes:
        self.send(req, payload)
        r, flags, body = self.recv()
        assert r == req and flags & REPLY, (r, flags)
        return body

    def ack(self, req: int, payload: bytes = b"", fds: list[int] | tuple = ()) -> int:
        """Send with NEED_REPLY and return the u64 ack (0 = done)."""
        self.send(req, payload, fds, flags=0x1 | NEED_REPLY)
        r, flags, body = self.recv()
        assert r == req and flags & REPLY, (r, flags)
        return U64.unpack(body)[0]

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False
        finally:
            self.sock.settimeout(10)

    # the usual sequence
    def negotiate(self, features: int | None = None,
                  protocol: int = (1 << P_REPLY_ACK) | (1 << P_CONFIG) | (1 << P_MQ)) -> int:
        offered = U64.unpack(self.call(GET_FEATURES))[0]
        pf = U64.unpack(self.call(GET_PROTOCOL_FEATURES))[0]
        self.send(SET_PROTOCOL_FEATURES, U64.pack(protocol & pf))
        self.send(SET_OWNER)
        want = offered if features is None else features
        assert self.ack(SET_FEATURES, U64.pack(want)) == 0
        return offered

    def mem_table(self, guest: Guest) -> None:
        payload = struct.pack("<II", 1, 0) + REGION.pack(GPA, guest.size, UVA, 0)
        assert self.ack(SET_MEM_TABLE, payload, [guest.fd]) == 0

    def ring(self, ring: Ring, *, base: int = 0, enable: bool = True) -> None:
        i = ring.index
        self.send(SET_VRING_NUM, STATE.pack(i, ring.num))
        self.send(SET_VRING_BASE, STATE.pack(i, base))
        self.send(SET_VRING_ADDR, ADDR.pack(i, 0, UVA + ring.desc_off, UVA + ring.used_off,
                                            UVA + ring.avail_off, 0))
        self.send(SET_VRING_CALL, U64.pack(i), [ring.call])
        self.send(SET_VRING_KICK, U64.pack(i), [ring.kick])
        assert self.ack(SET_VRING_ENABLE, STATE.pack(i, 1 if enable else 0)) == 0


class Backend:
    """Sessions of the back-end over socketpairs, on an event loop in a thread."""

    def __init__(self, image: Path, *, count: int = 1, num_queues: int = 1,
                 read_only: bool = False, serial: str = "test-serial") -> None:
        self.image = image
        self.num_queues = num_queues
        self.read_only = read_only
        self.serial = serial
        pairs = [socket.socketpair() for _ in range(count)]
        self.fronts = [Front(a) for a, _ in pairs]
        self._backs = [b for _, b in pairs]
        self.sessions: list = []
        self.vbd = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "back-end did not start"
        if self.error:
            raise self.error

    @property
    def front(self) -> Front:
        return self.fronts[0]

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by close()
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        from blktap.io import ThreadEngine
        from blktap.tapdisk.drivers import open_stack
        from blktap.tapdisk.vbd import VBD
        from blktap.transport.vhost_user.blk import BlkDevice, BlkOptions
        from blktap.transport.vhost_user.device import Session

        engine = ThreadEngine(threads=2)
        try:
            drv = await engine.call(open_stack, engine, f"aio:{self.image}",
                                    writable=not self.read_only)
            vbd = self.vbd = VBD(drv, read_only=self.read_only)
            opts = BlkOptions(num_queues=self.num_queues, serial=self.serial,
                              read_only=self.read_only)
            self.sessions = [Session(s, BlkDevice(vbd, opts), name=f"test{i}")
                             for i, s in enumerate(self._backs)]
            self._ready.set()
            await asyncio.gather(*(s.run() for s in self.sessions))
            await vbd.close()
        finally:
            engine.close()

    def close(self) -> None:
        for f in self.fronts:
            f.sock.close()
        self._thread.join(20)
        assert not self._thread.is_alive(), "back-end did not stop at EOF"
        if self.error:
            raise self.error


def request(guest: Guest, kind: int, sector: int, data_bufs: list[tuple[int, int, int]],
            ) -> tuple[list[tuple[int, int, int]], int]:
    """The buffers of a virtio-blk request: header, data, status; and the status offset."""
    hdr = guest.alloc(16, 16)
    OUTHDR.pack_into(guest.mem, hdr, kind, 0, sector)
    status = guest.alloc(1, 1)
    guest.mem[status] = 0xFF
    return [(hdr, 16, 0), *data_bufs, (status, 1, F_WRITE)], status
