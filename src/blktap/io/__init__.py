"""I/O engines: turn positioned reads, writes and syncs into completed system calls
without blocking the event loop.

- :mod:`blktap.io.engine`: the interface every engine offers;
- :mod:`blktap.io.threads`: the engine in use, a pool of threads running preadv/pwritev
  (chosen by measurement, see docs/architecture.md "I/O engine");
- :mod:`blktap.io.buffers`: page-aligned, reusable data buffers (O_DIRECT-able);
- :mod:`blktap.io.iov`: slicing and filling lists of buffers (iovecs);
- :mod:`blktap.io.syscalls`: fallocate modes and block-device ioctls Python lacks.
"""

from blktap.io.buffers import Buffer, BufferPool
from blktap.io.engine import Engine
from blktap.io.threads import ThreadEngine

__all__ = ["Buffer", "BufferPool", "Engine", "ThreadEngine"]
