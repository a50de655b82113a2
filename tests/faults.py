"""Fault injection for crash-safety tests: "the process was killed after its Nth change".

A kill -9 stops a process between two system calls; what it wrote before stays in the page
cache. So a crash is simulated by letting the first N file-changing system calls through and
making the (N+1)th and every later one raise :class:`Killed` (a BaseException, so that no
``except Exception`` or ``except OSError`` in the code under test can swallow it). Cleanup
code that runs while the exception unwinds cannot change the files either, as after a
real kill.

Usage::

    total = count_mutations(lambda: coalesce(child))
    for n in range(total + 1):
        restore_files()
        completed = crash_after(lambda: coalesce(child), n)
        assert_state_is_valid()

File descriptors the operation leaves open when killed are closed by :func:`crash_after`
(it compares /proc/self/fd before and after).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

# Every os function that changes a file's content, size or name.
MUTATORS = ("pwrite", "pwritev", "write", "writev", "ftruncate", "truncate",
            "copy_file_range", "sendfile", "posix_fallocate", "rename", "replace", "link",
            "unlink", "remove", "setxattr", "removexattr")


class Killed(BaseException):
    """The simulated process died here."""


@contextlib.contextmanager
def intercept(before: Callable[[str], None]) -> Iterator[None]:
    """Call ``before(name)`` ahead of every file-changing os call made inside the block."""
    originals = {name: getattr(os, name) for name in MUTATORS if hasattr(os, name)}

    def wrap(name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            before(name)
            return real(*args, **kwargs)
        return call

    for name, real in originals.items():
        setattr(os, name, wrap(name, real))
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(os, name, real)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def count_mutations(operation: Callable[[], object]) -> int:
    """Run ``operation`` to the end; return how many file-changing calls it made."""
    calls = 0

    def count(_name: str) -> None:
        nonlocal calls
        calls += 1

    with intercept(count):
        operation()
    return calls


def crash_after(operation: Callable[[], object], n: int) -> bool:
    """Run ``operation``, killing it at its (n+1)th file-changing call. Returns True when it
    finished before that (n was at least its number of calls)."""
    calls = 0

    def die_after_n(_name: str) -> None:
        nonlocal calls
        calls += 1
        if calls > n:
            raise Killed()

    before = _open_fds()
    try:
        with intercept(die_after_n):
            operation()
    except Killed:
        return False
    finally:
        for fd in _open_fds() - before:  # the dead process's descriptors
            with contextlib.suppress(OSError):
                os.close(fd)
    return True


def kill_points(total: int, limit: int, seed: int = 0) -> list[int]:
    """Up to ``limit`` kill points out of 0..total: the first and last few always, the rest
    spread evenly (deterministic, so failures reproduce)."""
    if total + 1 <= limit:
        return list(range(total + 1))
    edge = min(5, limit // 4)
    points = set(range(edge)) | set(range(total + 1 - edge, total + 1))
    step = (total + 1) / (limit - len(points))
    i = seed % max(1, int(step))
    while len(points) < limit and i <= total:
        points.add(int(i))
        i += step
    return sorted(points)
