"""The Linux AIO engine: direct I/O submitted to the kernel, everything else as the thread
engine does it.

With O_DIRECT the kernel's native AIO is truly asynchronous: a request started alone is
submitted at once, those started together under a :meth:`plug` share one ``io_submit``,
and completions, signalled through an eventfd, are read from the ring the kernel maps
into the process (``io_getevents`` where that is not known to be sound). A request
started the callback way (``start_preadv``/``start_pwritev``) is told in the turn that
reaps it, without waking a coroutine. No worker thread wakes up and none competes for the
GIL, which is what a thread hand-off costs per request (4
KiB random reads of a raw file on ext4 over NBD, see bench/REPORT.md). This is what the
reference tapdisk does with libaio.

Buffered descriptors are not submitted: there ``io_submit`` does the I/O synchronously,
blocking the loop. They, fsync, metadata work, and any request the kernel refuses to
take (its queue is full, a buffer that is not writable memory) go through the thread
engine this class extends. A short transfer (end of file) is finished by a worker, which
zero-fills past the end as every engine does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass

from blktap.io import aio_abi as abi
from blktap.io.engine import Completion, Plug, settled
from blktap.io.iov import IOV_MAX, advance, total
from blktap.io.threads import DEFAULT_THREADS, DIRECT, ThreadEngine, read_full, write_full

# Operations in flight in the kernel at once; past that, requests go to the workers.
DEFAULT_DEPTH = 256


@dataclass(eq=False, slots=True)
class _Op:
    # Who waits: a coroutine's future, or the callback of start_preadv/start_pwritev.
    waiter: asyncio.Future | Completion
    fd: int
    iov: Sequence[memoryview]  # kept alive (and not reused) until the kernel is done
    offset: int
    length: int
    write: bool
    rw_flags: int
    iovecs: bytearray | None  # the struct iovec array of a vectored request


class LinuxAioEngine(ThreadEngine):
    name = "linux-aio"

    def __init__(self, threads: int = DEFAULT_THREADS,
                 loop: asyncio.AbstractEventLoop | None = None,
                 depth: int = DEFAULT_DEPTH) -> None:
        loop = loop or asyncio.get_running_loop()
        self._ctx = abi.io_setup(depth)  # OSError here leaves nothing to undo
        try:
            super().__init__(threads, loop)
        except BaseException:
            abi.io_destroy(self._ctx)
            raise
        self.depth = depth
        self._aio_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._aio_efd, self._reap)
        # Fixed memory the kernel reads iocbs from and writes events to.
        self._iocbs = bytearray(abi.IOCB.size * depth)
        self._iocb_base = abi.address_of(memoryview(self._iocbs))
        # io_submit takes an array of iocb pointers: slot i's pointer at 8 * i, written once.
        self._pointers = bytearray(b"".join(
            (self._iocb_base + i * abi.IOCB.size).to_bytes(8, "little") for i in range(depth)))
        self._pointers_base = abi.address_of(memoryview(self._pointers))
        self._batch_pointers = bytearray(8 * depth)  # a plug's, in the order started
        self._batch_pointers_base = abi.address_of(memoryview(self._batch_pointers))
        self._plug = Plug(self._unplug)
        self._plugged: list[int] = []  # slots started under the plug, not submitted
        self._events = bytearray(abi.IO_EVENT.size * depth)
        self._events_base = abi.address_of(memoryview(self._events))
        self._no_wait = bytearray(16)  # struct timespec {0, 0}
        self._no_wait_base = abi.address_of(memoryview(self._no_wait))
        self._free = list(range(depth))
        self._ops: dict[int, _Op] = {}  # by iocb slot, in the kernel
        self._ring = abi.completion_ring(self._ctx)  # None: io_getevents
        self._ring_events = (abi.AIO_RING.unpack_from(self._ring)[1]
                             if self._ring is not None else 0)
        self.aio_submitted = 0

    # ------------------------------------------------------------------ submission
    def _queue(self, fd: int, iov: Sequence[memoryview], offset: int, *, write: bool,
               rw_flags: int = 0, done: Completion | None = None,
               addresses: Sequence[int] | None = None
               ) -> asyncio.Future | Completion | None:
        """Fill an iocb for the request and submit it: its waiter (a future, or
        ``done``); None when it cannot go to the kernel (no free slot, a read-only
        buffer). ``addresses``: the buffers' own, when the caller has them."""
        length = total(iov)
        if not self._free or not length or len(iov) > IOV_MAX or self._closed:
            return None  # an empty request has no buffer address to give the kernel
        if addresses is None:
            try:
                addresses = abi.addresses(iov)
            except (TypeError, ValueError):  # read-only or empty buffers have no address
                return None
        if len(iov) == 1:
            opcode = abi.CMD_PWRITE if write else abi.CMD_PREAD
            buf, nbytes, iovecs = addresses[0], len(iov[0]), None
        else:
            opcode = abi.CMD_PWRITEV if write else abi.CMD_PREADV
            iovecs = abi.iovec_array(addresses, iov)
            buf, nbytes = abi.address_of(memoryview(iovecs)), len(iov)
        slot = self._free.pop()
        abi.IOCB.pack_into(self._iocbs, slot * abi.IOCB.size, slot, 0, rw_flags, opcode,
                           0, fd, buf, nbytes, offset, 0, abi.IOCB_FLAG_RESFD,
                           self._aio_efd)
        # The kernel cannot be asked to stop (io_cancel fails on files), so a task
        # cancelled while the kernel has the buffers wakes when it is done with them.
        waiter: asyncio.Future | Completion = (
            done if done is not None else settled(self.loop, cancellable=False))
        self._ops[slot] = _Op(waiter, fd, iov, offset, length, write, rw_flags, iovecs)
        if self._plug.depth:
            self._plugged.append(slot)
        else:
            self._submit_iocb(slot)
        return waiter

    def _submit_iocb(self, slot: int) -> None:
        """Hand one iocb to the kernel now. (An earlier version held every request to the
        end of its turn of the loop; requests started together now say so with
        :meth:`plug`, and one started alone need not wait for the others of its turn.)"""
        try:
            self.aio_submitted += abi.io_submit(self._ctx, 1, self._pointers_base + 8 * slot)
        except OSError:
            # The kernel would not take it (queue full, a file system without direct
            # AIO...): a worker does it, and reports its own error if any.
            self._to_worker(self._take(slot))

    def plug(self) -> Plug:
        return self._plug

    def _unplug(self) -> None:
        """The plug's end: what was started under it goes in one io_submit (each is a
        system call, which a PV dom0 makes through Xen: in bench/xen.py's rig a guest's
        4 KiB random reads at QD8 reached 438 a second submitted one by one, 577-594
        together)."""
        batch, self._plugged = self._plugged, []
        if len(batch) == 1:
            self._submit_iocb(batch[0])
            return
        pointers = self._pointers
        staged = self._batch_pointers
        for i, slot in enumerate(batch):
            staged[8 * i : 8 * i + 8] = pointers[8 * slot : 8 * slot + 8]
        pos = 0
        while pos < len(batch):
            try:
                taken = abi.io_submit(self._ctx, len(batch) - pos,
                                      self._batch_pointers_base + 8 * pos)
            except OSError:
                # The kernel would not take this one (queue full...): a worker does it.
                self._to_worker(self._take(batch[pos]))
                pos += 1
                continue
            self.aio_submitted += taken
            pos += taken

    def _take(self, slot: int) -> _Op:
        op = self._ops.pop(slot)
        self._free.append(slot)
        return op

    def _to_worker(self, op: _Op, done: int = 0) -> None:
        """Finish ``op`` from byte ``done`` on in a worker thread."""
        iov = advance(op.iov, done) if done else list(op.iov)
        if op.write:
            job = (write_full, (op.fd, iov, op.offset + done, op.rw_flags))
        else:
            job = (read_full, (op.fd, iov, op.offset + done))
        waiter = op.waiter
        if not isinstance(waiter, asyncio.Future):  # a callback: told by a future's
            fut = settled(self.loop, cancellable=False)
            fut.add_done_callback(lambda f, tell=waiter: tell(f.exception()))
            waiter = fut
        self._jobs.put((waiter, *job))
        self.submitted += 1

    # ------------------------------------------------------------------ completion
    def _reap(self) -> None:
        try:
            os.eventfd_read(self._aio_efd)
        except BlockingIOError:
            pass
        if self._ring is not None:
            # The kernel wrote the events before it signalled the eventfd just read:
            # they are in the ring, and one that lands later signals it again.
            self._take_from_ring()
            return
        while self._ops:
            if self._collect(0, self._no_wait_base) < self.depth:
                return

    def _take_from_ring(self) -> None:
        """Take every completion the ring holds, as io_getevents would, without the
        system call (each costs a ctypes call and, in a PV dom0, a trip through Xen)."""
        ring = self._ring
        assert ring is not None
        head, tail = abi.AIO_RING_HEAD_TAIL.unpack_from(ring, abi.AIO_RING_AT_HEAD)
        if head == tail:
            return
        nr = self._ring_events
        if head >= nr or tail >= nr:  # not the kernel's: let it report
            self._ring = None
            self._reap()
            return
        done = []
        event, size, base = abi.IO_EVENT, abi.IO_EVENT.size, abi.AIO_RING.size
        while head != tail:
            slot, _, res, _ = event.unpack_from(ring, base + head * size)
            done.append((slot, res))
            head = head + 1 if head + 1 < nr else 0
        # Handed back before any is finished: a completion's callback may submit more.
        abi.AIO_RING_HEAD.pack_into(ring, abi.AIO_RING_AT_HEAD, head)
        for slot, res in done:
            self._complete_op(self._take(slot), res)

    def _collect(self, min_nr: int, timeout: int | None) -> int:
        """Take up to ``depth`` completions (waiting for ``min_nr``) and finish them."""
        n = abi.io_getevents(self._ctx, min_nr, self.depth, self._events_base, timeout)
        for i in range(n):
            slot, _, res, _ = abi.IO_EVENT.unpack_from(self._events, i * abi.IO_EVENT.size)
            self._complete_op(self._take(slot), res)
        return n

    def _complete_op(self, op: _Op, res: int) -> None:
        if 0 <= res < op.length:
            self._to_worker(op, res)  # end of file (or a partial transfer): finish there
            return
        waiter = op.waiter
        if not isinstance(waiter, asyncio.Future):  # the callback way: told now
            waiter(OSError(-res, os.strerror(-res)) if res < 0 else None)
        elif waiter.done():
            pass
        elif res < 0:
            waiter.set_exception(OSError(-res, os.strerror(-res)))
        else:
            waiter.set_result(None)

    # ------------------------------------------------------------------ interface
    async def preadv(self, fd: int, iov: Sequence[memoryview], offset: int) -> None:
        if self._fd_mode(fd) == DIRECT:
            fut = self._queue(fd, iov, offset, write=False)
            if fut is not None:
                await fut  # type: ignore[misc]
                return
        await super().preadv(fd, iov, offset)

    async def pwritev(self, fd: int, iov: Sequence[memoryview], offset: int, *,
                      dsync: bool = False) -> None:
        if self._fd_mode(fd) == DIRECT:
            fut = self._queue(fd, iov, offset, write=True,
                              rw_flags=os.RWF_DSYNC if dsync else 0)
            if fut is not None:
                await fut  # type: ignore[misc]
                return
        await super().pwritev(fd, iov, offset, dsync=dsync)

    def start_preadv(self, fd: int, iov: Sequence[memoryview], offset: int,
                     done: Completion, *, addresses: Sequence[int] | None = None) -> bool:
        return (self._fd_mode(fd) == DIRECT
                and self._queue(fd, iov, offset, write=False, done=done,
                                addresses=addresses) is not None)

    def start_pwritev(self, fd: int, iov: Sequence[memoryview], offset: int,
                      done: Completion, *, dsync: bool = False,
                      addresses: Sequence[int] | None = None) -> bool:
        return (self._fd_mode(fd) == DIRECT
                and self._queue(fd, iov, offset, write=True,
                                rw_flags=os.RWF_DSYNC if dsync else 0, done=done,
                                addresses=addresses) is not None)

    def close(self) -> None:
        """Wait for what the kernel has, then stop the workers."""
        if self._closed:
            return
        if self._plugged:  # (closed under a plug: what it holds goes now)
            self._unplug()
        while self._ops:
            self._collect(1, None)
        self.loop.remove_reader(self._aio_efd)
        os.close(self._aio_efd)
        if self._ring is not None:
            self._ring.release()  # io_destroy unmaps the memory it is a view of
            self._ring = None
        abi.io_destroy(self._ctx)
        super().close()  # a short transfer handed to a worker finishes there first


def best_engine(threads: int = DEFAULT_THREADS) -> ThreadEngine:
    """The Linux AIO engine where the kernel offers it, else the thread engine."""
    try:
        return LinuxAioEngine(threads)
    except OSError:
        return ThreadEngine(threads)
