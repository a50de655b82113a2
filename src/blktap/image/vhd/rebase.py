"""Rebase: give a differencing VHD a new parent without changing what it reads as.

``vhd-util modify -p`` (:func:`reparent.set_parent`) only rewrites the parent pointers: it
is right when the new parent holds the same data as the old one (after a coalesce, or a
copy). A safe rebase, as ``qemu-img rebase`` does it, first copies into the image every
sector it does not hold itself where the old and the new parent chains differ, so that the
image reads the same before and after; then it switches the pointers.

Crash safety: the copies are ordinary writes to the image (crash-safe on their own, see
:mod:`image`) of the data it already reads there, so the disk's content never changes;
the switch is :func:`reparent.set_parent`'s crash-safe sequence.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from blktap.errors import UsageError
from blktap.image.chain import Chain, open_chain
from blktap.image.parents import ParentPolicy, default_policy
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.reparent import NewParent, set_parent

# Compared and copied in chunks of one block, in pieces of this many bytes.
CHUNK = 2 << 20
PIECE = 64 << 10

Progress = Callable[[int, int], None]  # (bytes examined, bytes to examine)


@dataclass
class RebaseResult:
    image: str
    parent: NewParent
    copied_bytes: int  # data copied into the image to keep its content
    compared_bytes: int  # bytes of the disk the image did not hold itself


def rebase(path: str, new_parent: str, *, raw: bool = False, safe: bool = True,
           key: bytes | None = None, progress: Progress | None = None,
           parent_policy: ParentPolicy | None = None) -> RebaseResult:
    """Make ``new_parent`` the parent of the differencing VHD ``path``.

    With ``safe`` (the default) the image's content is kept: sectors it does not hold and
    where the new parent chain reads differently from the old one are copied into it
    first. Without ``safe`` only the pointers change (``vhd-util modify -p``).
    ``key`` is the key of an encrypted chain (applied to each of the two chains that is
    encrypted; the copied data is re-encrypted for the image). The parents of both
    chains must pass ``parent_policy`` (default: the environment's).
    """
    with VhdImage.open(path) as image:
        if not image.is_differencing:
            raise UsageError(f"{path} is not a differencing disk: it has no parent to "
                             f"replace", errno.EINVAL)
    copied = compared = 0
    if safe:
        copied, compared = _copy_differences(path, new_parent, raw, key, progress,
                                             default_policy(parent_policy))
    target = set_parent(path, new_parent, raw=raw)
    return RebaseResult(path, target, copied, compared)


def _copy_differences(path: str, new_parent: str, raw: bool, key: bytes | None,
                      progress: Progress | None, policy: ParentPolicy) -> tuple[int, int]:
    spec = f"aio:{new_parent}" if raw else f"vhd:{new_parent}"
    copied = compared = 0
    with open_chain(f"vhd:{path}", key=key, writable=True, parent_policy=policy) as old, \
            open_chain(spec, key=key, parent_policy=policy) as new:
        # The ranges the image does not hold: there the old parents answer today.
        todo = [(e.offset, e.length) for e in old.map() if e.depth != 0]
        total = sum(length for _, length in todo)
        old_buf, new_buf = bytearray(CHUNK), bytearray(CHUNK)
        for offset, length in todo:
            end = offset + length
            while offset < end:
                n = min(CHUNK - offset % CHUNK, end - offset)
                a = memoryview(old_buf)[:n]
                b = memoryview(new_buf)[:n]
                old.readinto(offset // s.SECTOR_SIZE, a)
                _read_or_zeros(new, offset, b)
                # Whole buffers compare with memcmp; memoryviews would go byte by byte.
                same = old_buf == new_buf if n == CHUNK else a.tobytes() == b.tobytes()
                if not same:
                    copied += _write_differing_pieces(old, offset, a, b)
                offset += n
                compared += n
                if progress:
                    progress(compared, total)
        old.flush()
    return copied, compared


def _read_or_zeros(chain: Chain, offset: int, view: memoryview) -> None:
    """Read what ``chain`` holds at ``offset``; past its end it reads as zeros."""
    inside = max(0, min(len(view), chain.size - offset))
    whole = inside - inside % s.SECTOR_SIZE
    if whole:
        chain.readinto(offset // s.SECTOR_SIZE, view[:whole])
    if inside > whole:  # a raw parent whose size is not a whole number of sectors
        view[whole:inside] = chain.pread(offset + whole, inside - whole)
    view[inside:] = bytes(len(view) - inside)


def _write_differing_pieces(chain: Chain, offset: int, want: memoryview,
                            other: memoryview) -> int:
    """Write into the leaf the pieces where ``want`` (what it reads today) differs from
    ``other`` (what the new parent would give); returns the bytes written."""
    written = 0
    pos = 0
    while pos < len(want):
        n = min(PIECE, len(want) - pos)
        if want[pos : pos + n].tobytes() != other[pos : pos + n].tobytes():
            chain.write((offset + pos) // s.SECTOR_SIZE, want[pos : pos + n])
            written += n
        pos += n
    return written
