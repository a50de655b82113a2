"""Bit operations on VHD bitmaps.

VHD (since version 1.1, and always in blktap's images) numbers bits MSB-first: sector ``n``
of a block is bit ``0x80 >> (n & 7)`` of byte ``n >> 3``. The same order is used by the
batmap (one bit per block) and by ``vhd-util read -B``.
"""

from __future__ import annotations

from collections.abc import Iterator


def test_bit(buf: bytes | bytearray | memoryview, nr: int) -> bool:
    return bool(buf[nr >> 3] & (0x80 >> (nr & 7)))


def set_bit(buf: bytearray, nr: int) -> None:
    buf[nr >> 3] |= 0x80 >> (nr & 7)


def clear_bit(buf: bytearray, nr: int) -> None:
    buf[nr >> 3] &= ~(0x80 >> (nr & 7)) & 0xFF


def set_range(buf: bytearray, start: int, count: int) -> bool:
    """Set bits [start, start+count); return whether any bit changed."""
    if count <= 0:
        return False
    end = start + count
    changed = False
    # Leading partial byte, whole bytes, trailing partial byte.
    while start < end and start & 7:
        if not test_bit(buf, start):
            set_bit(buf, start)
            changed = True
        start += 1
    first_full, last_full = start >> 3, end >> 3
    if last_full > first_full:
        if buf[first_full:last_full] != b"\xff" * (last_full - first_full):
            buf[first_full:last_full] = b"\xff" * (last_full - first_full)
            changed = True
        start = last_full << 3
    while start < end:
        if not test_bit(buf, start):
            set_bit(buf, start)
            changed = True
        start += 1
    return changed


def bit_string(buf: bytes | bytearray | memoryview, nbits: int) -> str:
    """The first ``nbits`` bits as a string of '0'/'1', MSB-first (fast run searches)."""
    nbytes = (nbits + 7) >> 3
    if nbytes == 0:
        return ""
    value = int.from_bytes(bytes(buf[:nbytes]), "big")
    return format(value, f"0{nbytes * 8}b")[:nbits]


def runs(bits: str, start: int, count: int) -> Iterator[tuple[int, int, bool]]:
    """Split [start, start+count) into maximal runs of equal bits: (first, length, is_set)."""
    pos, end = start, start + count
    while pos < end:
        is_set = bits[pos] == "1"
        nxt = bits.find("0" if is_set else "1", pos, end)
        if nxt < 0:
            nxt = end
        yield pos, nxt - pos, is_set
        pos = nxt


def all_set(buf: bytes | bytearray | memoryview, nbits: int) -> bool:
    full, rest = divmod(nbits, 8)
    if bytes(buf[:full]) != b"\xff" * full:
        return False
    if rest:
        mask = (0xFF << (8 - rest)) & 0xFF
        return buf[full] & mask == mask
    return True


def count_set(buf: bytes | bytearray | memoryview, nbits: int) -> int:
    return bit_string(buf, nbits).count("1")
