"""Work on qcow2 layers of a chain: snapshot, rebase, commit, resize.

Each changes one file with the same ordering rule as the writes of
:mod:`blktap.image.qcow2.image`: new metadata is written and counted before the header
points at it, and the old is released only after. A process killed between two system
calls leaves the image reading as before or after the operation; ``qemu-img check`` finds
at most leaked clusters.

- :func:`snapshot`: a new, empty qcow2 leaf over an image (qcow2, VHD or raw).
- :func:`set_backing`: the backing file name and format rewritten in the header cluster,
  in one write (``rebase -u``).
- :func:`rebase`: the clusters whose content would change under the new backing file are
  copied into the image first, then the header is switched.
- :func:`commit`: what the image holds is written into its backing file (any format of
  the chain), through that file's own write path; the image itself is left unchanged,
  so it reads the same before, during and after.
- :func:`resize`: grow (a larger L1 table is written and counted before the header is
  switched to it, in one write with the new size), or shrink when nothing is stored past
  the new end.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from blktap.errors import UnsupportedImage, UsageError
from blktap.image.chain import QCOW2_BACKING_FORMATS, Chain, parse_spec, probe
from blktap.image.fileio import pwrite_all
from blktap.image.parents import ParentPolicy
from blktap.image.qcow2 import image as q2
from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.create import create
from blktap.image.qcow2.image import Qcow2Image, _be_array, _be_bytes
from blktap.image.raw import RawImage

SECTOR_SIZE = 512
# Commit and rebase move the disk in pieces of this many bytes at most.
CHUNK = 2 << 20
# Our format names as qemu writes them in the backing format extension.
QEMU_FORMAT_NAMES = {"qcow2": "qcow2", "raw": "raw", "vhd": "vpc", "qcow": "qcow"}


def backing_name(child: str, parent: str) -> str:
    """The name to store for ``parent`` in ``child``: relative to the child's folder when
    both are in the same folder (the pair can move together), else absolute."""
    child_dir = os.path.dirname(os.path.abspath(child))
    parent_abs = os.path.abspath(parent)
    if os.path.dirname(parent_abs) == child_dir:
        return os.path.basename(parent_abs)
    return parent_abs


def parent_format(spec: str) -> tuple[str, str, bool]:
    """(format, path, probed) of a backing file argument (a prefix, else probed)."""
    fmt, path = parse_spec(spec)
    if fmt is not None:
        return fmt, path, False
    return probe(path), path, True


def snapshot(child: str, parent: str, parent_fmt: str, *,
             cluster_size: int = 65536, extended_l2: bool = False) -> int:
    """Create ``child``, an empty qcow2 v3 image over ``parent`` (of ``parent_fmt``: qcow2,
    vhd or raw), of the parent's virtual size. Returns that size."""
    if parent_fmt not in QEMU_FORMAT_NAMES:
        raise UsageError(f"{parent}: a qcow2 image cannot have a {parent_fmt} backing file")
    with Chain.open(f"{parent_fmt}:{parent}", check_parent_uuid=False) as chain:
        size = chain.leaf.size
    create(child, size, cluster_size=cluster_size, extended_l2=extended_l2,
           backing_file=backing_name(child, parent),
           backing_fmt=QEMU_FORMAT_NAMES[parent_fmt])
    return size


def set_backing(path: str, backing: str | None, backing_fmt: str | None) -> None:
    """Rewrite the header cluster of ``path`` naming ``backing`` (None: no backing file)
    of qemu format ``backing_fmt``; other extensions are kept. One write: a killed
    process leaves the old name or the new one."""
    with Qcow2Image.open(path, writable=True) as image:
        h = image.header
        cs = image.cluster_size
        exts = [e for e in image.extensions if e.type != s.EXT_BACKING_FORMAT]
        if backing and backing_fmt:
            exts.insert(0, s.Extension(s.EXT_BACKING_FORMAT, backing_fmt.encode()))
        name = backing.encode() if backing else b""
        if len(name) > s.MAX_BACKING_NAME:
            raise UsageError(f"backing file name of {len(name)} bytes (at most 1023)")
        ext_raw = b"".join(e.pack() for e in exts) + s.Extension(s.EXT_END, b"").pack()
        start = h.extensions_offset
        if start + len(ext_raw) + len(name) > cs:
            raise UsageError(f"{path}: the header, its extensions and the backing file "
                             f"name do not fit in one cluster")
        h.backing_file_offset = start + len(ext_raw) if name else 0
        h.backing_file_size = len(name)
        first = (h.pack() + ext_raw + name).ljust(start + len(ext_raw) + len(name), b"\0")
        image._changing()
        pwrite_all(image.fd, first, 0)
        os.fsync(image.fd)


@dataclass(frozen=True)
class RebaseResult:
    backing: str | None
    compared_bytes: int
    copied_bytes: int


def rebase(path: str, new: str | None, new_fmt: str | None, *, safe: bool = True,
           parent_policy: ParentPolicy | None = None) -> RebaseResult:
    """Give the qcow2 image ``path`` the backing file ``new`` (of format ``new_fmt``;
    None: no backing file). ``safe``: first copy into the image every part it does not
    hold whose content differs between the old backing chain and the new one, so that it
    reads the same afterwards (qemu-img rebase). The header is switched last."""
    if new is not None and new_fmt not in QEMU_FORMAT_NAMES:
        raise UsageError(f"{new}: a qcow2 image cannot have a {new_fmt} backing file")
    compared = copied = 0
    if safe:
        with Chain.open(f"qcow2:{path}", writable=True, check_parent_uuid=False,
                        parent_policy=parent_policy) as old:
            top = old.leaf
            assert isinstance(top, Qcow2Image)
            if new is not None:
                target = Chain.open(f"{new_fmt}:{new}", check_parent_uuid=False,
                                    parent_policy=parent_policy)
                if any(os.path.samestat(os.fstat(layer.fd), os.fstat(top.fd))
                       for layer in target.layers):
                    target.close()
                    raise UsageError(f"{new}: its chain contains {path} itself")
            else:
                target = None
            try:
                compared, copied = _copy_differences(old, top, target)
            finally:
                if target is not None:
                    target.close()
            old.flush()
    set_backing(path, backing_name(path, new) if new else None,
                QEMU_FORMAT_NAMES[new_fmt] if new is not None and new_fmt else None)
    return RebaseResult(new, compared, copied)


def _copy_differences(old: Chain, top: Qcow2Image, target: Chain | None
                      ) -> tuple[int, int]:
    compared = copied = 0
    buf_old = bytearray(CHUNK)
    buf_new = bytearray(CHUNK)
    holes = [(start, start + n) for start, n, kind, _ in
             top.runs(0, top.sectors * SECTOR_SIZE) if kind == q2.HOLE]
    # Only where the old chain or the new one holds something can they differ: where
    # neither does, both read zeros (a 100 TiB image with little data is quick).
    held = [(e.offset, e.offset + e.length) for e in old.map() if e.depth]
    if target is not None:
        held += [(e.offset, e.offset + e.length) for e in target.map()
                 if e.depth is not None]
    for start, end in _intersect(holes, _merge(held)):
        pos = start
        while pos < end:
            step = min(CHUNK - pos % CHUNK, end - pos)
            sector, count = pos // SECTOR_SIZE, step // SECTOR_SIZE
            view_old = memoryview(buf_old)[:step]
            view_new = memoryview(buf_new)[:step]
            old.readinto(sector, view_old)
            if target is None:
                view_new[:] = bytes(step)
            else:
                _read_padded(target, sector, count, view_new)
            compared += step
            if view_old != view_new:
                old.write(sector, view_old)
                copied += step
            pos += step
    return compared, copied


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _intersect(xs: list[tuple[int, int]], ys: list[tuple[int, int]]
               ) -> list[tuple[int, int]]:
    """The overlap of two sorted lists of disjoint spans."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _read_padded(chain: Chain, sector: int, count: int, view: memoryview) -> None:
    """Read ``count`` sectors; what lies past the end of the chain's disk reads zeros."""
    have = max(0, min(count, chain.sectors - sector))
    if have:
        chain.readinto(sector, view[: have * SECTOR_SIZE])
    view[have * SECTOR_SIZE :] = bytes(len(view) - have * SECTOR_SIZE)


@dataclass(frozen=True)
class CommitResult:
    backing: str
    backing_format: str
    bytes: int


def commit(path: str, *, parent_policy: ParentPolicy | None = None,
           progress: object = None) -> CommitResult:
    """Write what the qcow2 image ``path`` holds (data and zeros) into its backing file,
    through the backing file's own format (qcow2, VHD or raw). ``path`` is not changed:
    the chain reads the same throughout. A backing file smaller than the image is grown
    first when its format can (qcow2, raw)."""
    with Chain.open(f"qcow2:{path}", check_parent_uuid=False,
                    parent_policy=parent_policy) as chain:
        top = chain.leaf
        assert isinstance(top, Qcow2Image)
        if top.backing_file is None or len(chain.layers) < 2:
            raise UsageError(f"{path} has no backing file to commit into")
        base = chain.layers[1]
        base_path = base.path
        base_fmt = "qcow2" if isinstance(base, Qcow2Image) else \
            "raw" if isinstance(base, RawImage) else "vhd"
        runs = [(start, n, kind) for start, n, kind, _ in
                top.runs(0, top.sectors * SECTOR_SIZE) if kind != q2.HOLE]
        if base.size < top.size:
            if base_fmt == "qcow2":
                resize(base_path, top.size)
            elif base_fmt == "raw":
                os.truncate(base_path, top.size)
            else:
                raise UnsupportedImage(f"{base_path}: the VHD backing file is smaller than "
                                       f"{path}; resize it first")
        done = 0
        with Chain.open(f"{base_fmt}:{base_path}", writable=True, check_parent_uuid=False,
                        parent_policy=parent_policy) as below:
            dest = below.leaf
            buf = bytearray(CHUNK)
            for start, n, kind in runs:
                pos, end = start, start + n
                while pos < end:
                    step = min(CHUNK - pos % CHUNK, end - pos)
                    sector, count = pos // SECTOR_SIZE, step // SECTOR_SIZE
                    if kind == q2.ZERO and isinstance(dest, Qcow2Image):
                        dest.write_zeroes(sector, count)
                    else:
                        view = memoryview(buf)[:step]
                        chain.readinto(sector, view)
                        below.write(sector, view)
                    done += step
                    pos += step
            below.flush()
    return CommitResult(base_path, base_fmt, done)


def resize(path: str, size: int) -> tuple[int, int]:
    """Set the virtual size of the qcow2 image ``path`` to ``size`` bytes (a multiple of
    512). Growing writes a larger L1 table when needed; shrinking is refused unless
    no data is stored past the new end (holes and zero clusters may be cut). Returns
    (old size, new size)."""
    if size <= 0 or size % SECTOR_SIZE:
        raise UsageError(f"invalid size {size}: a qcow2 size is a positive multiple of 512")
    with Qcow2Image.open(path, writable=True) as image:
        h = image.header
        old = h.size
        if size == old:
            return old, size
        if image.bitmaps is not None and h.autoclear_features & s.AUTOCLEAR_BITMAPS:
            raise UnsupportedImage(f"{path}: has persistent bitmaps; resizing it is not "
                                   f"supported")
        if size < old:
            stored = [(start, n) for start, n, kind, _ in image.runs(size, old - size)
                      if kind in (q2.DATA, q2.COMPRESSED)]
            if stored:
                start, n = stored[0]
                raise UsageError(f"{path}: cannot shrink to {size} bytes: data is stored "
                                 f"at {start}..{start + n} (only an empty tail can be cut)",
                                 errno.ENOTEMPTY)
        span = image.cluster_size * image.l2_entries
        need = -(-size // span)
        image._changing()
        if need > h.l1_size:
            if need * 8 > s.MAX_L1_BYTES:
                raise UsageError(f"size {size} is too large for {image.cluster_size}-byte "
                                 f"clusters")
            _grow_l1(image, need, size)
        else:
            pwrite_all(image.fd, size.to_bytes(8, "big"), 24)
            os.fsync(image.fd)
            h.size = size
    return old, size


def _grow_l1(image: Qcow2Image, entries: int, size: int) -> None:
    """A new L1 table of ``entries`` entries at the end of the file: written, counted,
    then the header switched to it (size, L1 size and offset in one write), then the old
    table released."""
    h = image.header
    rc = image.refcounts
    assert rc is not None
    cs = image.cluster_size
    old_off, old_clusters = h.l1_table_offset, max(1, -(-h.l1_size * 8 // cs))
    clusters = -(-entries * 8 // cs)
    table = _be_array(_be_bytes(image.l1))
    table.extend([0] * (entries - len(table)))
    raw = _be_bytes(table).ljust(clusters * cs, b"\0")
    new = rc.allocate(clusters)
    pwrite_all(image.fd, raw, new)
    rc.update(new >> image.cluster_bits, clusters, +1)
    os.fsync(image.fd)
    # Bytes 24..48 of the header: size, crypt method (unchanged), L1 size, L1 offset.
    fields = size.to_bytes(8, "big") + h.crypt_method.to_bytes(4, "big") + \
        entries.to_bytes(4, "big") + new.to_bytes(8, "big")
    pwrite_all(image.fd, fields, 24)
    os.fsync(image.fd)
    h.size, h.l1_size, h.l1_table_offset = size, entries, new
    image.l1 = table
    image._release(old_off, old_clusters)


def backing_format_of(fmt: str | None) -> str | None:
    """Our format name for a qemu backing format name (vpc -> vhd)."""
    return QCOW2_BACKING_FORMATS.get(fmt) if fmt else None
