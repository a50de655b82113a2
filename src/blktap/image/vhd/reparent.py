"""Pointing a differencing VHD at a new parent (what ``vhd-util modify -p`` does).

A child names its parent four ways: the parent's uuid, its basename (UTF-16BE), the mtime
it had (all in the header), and its path relative to the child in each parent locator.
Reparenting rewrites all of them in place. The locators keep their offsets and reserved
space, so the layout of the file does not change; a new path that does not fit a
locator's space is refused (ENAMETOOLONG) before anything is written.

Crash safety. The header is one 1024-byte write, so it is always either the old one or the
new one; the locator payloads are separate writes. The reference writes the locators first
and the header last: killed in between, it leaves the old header with locators that name
the new parent, which ``check`` rejects. Here a header never names a locator whose payload
disagrees with it:

1. header H1: the old parent, naming only the first path locator (the others dropped);
2. the other path locators get the new path (no header names them at this point);
3. header H2: the new parent, naming only the locators rewritten in step 2;
4. the first path locator gets the new path;
5. header H3: the new parent, naming every locator again.

Killed after any step, the file holds the old header or the new one (perhaps naming fewer
locators), every locator it names agrees with it, and the chain resolves, so the disk's
content is unchanged when the new parent holds the same data. Each step is made durable
(fsync) before the next, so the order also holds across a power loss. A crash between
steps 1 and 5 costs a redundant name, not the disk: one locator is enough to find the
parent. An image with a single path locator (blktap always writes three) cannot be
switched this way; its locator is written before the header, as the reference does.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, replace

from blktap.errors import (
    BlktapError,
    ChainTooDeep,
    FormatError,
    ParentLoop,
    ParentNotFound,
    UsageError,
)
from blktap.image.fileio import file_size_of, pwrite_all
from blktap.image.parents import ParentPolicy
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage

# The locator codes that carry a path (the others are left as they are, as the reference
# does).
PATH_CODES = (s.PLAT_CODE_MACX, s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU)
# How far up the new parent's chain to look for the child (a loop) before giving up.
MAX_CHAIN_DEPTH = 256
NULL_UUID = b"\0" * 16


@dataclass(frozen=True)
class NewParent:
    """The parent a child was pointed at."""

    path: str  # canonical path
    uuid: bytes  # all zero for a raw parent
    size: int  # virtual size (a raw parent: its file size)
    raw: bool


def set_parent(path: str, parent: str, *, raw: bool = False) -> NewParent:
    """Make the differencing VHD ``path`` a child of ``parent`` (a VHD, or with ``raw`` a
    raw image), rewriting its header and parent locators in a crash-safe order.

    Refused, with nothing written: a child that is not a differencing disk or has no path
    locator (EINVAL); a missing parent (ENOENT); a parent that is not a regular file or
    block device, not a VHD, has a null uuid, or is a VHD larger than the child (EINVAL);
    a parent that is the child itself or has it among its ancestors (ELOOP); a name that
    does not fit the header or a locator (ENAMETOOLONG) or is not ASCII (EILSEQ).
    """
    with VhdImage.open(path, writable=True, validate_bat=False) as image:
        return _set_parent(image, parent, raw)


def _set_parent(image: VhdImage, parent: str, raw: bool) -> NewParent:
    if not image.is_differencing or image.header is None:
        raise UsageError(f"{image.path} is not a differencing disk", errno.EINVAL)
    target, mtime = _describe_parent(image, parent, raw)
    old = image.header
    path_locs = [i for i, loc in enumerate(old.loc) if loc.code in PATH_CODES]
    if not path_locs:
        raise FormatError(f"{image.path} has no parent locator to rewrite", errno.EINVAL)
    new, rel = _reparented_header(image.path, old, target, mtime)
    # Every payload is built (and checked to fit) before the first write.
    payloads = {i: _payload(old.loc[i], rel, i) for i in path_locs}

    fd = image.fd
    offset = image.footer.data_offset
    if len(path_locs) == 1:
        (only,) = path_locs
        _put(fd, payloads[only], old.loc[only].data_offset)
        _put(fd, new.sealed().pack(), offset)
    else:
        first, rest = path_locs[0], path_locs[1:]
        _put(fd, _without(old, rest).sealed().pack(), offset)  # 1
        for i in rest:  # 2
            _put(fd, payloads[i], old.loc[i].data_offset)
        _put(fd, _without(new, [first]).sealed().pack(), offset)  # 3
        _put(fd, payloads[first], old.loc[first].data_offset)  # 4
        _put(fd, new.sealed().pack(), offset)  # 5
    image.header = new.sealed()
    return target


def _put(fd: int, data: bytes, offset: int) -> None:
    """One step of the sequence, durable before the next one starts."""
    pwrite_all(fd, data, offset)
    os.fsync(fd)


def _without(header: s.Header, indices: list[int]) -> s.Header:
    """A copy of ``header`` whose locators at ``indices`` are dropped (all-zero entries,
    which is how the format says "unused")."""
    out = header.sealed()
    for i in indices:
        out.loc[i] = s.ParentLocator()
    return out


def _reparented_header(child: str, old: s.Header, target: NewParent,
                       mtime: float) -> tuple[s.Header, str]:
    """The header naming the new parent, and the parent's path relative to the child."""
    name = os.path.basename(target.path)
    if not name:
        raise UsageError(f"{target.path}: no file name to record", errno.EINVAL)
    if not name.isascii():
        # The reference converts names through ASCII, and readers (ours included) only
        # accept ASCII names, so a child could never find this parent again.
        raise UsageError(f"{name!r}: parent names must be ASCII", errno.EILSEQ)
    if len(name.encode("utf-16-be")) > len(old.prt_name):
        raise UsageError(f"{name}: too long for the header's parent name",
                         errno.ENAMETOOLONG)
    new = old.sealed()
    new.prt_uuid = target.uuid
    new.prt_ts = s.vhd_time(mtime)
    new.prt_name = s.Header.encode_parent_name(name)
    rel = locators.relative_path(child, target.path)
    if not rel.isascii():
        raise UsageError(f"{rel!r}: parent paths must be ASCII", errno.EILSEQ)
    for i, loc in enumerate(new.loc):
        if loc.code in PATH_CODES:
            new.loc[i] = replace(loc, data_len=len(locators.encode(loc.code, rel)))
    return new, rel


def _payload(loc: s.ParentLocator, rel: str, index: int) -> bytes:
    """What goes into the locator's reserved space: the encoded path, then zeros over the
    rest of the space (so no tail of the old, longer path survives)."""
    data = locators.encode(loc.code, rel)
    space = locators.reserved_size(loc)
    if len(data) > space:
        raise UsageError(
            f"parent path {rel} needs {len(data)} bytes in parent locator {index} "
            f"({s.PLAT_CODE_NAMES.get(loc.code, hex(loc.code))}), which holds {space}",
            errno.ENAMETOOLONG)
    return data.ljust(space, b"\0")


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _describe_parent(image: VhdImage, parent: str, raw: bool) -> tuple[NewParent, float]:
    """Check the would-be parent and read what the child records of it, and its mtime."""
    try:
        real = os.path.realpath(parent, strict=True)
        st = os.stat(real)
    except OSError as exc:
        raise ParentNotFound(f"{parent}: {os.strerror(exc.errno)}", exc.errno) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{parent} is not a regular file or block device", errno.EINVAL)
    child = _identity(os.fstat(image.fd))
    if _identity(st) == child:
        raise ParentLoop(f"{image.path} cannot be its own parent")
    if raw:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{parent}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            size = file_size_of(fd)
        finally:
            os.close(fd)
        return NewParent(real, NULL_UUID, size, True), st.st_mtime
    with VhdImage.open(real, validate_bat=False) as vhd:
        uuid, size = vhd.footer.uuid, vhd.size
    if uuid == NULL_UUID:
        # A null parent uuid is how a child says "my parent is raw".
        raise FormatError(f"{parent} has a null uuid", errno.EINVAL)
    if size > image.size:
        # A snapshot is never smaller than its parent (snapshot refuses it too); a parent
        # larger than the child is a wrong parent, not a resized chain.
        raise UsageError(f"{parent} ({size} bytes) is larger than {image.path} "
                         f"({image.size} bytes)", errno.EINVAL)
    _refuse_loop(real, child, image.path)
    return NewParent(real, uuid, size, False), st.st_mtime


def _refuse_loop(parent: str, child: tuple[int, int], child_path: str) -> None:
    """Walk up from the new parent; meeting the child there would close a loop. The walk
    stops quietly where an ancestor cannot be read (no loop can go through it) or may not
    be opened (outside BLKTAP_PARENT_DIRS, not a file or device: such a chain cannot be
    opened anyway), and fails on a chain that already loops or is absurdly deep."""
    policy = ParentPolicy.from_env()
    seen: set[tuple[int, int]] = set()
    current = parent
    for _ in range(MAX_CHAIN_DEPTH):
        try:
            st = os.stat(current)
        except OSError:
            return
        ident = _identity(st)
        if ident == child:
            raise ParentLoop(f"{child_path} is an ancestor of {parent}: making it the "
                             f"parent would close a loop")
        if ident in seen:
            raise ParentLoop(f"the parent chain of {parent} loops back to {current}")
        seen.add(ident)
        try:
            with VhdImage.open(current, validate_bat=False) as vhd:
                if not vhd.is_differencing:
                    return
                current = policy.check(current, vhd.parent_path())
        except BlktapError:
            return
    raise ChainTooDeep(f"the parent chain of {parent} is deeper than {MAX_CHAIN_DEPTH}")
