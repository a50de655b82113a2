"""Runs of changed blocks in a CBT bitmap, found with ``str.find`` (in C), not a Python
loop per block."""

from __future__ import annotations

from blktap.image.cbt.structs import BLOCK, LogHeader, blocks


def bit_string(bitmap: bytes | bytearray | memoryview, first: int, count: int) -> str:
    """Blocks ``[first, first + count)`` as a string of '0'/'1', one character per
    block in disk order (so runs are found with ``str.find``, in C)."""
    if count <= 0:
        return ""
    lo, hi = first // 8, -(-(first + count) // 8)
    value = int.from_bytes(bitmap[lo:hi], "little") >> (first - lo * 8)
    return format(value & ((1 << count) - 1), f"0{count}b")[::-1]


def runs(bitmap: bytes | bytearray | memoryview, first: int, count: int,
         ) -> list[tuple[int, int, bool]]:
    """Runs (first block, blocks, dirty) covering blocks ``[first, first + count)``."""
    bits = bit_string(bitmap, first, count)
    out: list[tuple[int, int, bool]] = []
    pos = 0
    while pos < count:
        dirty = bits[pos] == "1"
        end = bits.find("0" if dirty else "1", pos)
        if end < 0:
            end = count
        out.append((first + pos, end - pos, dirty))
        pos = end
    return out


def changed_extents(header: LogHeader, bitmap: bytes | bytearray | memoryview,
                    ) -> list[tuple[int, int]]:
    """(offset, length) in bytes of every run of changed blocks, cut at the disk's end."""
    out = []
    for first, n, dirty in runs(bitmap, 0, blocks(header.size)):
        if dirty:
            start = first * BLOCK
            out.append((start, min((first + n) * BLOCK, header.size) - start))
    return out
