"""One disk as one regular file, over the FUSE kernel protocol spoken on /dev/fuse.

The file system has a single node, its root, which is a regular file the size of the
disk mounted over a file (as qemu-storage-daemon's fuse export does); ``losetup`` on it
gives a block device. Every open is ``FOPEN_DIRECT_IO``: no page cache of its own
(the loop device or the reader has one), so what the kernel acknowledges reached the
VBD, and an fsync is a VBD flush.

The reader runs on the event loop (``/dev/fuse`` is non-blocking and pollable): each
request is read with ``readv`` into a fixed 80-byte head and a page-aligned pooled data
buffer, so a WRITE's payload lands aligned where the driver stack can use it as is, and
a READ's reply goes out from the buffer it was read into with one ``writev``. Requests
are answered out of order, as they complete; the side door (``read_now``/``write_now``)
serves what the stack can do at once without a task.

Opcodes: INIT, GETATTR, SETATTR (mode and owner; the size is the disk's and cannot
change), OPEN, READ, WRITE, FSYNC (flush), FLUSH and RELEASE (nothing to do), STATFS,
LSEEK (SEEK_DATA/SEEK_HOLE from the VBD's block status), FALLOCATE (punch hole and
zero range as write-zeroes), and ENOSYS for the rest (xattrs, locks...), which the
kernel remembers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time

from blktap.errors import BlktapError
from blktap.io.buffers import Buffer, BufferPool
from blktap.tapdisk.driver import SECTOR, STATE_HOLE
from blktap.tapdisk.vbd import VBD, errno_of
from blktap.transport.fuse import mount as fmount
from blktap.transport.fuse import proto as p

log = logging.getLogger("blktap.fuse")

MAX_WRITE = 1 << 20  # bytes in one READ or WRITE (max_pages 256)
MAX_BACKGROUND = 64
MAX_IN_FLIGHT = 128  # requests handled at once; the reader waits beyond
ATTR_VALID = 1  # seconds the kernel may cache the attributes
SEEK_DATA = 3
SEEK_HOLE = 4
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
LSEEK_STEP = 1 << 30  # bytes of block status asked for at a time


class FuseServer:
    """Serve ``vbd`` as the regular file ``path`` until :meth:`stop`."""

    def __init__(self, vbd: VBD, path: str, *, pool: BufferPool | None = None) -> None:
        self.vbd = vbd
        self.path = os.path.abspath(path)
        self.read_only = vbd.read_only
        self.pool = pool or BufferPool()
        self.fd = -1
        self.loop = asyncio.get_running_loop()
        self.mode = 0o400 if self.read_only else 0o600
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.mounted_at = time.time()
        self._head = bytearray(p.WRITE_HEAD)
        self._data: Buffer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reading = False
        self._gone = asyncio.Event()  # the kernel ended the connection
        self.requests = 0

    # ------------------------------------------------------------------ lifecycle
    def mount(self) -> None:
        self.fd = fmount.mount(self.path, read_only=self.read_only,
                               fsname=f"blktap:{os.path.basename(self.vbd.name)}")
        os.set_blocking(self.fd, False)
        self.mounted_at = time.time()
        self._resume_reading()

    async def stop(self, *, lazy_if_busy: bool = True) -> None:
        """Unmount (lazily if a loop device still holds the file: then the file system
        is served until its last user lets go) and finish the requests in flight."""
        if self.fd < 0:
            return
        if not self._gone.is_set():
            try:
                await self.loop.run_in_executor(None, fmount.unmount, self.path)
            except BlktapError as exc:
                if exc.errno != errno.EBUSY or not lazy_if_busy:
                    raise
                log.warning("%s is in use (a loop device?): detached; served until its "
                            "last user lets go", self.path)
                await self.loop.run_in_executor(
                    None, lambda: fmount.unmount(self.path, lazy=True))
            await self._gone.wait()
        await self._close()

    async def abort(self) -> None:
        """Drop the connection now: users of the file get ENOTCONN, and the name is
        detached (lazily: whoever still has the file open keeps getting errors)."""
        if self.fd < 0:
            return
        gone = self._gone.is_set()
        await self._close()
        if not gone:
            with contextlib.suppress(BlktapError):
                fmount.unmount(self.path, lazy=True)

    async def _close(self) -> None:
        if self.fd < 0:
            return
        self._stop_reading()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        os.close(self.fd)
        self.fd = -1
        if self._data is not None:
            self.pool.put(self._data)
            self._data = None
        self._gone.set()

    async def wait_closed(self) -> None:
        await self._gone.wait()

    # ------------------------------------------------------------------ reading
    def _resume_reading(self) -> None:
        if not self._reading and self.fd >= 0 and not self._gone.is_set():
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        for _ in range(64):  # then let others run
            if len(self._tasks) >= MAX_IN_FLIGHT:
                self._stop_reading()
                return
            if self._data is None:
                self._data = self.pool.get(MAX_WRITE)
            try:
                n = os.readv(self.fd, [self._head, self._data.view])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                # ENODEV: unmounted, or the connection was aborted.
                if exc.errno != errno.ENODEV:
                    log.error("%s: /dev/fuse: %s", self.path, exc.strerror)
                self._stop_reading()
                self._gone.set()
                return
            self._dispatch(n)

    def _dispatch(self, n: int) -> None:
        _len, opcode, unique, _node, _uid, _gid, _pid, _ext, _pad = \
            p.IN_HEADER.unpack_from(self._head)
        self.requests += 1
        if opcode == p.READ:
            fh, offset, size, *_ = p.READ_IN.unpack_from(self._head, p.IN_HEADER.size)
            self._read(unique, offset, size)
        elif opcode == p.WRITE:
            fh, offset, size, *_ = p.WRITE_IN.unpack_from(self._head, p.IN_HEADER.size)
            self._write(unique, offset, size, n - p.WRITE_HEAD)
        elif opcode in p.NO_REPLY:
            return
        else:
            args = bytes(self._head[p.IN_HEADER.size:n])
            if n > p.WRITE_HEAD:
                args += bytes(self._data.view[: n - p.WRITE_HEAD]) if self._data else b""
            self._other(unique, opcode, args)

    # ------------------------------------------------------------------ replies
    def _reply(self, unique: int, error: int = 0, *parts: bytes | memoryview) -> None:
        if self.fd < 0:
            return
        size = p.OUT_HEADER.size + sum(len(x) for x in parts)
        try:
            os.writev(self.fd, [p.OUT_HEADER.pack(size, -error, unique), *parts])
        except OSError as exc:
            # ENOENT: the request was interrupted meanwhile; ENODEV: connection gone.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("%s: reply: %s", self.path, exc.strerror)

    def _start(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %r", self.path, task.exception())
        if len(self._tasks) < MAX_IN_FLIGHT:
            self._resume_reading()

    def _take_data(self) -> Buffer:
        buf = self._data
        assert buf is not None
        self._data = None
        return buf

    # ------------------------------------------------------------------ data
    def _read(self, unique: int, offset: int, size: int) -> None:
        length = max(0, min(size, self.vbd.size - offset, MAX_WRITE))
        if length == 0:
            self._reply(unique)
            return
        buf = self._take_data()
        view = buf.view[:length]
        aligned = not (offset | length) % SECTOR
        if aligned and self.vbd.readv_now(offset, [view], length):
            self._reply(unique, 0, view)
            self.pool.put(buf)
            return
        self._start(self._read_task(unique, offset, view, buf, aligned))

    async def _read_task(self, unique: int, offset: int, view: memoryview, buf: Buffer,
                         aligned: bool) -> None:
        try:
            if aligned:
                await self.vbd.readv(offset, [view], len(view))
            else:
                await self.vbd.read(offset, view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is the caller's errno
            self._reply(unique, errno_of(exc))
        else:
            self._reply(unique, 0, view)
        finally:
            self.pool.put(buf)

    def _write(self, unique: int, offset: int, size: int, got: int) -> None:
        if got != size:
            self._reply(unique, errno.EIO)
            return
        if self.read_only:
            self._reply(unique, errno.EROFS)
            return
        if offset >= self.vbd.size and size:
            self._reply(unique, errno.ENOSPC)
            return
        length = min(size, self.vbd.size - offset)  # a short write at the end
        buf = self._take_data()
        view = buf.view[:length]
        aligned = not (offset | length) % SECTOR
        if aligned and self.vbd.writev_now(offset, [view], length):
            self._reply(unique, 0, p.WRITE_OUT.pack(length, 0))
            self.pool.put(buf)
            return
        self._start(self._write_task(unique, offset, view, buf, aligned))

    async def _write_task(self, unique: int, offset: int, view: memoryview, buf: Buffer,
                          aligned: bool) -> None:
        try:
            if aligned:
                await self.vbd.writev(offset, [view], len(view))
            else:
                await self.vbd.write(offset, view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._reply(unique, errno_of(exc))
        else:
            self._reply(unique, 0, p.WRITE_OUT.pack(len(view), 0))
        finally:
            self.pool.put(buf)

    # ------------------------------------------------------------------ the rest
    def _attr(self) -> bytes:
        size = self.vbd.size
        t = int(self.mounted_at)
        return p.ATTR_OUT.pack(ATTR_VALID, 0, 0) + p.ATTR.pack(
            p.ROOT_ID, size, -(-size // 512), t, t, t, 0, 0, 0, stat.S_IFREG | self.mode,
            1, self.uid, self.gid, 0, 4096, 0)

    def _other(self, unique: int, opcode: int, args: bytes) -> None:
        try:
            if opcode == p.INIT:
                self._reply(unique, 0, self._init(args))
            elif opcode == p.GETATTR:
                self._reply(unique, 0, self._attr())
            elif opcode == p.SETATTR:
                self._reply(unique, 0, self._setattr(args))
            elif opcode == p.OPEN:
                flags, _ = p.OPEN_IN.unpack_from(args)
                if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
                    raise BlktapError("read-only", errno.EROFS)
                self._reply(unique, 0, p.OPEN_OUT.pack(
                    0, p.FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0))
            elif opcode in (p.RELEASE, p.FLUSH, p.DESTROY):
                self._reply(unique)
            elif opcode == p.STATFS:
                blocks = self.vbd.size // 4096
                self._reply(unique, 0, p.STATFS_OUT.pack(blocks, 0, 0, 1, 0, 4096, 255,
                                                         4096, 0))
            elif opcode == p.FSYNC:
                self._start(self._fsync(unique))
            elif opcode == p.LSEEK:
                _fh, offset, whence, _ = p.LSEEK_IN.unpack_from(args)
                self._start(self._lseek(unique, offset, whence))
            elif opcode == p.FALLOCATE:
                _fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(args)
                self._start(self._fallocate(unique, offset, length, mode))
            elif opcode in (p.LOOKUP, p.OPENDIR):
                self._reply(unique, errno.ENOTDIR)
            else:
                self._reply(unique, errno.ENOSYS)
        except BlktapError as exc:
            self._reply(unique, exc.errno)
        except Exception as exc:  # noqa: BLE001 - a malformed request, not our end
            log.error("%s: opcode %d: %r", self.path, opcode, exc)
            self._reply(unique, errno.EIO)

    def _init(self, args: bytes) -> bytes:
        major, minor, max_readahead, flags = p.INIT_IN.unpack_from(args)
        if major != p.KERNEL_MAJOR or minor < 28:
            raise BlktapError(f"FUSE protocol {major}.{minor}: 7.28 or later needed "
                              "(Linux 4.20)", errno.EPROTO)
        return p.INIT_OUT.pack(p.KERNEL_MAJOR, p.KERNEL_MINOR, max_readahead,
                               flags & p.WANTED_INIT_FLAGS, MAX_BACKGROUND,
                               MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1, MAX_WRITE // 4096,
                               0, 0)

    def _setattr(self, args: bytes) -> bytes:
        f = p.SETATTR_IN.unpack_from(args)
        valid, size, mode, uid, gid = f[0], f[3], f[11], f[13], f[14]
        if valid & p.FATTR_SIZE and size != self.vbd.size:
            raise BlktapError("the disk's size is fixed", errno.EPERM)
        if valid & p.FATTR_MODE:
            self.mode = mode & 0o7777
        if valid & p.FATTR_UID:
            self.uid = uid
        if valid & p.FATTR_GID:
            self.gid = gid
        return self._attr()

    async def _fsync(self, unique: int) -> None:
        try:
            if not self.read_only:
                await self.vbd.flush()
        except Exception as exc:  # noqa: BLE001
            self._reply(unique, errno_of(exc))
        else:
            self._reply(unique)

    async def _lseek(self, unique: int, offset: int, whence: int) -> None:
        try:
            pos = await self.seek(offset, whence)
        except Exception as exc:  # noqa: BLE001
            self._reply(unique, errno_of(exc))
        else:
            self._reply(unique, 0, p.LSEEK_OUT.pack(pos))

    async def seek(self, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE as lseek(2) defines them (the end is a hole)."""
        size = self.vbd.size
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise BlktapError("only SEEK_DATA and SEEK_HOLE reach us", errno.EINVAL)
        if offset < 0 or offset >= size:
            raise BlktapError("past the end", errno.ENXIO)
        pos = offset
        while pos < size:
            extents = await self.vbd.block_status(pos, min(LSEEK_STEP, size - pos))
            if not extents:
                raise BlktapError("block status answered nothing", errno.EIO)
            for length, flags in extents:
                if bool(flags & STATE_HOLE) == (whence == SEEK_HOLE):
                    return pos
                pos += length
        if whence == SEEK_HOLE:
            return size
        raise BlktapError("no data past this offset", errno.ENXIO)

    async def _fallocate(self, unique: int, offset: int, length: int, mode: int) -> None:
        try:
            if self.read_only:
                raise BlktapError("read-only", errno.EROFS)
            end = offset + length
            if end > self.vbd.size:
                if not mode & p.FALLOC_FL_KEEP_SIZE:
                    raise BlktapError("the disk's size is fixed", errno.EFBIG)
                end = self.vbd.size
            if mode & ~(p.FALLOC_FL_KEEP_SIZE | p.FALLOC_FL_PUNCH_HOLE
                        | p.FALLOC_FL_ZERO_RANGE):
                raise BlktapError("unsupported fallocate mode", errno.EOPNOTSUPP)
            if end > offset and mode & (p.FALLOC_FL_PUNCH_HOLE | p.FALLOC_FL_ZERO_RANGE):
                await self.vbd.write_zeroes(offset, end - offset,
                                            may_trim=bool(mode & p.FALLOC_FL_PUNCH_HOLE))
        except Exception as exc:  # noqa: BLE001
            self._reply(unique, errno_of(exc))
        else:
            self._reply(unique)
