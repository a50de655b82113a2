"""Converting a chain without flattening it (``blktap convert --keep-chain``), and
converting a disk onto an existing base (``blktap convert -B BASE``).

Keeping the chain: every layer of the source chain becomes a layer of the target format
(VHD or qcow2) holding only what its source layer holds; each new layer links to the new
layer made from its source's parent. Data is read from the source: the sectors a layer
holds are read through the source chain from that layer down, so an encrypted VHD layer is
decrypted and a qcow2 target's partly written cluster is filled (copy on write) from the
source's lower layers, which read as the new parents do.

Onto a base: the new image links to BASE and holds what the source disk reads as wherever
that differs from what BASE reads as (both chains' allocated ranges are compared; ranges
neither holds are not read).

Atomicity: every new layer is built aside (fileio.staged_path) and the layers are linked
into place only once all are complete, base first. If linking one fails, the layers this
call already linked are removed again (only files that are still the ones it made).
"""

from __future__ import annotations

import errno
import os
import time
import uuid as _uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Any

from blktap.errors import UsageError
from blktap.image.chain import SECTOR_SIZE, Chain, Layer
from blktap.image.fileio import staged_path
from blktap.image.qcow2.create import create as create_qcow2
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.raw import RawImage
from blktap.image.rbd import RbdImage
from blktap.image.vhd import locators
from blktap.image.vhd.create import ParentInfo, differencing, round_size
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import is_encrypted

# Formats a kept chain can be made of (raw has no parent link).
CHAIN_FORMATS = ("vhd", "qcow2")
# The backing format a qcow2 layer records for a parent of each format (qemu's names).
QEMU_FORMAT = {"vhd": "vpc", "qcow2": "qcow2", "raw": "raw"}
EXTENSION = {"vhd": "vhd", "qcow2": "qcow2", "raw": "raw"}
# Data moves in chunks of this many bytes; sparse copies skip all-zero pieces.
CHUNK = 2 << 20
PIECE = 64 << 10
NULL_UUID = b"\0" * 16
ZERO_PIECE = bytearray(PIECE)  # bytearray == memoryview compares with memcmp

Progress = Callable[[int], None]
Image = VhdImage | Qcow2Image


def _no_progress(_done: int) -> None:
    pass


@dataclass
class NewLayer:
    """One layer of a converted chain: its final name, format, size and data written."""

    path: str
    fmt: str
    size: int
    written: int = 0


# ================================================================================== names
def layer_names(chain: Chain, dst: str, fmt: str, pattern: str) -> list[str]:
    """The final names of a kept chain's layers, leaf first: ``dst`` for the leaf, and for
    each parent ``pattern`` in ``dst``'s folder. The pattern's fields: ``{name}`` (the
    source layer's file name without its extension), ``{depth}`` (1 for the leaf's parent)
    and ``{ext}`` (the target format's extension)."""
    folder = os.path.dirname(dst)
    names = [dst]
    for depth, layer in enumerate(chain.layers[1:], 1):
        if isinstance(layer, RbdImage):
            raise UsageError(f"{layer.path}: an RBD layer cannot be kept in a chain of "
                             f"files; convert without --keep-chain to flatten it")
        stem = os.path.splitext(os.path.basename(layer.path))[0]
        try:
            name = pattern.format(name=stem, depth=depth, ext=EXTENSION[fmt])
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"invalid layer name pattern {pattern!r}: {exc} (fields: "
                             f"{{name}}, {{depth}}, {{ext}})") from None
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"layer name pattern {pattern!r} gives {name!r} for "
                             f"{layer.path}: a file name in DST's folder is needed")
        names.append(os.path.join(folder, name))
    seen: dict[str, int] = {}
    for depth, name in enumerate(names):
        real = os.path.realpath(name)
        if real in seen:
            raise UsageError(f"layers {seen[real]} and {depth} of the chain would both be "
                             f"named {name}; use a --layer-name pattern with {{depth}}")
        seen[real] = depth
    return names


def check_targets(names: list[str], sources: list[Chain], replace: bool) -> None:
    """No new layer may take the name of an existing file (unless ``replace``, and then
    only a regular file) nor of any layer of the ``sources``."""
    identities = set()
    for chain in sources:
        for layer in chain.layers:
            if not isinstance(layer, RbdImage):
                st = os.fstat(layer.fd)
                identities.add((st.st_dev, st.st_ino))
    for name in names:
        folder = os.path.dirname(os.path.abspath(name))
        if not os.path.isdir(folder):
            raise UsageError(f"{name}: folder {folder} does not exist", errno.ENOENT)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in identities:
            raise UsageError(f"{name} is part of the source chain; refusing to replace it")
        if not replace:
            what = "" if name == names[0] else \
                " (a layer of the converted chain would take that name: --layer-name " \
                "picks other names)"
            raise UsageError(f"{name}: already exists{what}; use --force to replace it",
                             errno.EEXIST)
        if not os.path.isfile(name):
            raise UsageError(f"{name}: not a regular file; --force only replaces regular "
                             f"files")


# ================================================================================== keep
def convert_chain(chain: Chain, names: list[str], fmt: str, *, sparse: bool = True,
                  replace: bool = False, options: dict[str, Any] | None = None,
                  progress: Progress = _no_progress) -> list[NewLayer]:
    """Write each layer of ``chain`` as a new ``fmt`` image named ``names[depth]``; returns
    the new layers, leaf first. ``options`` are qcow2 creation options (not a backing
    file); ``sparse`` skips all-zero pieces of the base layer (the upper layers keep their
    zeros: they hide what lies below). ``progress`` gets the bytes of the source layers
    gone through so far."""
    if fmt not in CHAIN_FORMATS:
        raise UsageError(f"a kept chain is made of {' or '.join(CHAIN_FORMATS)} images; "
                         f"{fmt} has no parent link")
    options = dict(options or {})
    if "backing_file" in options or "backing_fmt" in options:
        raise UsageError("--keep-chain links each layer to its converted parent: no "
                         "backing_file option")
    if len(names) != len(chain):
        raise UsageError("one name per layer is needed")
    layers = [NewLayer(name, fmt, _target_size(fmt, layer.size))
              for name, layer in zip(names, chain.layers, strict=True)]
    uuids = [_uuid.uuid4().bytes for _ in layers]
    # Progress: the layers are written base first, each after those below it.
    offsets = [sum(x.size for x in chain.layers[i + 1 :]) for i in range(len(chain))]
    made: list[tuple[str, tuple[int, int]]] = []
    try:
        with ExitStack() as stack:
            # Entered leaf first, so that on the way out the base is linked first: a
            # child never appears before its parent.
            stages = [stack.enter_context(staged_path(x.path, replace=replace))
                      for x in layers]
            for depth in reversed(range(len(chain))):
                stage = stages[depth]
                image = _create_layer(chain, depth, stage, layers, uuids, options)
                with image:
                    layers[depth].written = _copy_layer(
                        chain, depth, image, sparse and depth == len(chain) - 1,
                        lambda done, base=offsets[depth]: progress(base + done))
                st = os.stat(stage)
                made.append((layers[depth].path, (st.st_dev, st.st_ino)))
    except BaseException:
        _remove_linked(made)
        raise
    return layers


def _target_size(fmt: str, size: int) -> int:
    return round_size(size) if fmt == "vhd" else -(-size // SECTOR_SIZE) * SECTOR_SIZE


def _remove_linked(made: list[tuple[str, tuple[int, int]]]) -> None:
    """Unlink the names that were linked to the files this call made (a failed run)."""
    for name, ident in made:
        with suppress(OSError):
            st = os.stat(name)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(name)


def _create_layer(chain: Chain, depth: int, stage: str, layers: list[NewLayer],
                  uuids: list[bytes], options: dict[str, Any]) -> Image:
    """Create the new layer at ``stage`` (linked to the new parent's final name) and open
    it for writing."""
    me = layers[depth]
    parent = layers[depth + 1] if depth + 1 < len(layers) else None
    if me.fmt == "vhd":
        if parent is None:
            create_vhd(stage, me.size, uuid=uuids[depth])
        else:
            info = ParentInfo(os.path.abspath(parent.path), parent.size, uuids[depth + 1],
                              int(time.time()))
            differencing(stage, me.size, info,
                         locators.relative_path(me.path, parent.path), uuid=uuids[depth])
        return VhdImage.open(stage, writable=True)
    extra: dict[str, Any] = {}
    if parent is not None:
        extra = {"backing_file": _backing_name(me.path, parent.path),
                 "backing_fmt": QEMU_FORMAT[parent.fmt]}
    create_qcow2(stage, me.size, **options, **extra)
    image = Qcow2Image.open(stage, writable=True)
    if parent is not None:
        # The new parent chain reads as the source chain from the next layer down.
        image.read_below = lambda sector, count, view: chain.read_from(
            depth + 1, sector, view[: count * SECTOR_SIZE])
    return image


def _backing_name(child: str, parent: str) -> str:
    """The backing file name a qcow2 child records: relative to its folder."""
    return os.path.relpath(os.path.realpath(parent),
                           os.path.dirname(os.path.realpath(child)))


def _sector_chunks(first: int, count: int) -> Iterator[tuple[int, int]]:
    """Split a run of sectors at CHUNK boundaries of the disk."""
    per = CHUNK // SECTOR_SIZE
    end = first + count
    while first < end:
        stop = min(end, (first // per + 1) * per)
        yield first, stop - first
        first = stop


def _nonzero_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """(start, stop) byte runs of ``view`` made of PIECE-sized pieces holding data."""
    start = None
    for pos in range(0, len(view), PIECE):
        piece = view[pos : pos + PIECE]
        zero = ZERO_PIECE == piece if len(piece) == PIECE else not any(piece)
        if zero:
            if start is not None:
                yield start, pos
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield start, len(view)


def _copy_layer(chain: Chain, depth: int, image: Image, sparse: bool,
                progress: Progress) -> int:
    """Write what the source layer at ``depth`` holds into ``image``; returns the bytes
    written."""
    buf = bytearray(CHUNK)
    written = 0
    for first, count, zero in chain.own_runs(depth):
        if zero and sparse:  # the base: zeros are what nothing reads as
            continue
        if zero and isinstance(image, Qcow2Image):
            image.write_zeroes(first, count)
            continue
        for sector, n in _sector_chunks(first, count):
            view = memoryview(buf)[: n * SECTOR_SIZE]
            if zero:
                view[:] = bytes(len(view))
            else:
                chain.read_from(depth, sector, view)
            if sparse:
                for start, stop in _nonzero_runs(view):
                    image.write(sector + start // SECTOR_SIZE, view[start:stop])
                    written += stop - start
            else:
                image.write(sector, view)
                written += len(view)
            progress((sector + n) * SECTOR_SIZE)
    image.flush()
    return written


# ================================================================================== onto
def base_link(base: Chain, fmt: str) -> None:
    """Whether an image of format ``fmt`` can have ``base``'s top layer as its parent."""
    top: Layer = base.leaf
    if isinstance(top, RbdImage):
        raise UsageError(f"{top.path}: an RBD image cannot be the base of a new file")
    if fmt == "vhd" and not isinstance(top, VhdImage | RawImage):
        raise UsageError(f"{top.path}: a VHD's parent is a VHD or a raw image, not "
                         f"{type(top).__name__.removesuffix('Image').lower()}")
    if isinstance(top, VhdImage) and is_encrypted(top):
        raise UsageError(f"{top.path}: an encrypted base is not supported by convert -B")


def layer_format(layer: Layer) -> str:
    if isinstance(layer, VhdImage):
        return "vhd"
    if isinstance(layer, Qcow2Image):
        return "qcow2"
    if isinstance(layer, RawImage):
        return "raw"
    raise UsageError(f"{layer.path}: cannot be the base of a new image")


def convert_onto(src: Chain, base: Chain, stage: str, dst: str, fmt: str, *,
                 options: dict[str, Any] | None = None,
                 progress: Progress = _no_progress) -> NewLayer:
    """Make the image at ``stage`` (to be named ``dst``) a child of ``base`` holding what
    ``src`` reads as wherever that differs from ``base``; returns it."""
    if fmt not in CHAIN_FORMATS:
        raise UsageError(f"-B needs an output format with a parent link "
                         f"({' or '.join(CHAIN_FORMATS)}), not {fmt}")
    options = dict(options or {})
    if "backing_file" in options or "backing_fmt" in options:
        raise UsageError("-B names the backing file: no backing_file option")
    base_link(base, fmt)
    top = base.leaf
    new = NewLayer(dst, fmt, _target_size(fmt, src.size))
    image: Image
    if fmt == "vhd":
        uuid = top.footer.uuid if isinstance(top, VhdImage) else NULL_UUID
        info = ParentInfo(os.path.realpath(top.path), top.size, uuid,
                          int(os.fstat(top.fd).st_mtime))
        differencing(stage, new.size, info, locators.relative_path(dst, top.path))
        image = VhdImage.open(stage, writable=True)
    else:
        create_qcow2(stage, new.size, backing_file=_backing_name(dst, top.path),
                     backing_fmt=QEMU_FORMAT[layer_format(top)], **options)
        image = Qcow2Image.open(stage, writable=True)
        image.read_below = lambda sector, count, view: base.read_from(
            0, sector, view[: count * SECTOR_SIZE])
    with image:
        new.written = _copy_differences(src, base, image, progress)
    return new


def _held(chain: Chain, end: int) -> list[tuple[int, int]]:
    return [(e.offset, min(e.offset + e.length, end)) for e in chain.map()
            if e.depth is not None and e.offset < end]


def _ranges(src: Chain, base: Chain) -> Iterator[tuple[int, int]]:
    """Sector runs that either chain holds data for, merged, inside ``src``'s disk."""
    end = src.size
    spans = sorted(_held(src, end) + _held(base, end))
    cur: list[int] | None = None
    for lo, hi in spans:
        lo, hi = lo // SECTOR_SIZE, -(-hi // SECTOR_SIZE)
        if cur is not None and lo <= cur[1]:
            cur[1] = max(cur[1], hi)
            continue
        if cur is not None:
            yield cur[0], cur[1] - cur[0]
        cur = [lo, hi]
    if cur is not None:
        yield cur[0], cur[1] - cur[0]


def _copy_differences(src: Chain, base: Chain, image: Image, progress: Progress) -> int:
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    written = 0
    for first, count in _ranges(src, base):
        for sector, n in _sector_chunks(first, count):
            a = memoryview(buf_a)[: n * SECTOR_SIZE]
            b = memoryview(buf_b)[: n * SECTOR_SIZE]
            src.read_from(0, sector, a)
            base.read_from(0, sector, b)
            if a == b:
                progress((sector + n) * SECTOR_SIZE)
                continue
            start = None
            for pos in range(0, len(a) + PIECE, PIECE):
                same = pos >= len(a) or a[pos : pos + PIECE] == b[pos : pos + PIECE]
                if not same and start is None:
                    start = pos
                elif same and start is not None:
                    image.write(sector + start // SECTOR_SIZE, a[start:pos])
                    written += len(a[start:pos])
                    start = None
            progress((sector + n) * SECTOR_SIZE)
    image.flush()
    return written
