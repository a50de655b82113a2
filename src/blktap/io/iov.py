"""Lists of buffers (iovecs): totals, slices and zero fills, buffer by buffer (never byte
by byte), so that merged requests and split extents move without copies."""

from __future__ import annotations

import os
from collections.abc import Sequence

# Linux refuses a preadv/pwritev of more buffers than this.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_ZEROS = bytes(1 << 20)


def total(iov: Sequence[memoryview]) -> int:
    return sum(map(len, iov))


def slice_iov(iov: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The bytes [start, start+length) of the concatenation of ``iov``, as views."""
    out: list[memoryview] = []
    for view in iov:
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(view[start : start + take])
        length -= take
        start = 0
        if not length:
            break
    if length:
        raise ValueError("slice past the end of the buffers")
    return out


def advance(iov: Sequence[memoryview], done: int) -> list[memoryview]:
    """What is left of ``iov`` once ``done`` bytes have been moved."""
    out: list[memoryview] = []
    for view in iov:
        if done >= len(view):
            done -= len(view)
            continue
        out.append(view[done:] if done else view)
        done = 0
    return out


def zero_fill(iov: Sequence[memoryview]) -> None:
    """Fill every buffer with zeros (slice assignment: memset-speed copies from one
    shared run of zeros)."""
    for view in iov:
        pos, n = 0, len(view)
        while pos < n:
            step = min(n - pos, len(_ZEROS))
            view[pos : pos + step] = _ZEROS[:step]
            pos += step


def zeros_iov(length: int) -> list[memoryview]:
    """Read-only views of zeros adding up to ``length`` (for writing zeros)."""
    whole, rest = divmod(length, len(_ZEROS))
    out = [memoryview(_ZEROS)] * whole
    if rest:
        out.append(memoryview(_ZEROS)[:rest])
    return out


def copy_into(dst: Sequence[memoryview], src: memoryview) -> None:
    """Scatter the bytes of ``src`` into the buffers of ``dst`` (lengths must match)."""
    pos = 0
    for view in dst:
        n = len(view)
        view[:] = src[pos : pos + n]
        pos += n
