"""Creating VHDs: new disks (fixed or dynamic) and differencing snapshots.

A new image is written completely under a temporary name in the target folder and then
linked into place, so a crash never leaves a half-made image under the real name, and an
existing file is never overwritten (link(2) fails with EEXIST).
"""

from __future__ import annotations

import errno
import os
import time
import uuid as _uuid
from dataclasses import dataclass

from blktap.errors import ChainTooDeep, FormatError, ParentLoop, UsageError
from blktap.image.fileio import file_size_of, pwrite_all, staged_path
from blktap.image.parents import ParentPolicy, default_policy
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import read_keyhash

# The locators blktap writes, in its order.
SNAPSHOT_LOCATOR_CODES = (s.PLAT_CODE_MACX, s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU)


def round_size(size: int, block_size: int = s.DEFAULT_BLOCK_SIZE) -> int:
    """Virtual sizes are whole blocks: blktap rounds them up to 2 MiB."""
    return -(-size // block_size) * block_size


@dataclass
class ParentInfo:
    """What a child needs to know of its parent."""

    path: str
    size: int
    uuid: bytes  # all zero for a raw parent
    mtime: int
    keyhash: tuple[int, bytes, bytes] | None = None  # (cookie, nonce, hash)
    rbd: bool = False  # ``path`` is the rbd: spec of a snapshot on a Ceph cluster


def _metadata_layout(max_bat: int) -> tuple[int, int, int, int]:
    """(BAT offset, batmap header offset, batmap offset, batmap sectors)."""
    table = s.DEFAULT_TABLE_OFFSET
    bat_bytes = s.pad_sector(max_bat * 4)
    batmap_hdr = table + bat_bytes
    batmap_secs = max(1, s.sectors_round_up(-(-max_bat // 8)))
    return table, batmap_hdr, batmap_hdr + s.BATMAP_HEADER_SIZE, batmap_secs


def _validate_size(size: int, what: str = "size") -> None:
    if size <= 0:
        raise UsageError(f"invalid {what}: {size}")
    if size > s.MAX_VHD_SIZE_XENSERVER:
        raise UsageError(f"{what} {size} is larger than the largest VHD "
                         f"({s.MAX_VHD_SIZE_XENSERVER >> 30} GiB)")


def _new_footer(size: int, disk_type: int, timestamp: int | None,
                uuid: bytes | None) -> s.Footer:
    cyl, heads, spt = s.geometry(size)
    return s.Footer(
        data_offset=s.FIXED_DATA_OFFSET if disk_type == s.DISK_TYPE_FIXED
        else s.DYNAMIC_DATA_OFFSET,
        timestamp=s.vhd_time() if timestamp is None else timestamp,
        orig_size=size,
        curr_size=size,
        geometry=s.pack_geometry(cyl, heads, spt),
        type=disk_type,
        uuid=uuid or _uuid.uuid4().bytes,
    ).sealed()


def _build_dynamic(size: int, max_bat: int, footer: s.Footer,
                   parent: ParentInfo | None, locator_paths: str | None) -> bytes:
    """The whole content of a new dynamic or differencing image."""
    table, batmap_hdr_off, batmap_off, batmap_secs = _metadata_layout(max_bat)
    header = s.Header(table_offset=table, max_bat_size=max_bat)
    end = batmap_off + batmap_secs * s.SECTOR_SIZE
    payloads: list[tuple[int, bytes]] = []
    if parent is not None:
        header.prt_uuid = parent.uuid
        header.prt_ts = s.vhd_time(parent.mtime)
        if parent.rbd:  # one MACX locator holding the spec (locators.py)
            names = [(s.PLAT_CODE_MACX, locators.encode_rbd(parent.path))]
            header.prt_name = s.Header.encode_parent_name(parent.path)
        else:
            assert locator_paths is not None
            names = [(code, locators.encode(code, locator_paths))
                     for code in SNAPSHOT_LOCATOR_CODES]
            header.prt_name = s.Header.encode_parent_name(os.path.basename(parent.path))
        for i, (code, data) in enumerate(names):
            space = s.pad_sector(len(data))
            header.loc[i] = s.ParentLocator(code=code, data_space=space,
                                            data_len=len(data), data_offset=end)
            payloads.append((end, data))
            end += space
    header = header.sealed()
    batmap = bytes(batmap_secs * s.SECTOR_SIZE)
    bhdr = s.BatmapHeader(batmap_offset=batmap_off, batmap_size=batmap_secs)
    bhdr.checksum = s.batmap_checksum(batmap, size)
    if parent is not None and parent.keyhash is not None:
        bhdr.keyhash_cookie, bhdr.keyhash_nonce, bhdr.keyhash_hash = parent.keyhash
    image = bytearray(end + s.FOOTER_SIZE)
    fraw = footer.pack()
    image[0 : s.FOOTER_SIZE] = fraw
    image[s.FOOTER_SIZE : s.FOOTER_SIZE + s.HEADER_SIZE] = header.pack()
    # Unused entries are 0xFFFFFFFF; the padding to a whole sector stays zero.
    image[table : table + max_bat * 4] = b"\xff" * (max_bat * 4)
    image[batmap_hdr_off : batmap_hdr_off + s.BATMAP_HEADER_SIZE] = bhdr.pack()
    for off, data in payloads:
        image[off : off + len(data)] = data
    image[end : end + s.FOOTER_SIZE] = fraw
    return bytes(image)


def _publish(path: str, writer) -> None:  # noqa: ANN001 - a callable taking an fd
    """Write a new file aside, then link it into place (see fileio.staged_path)."""
    with staged_path(path) as tmp:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)  # the stage's own, empty file
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            writer(fd)
            os.fsync(fd)
        finally:
            os.close(fd)


def create(path: str, size: int, *, fixed: bool = False, prealloc_size: int | None = None,
           timestamp: int | None = None, uuid: bytes | None = None) -> None:
    """Create a VHD of ``size`` bytes (rounded up to whole 2 MiB blocks).

    ``fixed`` makes a fixed disk whose data space is reserved; ``prealloc_size`` sizes the
    BAT and batmap of a dynamic disk for that many bytes, so that it can later grow that
    far by a fast resize.
    """
    _validate_size(size)
    size = round_size(size)
    if prealloc_size is not None:
        _validate_size(prealloc_size, "metadata size")
        prealloc_size = round_size(prealloc_size)
        if prealloc_size < size:
            raise UsageError(f"metadata size {prealloc_size} is smaller than the disk size "
                             f"{size}")
    if fixed:
        footer = _new_footer(size, s.DISK_TYPE_FIXED, timestamp, uuid)

        def write_fixed(fd: int) -> None:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
                os.ftruncate(fd, size)
            pwrite_all(fd, footer.pack(), size)

        _publish(path, write_fixed)
        return
    max_bat = (prealloc_size or size) // s.DEFAULT_BLOCK_SIZE
    footer = _new_footer(size, s.DISK_TYPE_DYNAMIC, timestamp, uuid)
    content = _build_dynamic(size, max_bat, footer, None, None)
    _publish(path, lambda fd: pwrite_all(fd, content, 0))


def parent_info(path: str, raw: bool) -> ParentInfo:
    """Describe a would-be parent; ``raw`` when it is a raw image rather than a VHD."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
    real = os.path.realpath(path)
    if raw:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = file_size_of(fd)
        finally:
            os.close(fd)
        return ParentInfo(real, size, b"\0" * 16, int(st.st_mtime))
    with VhdImage.open(real) as img:
        # A snapshot inherits its parent's key hash, wherever the parent keeps it (the
        # batmap, or an xattr for a VHD without one).
        recorded = read_keyhash(img)
        keyhash = None
        if recorded.present:
            keyhash = (recorded.cookie, recorded.nonce, recorded.hash)
        return ParentInfo(real, img.size, img.footer.uuid, int(st.st_mtime), keyhash)


def rbd_parent_info(text: str) -> ParentInfo:
    """Describe a snapshot on a Ceph cluster as a would-be parent (connects to it). Only
    a snapshot will do: an image may change under its child. The spec may name the
    cluster's configuration and the client (``conf``, ``id``), nothing else: a child
    names no other Ceph option (ParentPolicy.check_rbd refuses them when opening)."""
    from blktap.image.parents import RBD_PARENT_KEYS
    from blktap.image.rbd import RbdImage, parse_spec

    spec = parse_spec(text)
    if not spec.snap:
        raise UsageError(f"rbd:{spec.name()}: a parent on Ceph must be a snapshot "
                         f"(rbd snap create {spec.name()}@NAME; rbd snap protect it)")
    if spec.options:
        raise UsageError(f"rbd:{spec.name()}: a parent named in a VHD may only say "
                         f"{' and '.join(k + '=' for k in RBD_PARENT_KEYS)}; set "
                         f"{', '.join(sorted(spec.options))} in the ceph.conf it names")
    name = spec.text()
    try:
        s.Header.encode_parent_name(name)
    except ValueError:
        raise UsageError(f"{name}: longer than the 256 characters a VHD header holds",
                         errno.ENAMETOOLONG) from None
    with RbdImage.open(spec) as image:
        size = image.size
    return ParentInfo(name, size, b"\0" * 16, int(time.time()), rbd=True)


def chain_depth(path: str, parent_policy: ParentPolicy | None = None) -> int:
    """Number of images in the chain starting at ``path`` (a raw parent counts), with the
    loop, depth and parent policy checks of :meth:`Chain.open`."""
    from blktap.image.chain import Chain  # the chain module builds on this package

    with Chain.open(f"vhd:{path}", check_parent_uuid=False, ciphertext=True,
                    parent_policy=parent_policy) as chain:
        return len(chain)


def find_snapshot_target(parent: str, parent_policy: ParentPolicy | None = None
                         ) -> tuple[str, bool]:
    """Skip empty differencing ancestors: an empty differencing disk adds nothing, so a
    snapshot of it can hang off its first non-empty ancestor instead. Returns the target
    and whether it is a raw image. Each ancestor followed must pass ``parent_policy``
    (default: the environment's)."""
    policy = default_policy(parent_policy)
    seen: set[str] = set()
    current = os.path.realpath(parent)
    while True:
        if current in seen:
            raise ParentLoop(f"{parent}: the parent chain loops back to {current}")
        seen.add(current)
        with VhdImage.open(current) as img:
            if not img.is_differencing or img.allocated_blocks() or \
                    img.parent_rbd is not None:  # (a Ceph parent is not linked to here)
                return current, False
            nxt = policy.check(current, img.parent_path())
            if img.parent_is_raw:
                return nxt, True
            current = nxt


def snapshot(child: str, parent: str, *, raw_parent: bool = False,
             prealloc_size: int | None = None, depth_limit: int | None = None,
             skip_empty: bool = True, timestamp: int | None = None,
             uuid: bytes | None = None, parent_policy: ParentPolicy | None = None) -> str:
    """Create ``child`` as a differencing VHD over ``parent``; returns the parent actually
    used (``skip_empty`` links past empty differencing ancestors). ``parent`` is the
    caller's choice; the ancestors found through locators (skipped or counted) must pass
    ``parent_policy`` (default: the environment's)."""
    if parent.startswith("rbd:"):
        return _snapshot_rbd(child, parent, prealloc_size, timestamp, uuid)
    target, target_raw = parent, raw_parent
    if not raw_parent and skip_empty:
        target, target_raw = find_snapshot_target(parent, parent_policy)
    info = parent_info(target, target_raw)
    if depth_limit is not None and not target_raw:
        depth = chain_depth(info.path, parent_policy)
        if depth >= depth_limit:
            raise ChainTooDeep(f"snapshot depth exceeded: current depth: {depth}, "
                               f"limit: {depth_limit}", errno.ENOSPC)
    # The child is exactly as large as the parent it was asked for (when empty ancestors
    # were skipped, the supplied parent may be larger than the one linked to).
    size = info.size
    if os.path.realpath(parent) != info.path:
        size = max(size, parent_info(parent, raw_parent).size)
    _write_differencing(child, size, info, locators.relative_path(child, info.path),
                        prealloc_size=prealloc_size, timestamp=timestamp, uuid=uuid)
    return info.path


def _snapshot_rbd(child: str, parent: str, prealloc_size: int | None,
                  timestamp: int | None, uuid: bytes | None) -> str:
    """A differencing VHD over a snapshot on Ceph: a raw parent (no uuid) that the one
    MACX locator names by its spec. Returns the spec as stored."""
    info = rbd_parent_info(parent)
    _write_differencing(child, info.size, info, None, prealloc_size=prealloc_size,
                        timestamp=timestamp, uuid=uuid)
    return info.path


def differencing(path: str, size: int, parent: ParentInfo, locator_path: str, *,
                 uuid: bytes | None = None, timestamp: int | None = None) -> None:
    """Create a differencing VHD at ``path`` from what it records of its parent, without
    opening the parent: for a parent that is still being built (blktap convert
    --keep-chain writes a whole chain aside). ``parent.path`` is the parent's final name,
    ``locator_path`` the name the locators hold (relative to ``path``'s folder: ``./p``)."""
    _write_differencing(path, size, parent, locator_path, timestamp=timestamp, uuid=uuid)


def _write_differencing(path: str, size: int, parent: ParentInfo, locator: str | None, *,
                        prealloc_size: int | None = None, timestamp: int | None = None,
                        uuid: bytes | None = None) -> None:
    """The one way a differencing VHD is written: ``locator`` is what its locators hold
    (None: the parent names itself, as a Ceph spec does); ``prealloc_size`` sizes the BAT
    for a disk that may grow to that size."""
    size = s.pad_sector(size)
    _validate_size(size)
    max_bat = -(-size // s.DEFAULT_BLOCK_SIZE)
    if prealloc_size is not None:
        prealloc_size = round_size(prealloc_size)
        if prealloc_size < size:
            raise UsageError(f"metadata size {prealloc_size} is smaller than the disk size "
                             f"{size}")
        max_bat = prealloc_size // s.DEFAULT_BLOCK_SIZE
    footer = _new_footer(size, s.DISK_TYPE_DIFF, timestamp, uuid)
    content = _build_dynamic(size, max_bat, footer, parent, locator)
    _publish(path, lambda fd: pwrite_all(fd, content, 0))
