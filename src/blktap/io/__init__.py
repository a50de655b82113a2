"""I/O engines: turn positioned reads, writes and syncs into completed system calls
without blocking the event loop.

- :mod:`blktap.io.engine`: the interface every engine offers;
- :mod:`blktap.io.threads`: a pool of threads running preadv/pwritev, with what cannot
  block done at once on the loop thread (memory, page cache);
- :mod:`blktap.io.linuxaio`: the default where the kernel offers it: direct I/O
  submitted to Linux AIO, the rest as the thread engine does it;
- :mod:`blktap.io.aio_abi`: the Linux AIO system calls and structures;
- :mod:`blktap.io.buffers`: page-aligned, reusable data buffers (O_DIRECT-able);
- :mod:`blktap.io.iov`: slicing and filling lists of buffers (iovecs);
- :mod:`blktap.io.syscalls`: fallocate modes and block-device ioctls Python lacks.
"""

from blktap.io.buffers import Buffer, BufferPool
from blktap.io.engine import Engine
from blktap.io.linuxaio import LinuxAioEngine, best_engine
from blktap.io.threads import ThreadEngine

__all__ = ["Buffer", "BufferPool", "Engine", "LinuxAioEngine", "ThreadEngine", "best_engine"]
