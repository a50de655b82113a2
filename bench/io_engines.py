"""Measure I/O engines as the tapdisk data path uses them: from one asyncio loop, many
requests in flight, each completion resumed in Python.

    python bench/io_engines.py [--file PATH] [--size 256M] [--seconds 3] [--direct]

Engines: ``threads`` (blktap.io.ThreadEngine, always), ``uring`` (the ``liburing``
PyPI binding, if importable) and ``libaio`` (the ``libaio`` PyPI binding, if
importable). Workloads: 4 KiB random reads at QD32, 1 MiB sequential reads at QD4, 4 KiB
random writes at QD32. Prints one line per engine and workload (IOPS, MiB/s).
The results that chose the engine are in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from blktap.io.threads import ThreadEngine  # noqa: E402


class UringEngine:
    """A minimal io_uring engine: readv/writev SQEs, completions through an eventfd."""

    name = "uring"

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = 256) -> None:
        import liburing as u
        self.u = u
        self.loop = loop
        self.ring = u.Ring()
        u.io_uring_queue_init(entries, self.ring)
        self.cqe = u.Cqe()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        u.io_uring_register_eventfd(self.ring, self.efd)
        self.waiting: dict[int, tuple[asyncio.Future, object]] = {}
        self.next_id = 1
        self.pending_submit = False
        loop.add_reader(self.efd, self._reap)

    def _queue(self, prep: Callable, fd: int, iov: list, offset: int) -> asyncio.Future:
        u = self.u
        sqe = u.io_uring_get_sqe(self.ring)
        vec = u.Iovec(iov)
        prep(sqe, fd, vec, offset)
        ident = self.next_id
        self.next_id += 1
        u.io_uring_sqe_set_data64(sqe, ident)
        fut = self.loop.create_future()
        self.waiting[ident] = (fut, vec)
        if not self.pending_submit:  # one io_uring_enter per loop iteration
            self.pending_submit = True
            self.loop.call_soon(self._submit)
        return fut

    def _submit(self) -> None:
        self.pending_submit = False
        self.u.io_uring_submit(self.ring)

    def _reap(self) -> None:
        u = self.u
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        ready = u.io_uring_cq_ready(self.ring)
        if not ready:
            return
        u.io_uring_peek_batch_cqe(self.ring, self.cqe, ready)
        for i in range(ready):
            c = self.cqe[i]
            fut, _ = self.waiting.pop(c.user_data)
            fut.set_result(c.res)
        u.io_uring_cq_advance(self.ring, ready)

    async def preadv(self, fd: int, iov: list, offset: int) -> None:
        await self._queue(self.u.io_uring_prep_readv, fd, iov, offset)

    async def pwritev(self, fd: int, iov: list, offset: int) -> None:
        await self._queue(self.u.io_uring_prep_writev, fd, iov, offset)

    def close(self) -> None:
        self.loop.remove_reader(self.efd)
        self.u.io_uring_queue_exit(self.ring)


class AioEngine:
    """A minimal libaio engine: one iocb per request, completions through an eventfd."""

    name = "libaio"

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 256) -> None:
        import libaio
        self.libaio = libaio
        self.loop = loop
        self.ctx = libaio.AIOContext(depth)
        self.efd = libaio.EventFD(0, os.EFD_NONBLOCK)
        loop.add_reader(self.efd.fileno(), self._reap)
        self.batch: list = []

    def _queue(self, mode: object, fd: int, iov: list, offset: int) -> asyncio.Future:
        fut = self.loop.create_future()
        block = self.libaio.AIOBlock(mode, fd, iov, offset, eventfd=self.efd,
                                     onCompletion=lambda b, res, res2: fut.set_result(res))
        if not self.batch:
            self.loop.call_soon(self._submit)
        self.batch.append(block)
        return fut

    def _submit(self) -> None:
        batch, self.batch = self.batch, []
        self.ctx.submit(batch)

    def _reap(self) -> None:
        try:
            os.eventfd_read(self.efd.fileno())
        except BlockingIOError:
            pass
        self.ctx.getEvents(min_nr=0)

    async def preadv(self, fd: int, iov: list, offset: int) -> None:
        await self._queue(self.libaio.AIOBLOCK_MODE_READ, fd, iov, offset)

    async def pwritev(self, fd: int, iov: list, offset: int) -> None:
        await self._queue(self.libaio.AIOBLOCK_MODE_WRITE, fd, iov, offset)

    def close(self) -> None:
        self.loop.remove_reader(self.efd.fileno())
        self.ctx.close()


async def workload(engine: object, fd: int, size: int, bs: int, qd: int, seconds: float,
                   write: bool, sequential: bool) -> tuple[float, float]:
    blocks = size // bs
    stop = time.monotonic() + seconds
    count = 0
    rng = random.Random(1)
    cursor = [0]

    async def worker() -> None:
        nonlocal count
        buf = mmap.mmap(-1, bs)
        iov = [memoryview(buf)]
        op = engine.pwritev if write else engine.preadv  # type: ignore[attr-defined]
        while time.monotonic() < stop:
            if sequential:
                blk = cursor[0] % blocks
                cursor[0] += 1
            else:
                blk = rng.randrange(blocks)
            await op(fd, iov, blk * bs)
            count += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(qd)))
    elapsed = time.monotonic() - t0
    return count / elapsed, count * bs / elapsed / (1 << 20)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="/dev/shm/blktap-iobench.img")
    ap.add_argument("--size", default=256 << 20, type=int)
    ap.add_argument("--seconds", default=3.0, type=float)
    ap.add_argument("--direct", action="store_true", help="open with O_DIRECT")
    ap.add_argument("--threads", default=16, type=int)
    ap.add_argument("--engines", default="threads,libaio,uring",
                    help="comma-separated engines to try (default: all)")
    args = ap.parse_args()
    with open(args.file, "wb") as f:
        f.truncate(args.size)
        chunk = os.urandom(1 << 20)
        for _ in range(args.size >> 20):
            f.write(chunk)
    flags = os.O_RDWR | (os.O_DIRECT if args.direct else 0)
    fd = os.open(args.file, flags)
    loop = asyncio.get_running_loop()
    wanted = args.engines.split(",")
    makers: list[tuple[str, Callable[[], object]]] = []
    if "threads" in wanted:
        makers.append(("threads", lambda: ThreadEngine(args.threads, loop)))
    for name, cls in (("libaio", AioEngine), ("uring", UringEngine)):
        if name not in wanted:
            continue
        try:
            __import__("liburing" if name == "uring" else "libaio")
        except ImportError:
            print(f"{name}: binding not installed, skipped")
            continue
        makers.append((name, lambda cls=cls: cls(loop)))
    loads = [("4k randread qd32", 4096, 32, False, False),
             ("1M seqread qd4", 1 << 20, 4, False, True),
             ("4k randwrite qd32", 4096, 32, True, False)]
    print(f"file {args.file} ({args.size >> 20} MiB){' O_DIRECT' if args.direct else ''}, "
          f"{args.seconds:g} s per run, {os.cpu_count()} CPUs")
    for label, bs, qd, write, seq in loads:
        for name, make in makers:
            engine = make()
            iops, mib = await workload(engine, fd, args.size, bs, qd, args.seconds, write, seq)
            engine.close()  # type: ignore[attr-defined]
            print(f"{label:20s} {name:8s} {iops:10.0f} IOPS {mib:9.1f} MiB/s")
    os.close(fd)
    os.unlink(args.file)


if __name__ == "__main__":
    asyncio.run(main())
