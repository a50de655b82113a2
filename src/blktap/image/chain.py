"""A chain of image layers read as one virtual disk.

The leaf comes first; each VHD layer answers for the sectors it holds and passes the rest
to its parent; past the last layer (or past the end of a shorter parent) the disk reads as
zeros. Only the leaf is ever written.

Encrypted VHDs (docs/encryption.md): every VHD layer is checked against the key given to
:meth:`Chain.open`, as tapdisk checks each image it opens, and the sectors a layer holds are
decrypted as they are read; holes and the end of the chain read as plain zeros.

Trust (docs/security.md): an image named by a plain path has its format probed, and a
probed image does not get its parents opened (:class:`ProbedParent`): the bytes that made
it look like a differencing VHD may have been written by a guest into its raw disk. Every
parent opened passes the :class:`~blktap.image.parents.ParentPolicy` (the directories
parents are confined to, ``BLKTAP_PARENT_DIRS``). The same holds for a probed qcow2 image
with a backing file, and for a backing file whose format its child does not name (probed)
when it names parents of its own.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

from blktap.errors import (
    ChainError,
    ChainTooDeep,
    EncryptionError,
    FormatError,
    OutOfRange,
    ParentLoop,
    ParentNotFound,
    ProbedParent,
    UnsupportedImage,
    UsageError,
)
from blktap.image.crypto import XtsCipher
from blktap.image.fileio import file_size_of, pread_exact, preadv_into, zero_fill
from blktap.image.parents import ParentPolicy, default_policy
from blktap.image.qcow.image import QcowImage
from blktap.image.qcow2 import image as q2
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.raw import RawImage
from blktap.image.rbd import RbdImage
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import cipher_for, is_encrypted

SECTOR_SIZE = 512
# More layers than this is a broken chain, not a real one (XenServer stops at 30).
DEFAULT_MAX_DEPTH = 256

Layer = VhdImage | RawImage | Qcow2Image | RbdImage

FORMATS = ("vhd", "raw", "qcow2", "qcow")
# Prefixes accepted in image arguments: tapdisk's driver names and plain format names.
PREFIXES = {"vhd": "vhd", "aio": "raw", "raw": "raw", "qcow2": "qcow2", "qcow": "qcow"}


def parse_spec(spec: str) -> tuple[str | None, str]:
    """Split ``vhd:PATH``, ``qcow2:PATH``, ``aio:PATH`` or ``raw:PATH`` into (format,
    path); a plain path gives (None, path) and is probed (and so not trusted to name parents)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        return PREFIXES[prefix], rest
    return None, spec


def probe(path: str) -> str:
    """Guess the format of a file: "vhd" when it carries a VHD footer, "qcow2" when it
    starts with qcow2's magic ("qcow" for its version 1), else "raw"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
    try:
        size = file_size_of(fd)
        try:
            head = os.pread(fd, 8, 0)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        if head == s.FOOTER_COOKIE:
            return "vhd"
        # A dynamic VHD whose footers are both damaged still has its header at 512: call
        # it a VHD, so that opening it reports the damage instead of serving it as raw.
        if size >= s.FOOTER_SIZE + s.HEADER_SIZE and \
                os.pread(fd, 8, s.FOOTER_SIZE) == s.HEADER_COOKIE:
            return "vhd"
        if head[:4] == b"QFI\xfb":
            return "qcow" if head[4:8] == b"\0\0\0\1" else "qcow2"
        if size >= s.FOOTER_SIZE:
            tail = pread_exact(fd, 8, size - s.FOOTER_SIZE)
            if tail in (s.FOOTER_COOKIE, s.POISON_COOKIE):
                return "vhd"
        return "raw"
    finally:
        os.close(fd)


def open_layer(path: str, fmt: str | None, *, writable: bool = False) -> Layer:
    """One layer, of format ``fmt`` or the probed one; its parents are not looked at."""
    fmt = fmt or probe(path)
    if fmt == "vhd":
        return VhdImage.open(path, writable=writable)
    if fmt == "raw":
        return RawImage.open(path, writable=writable)
    if fmt == "qcow2":
        return Qcow2Image.open(path, writable=writable)
    if fmt == "qcow":
        return QcowImage.open(path, writable=writable)
    raise UsageError(f"unknown image format {fmt!r}")


@dataclass(frozen=True)
class Extent:
    """A run of the virtual disk and the layer that holds it (None: reads as zeros)."""

    offset: int
    length: int
    depth: int | None
    # The layer says the run reads as zeros without holding data (a qcow2 zero cluster).
    zero: bool = False


class Chain:
    """An open chain of layers, leaf first."""

    def __init__(self, layers: list[Layer],
                 ciphers: list[XtsCipher | None] | None = None) -> None:
        if not layers:
            raise ChainError("empty chain")
        self.layers = layers
        # Per layer: the cipher of an encrypted VHD, None for data stored as it reads.
        self.ciphers = ciphers if ciphers is not None else [None] * len(layers)
        # A qcow2 layer fills new clusters with what lies below it (copy on write).
        for depth, layer in enumerate(layers):
            if isinstance(layer, Qcow2Image):
                layer.read_below = functools.partial(self._read, depth + 1)

    @classmethod
    def open(cls, spec: str, *, writable: bool = False, max_depth: int = DEFAULT_MAX_DEPTH,
             check_parent_uuid: bool = True, key: bytes | None = None,
             ciphertext: bool = False, follow_probed_parents: bool = False,
             probed: bool | None = None,
             parent_policy: ParentPolicy | None = None) -> Chain:
        """Open an image and every parent it names.

        Raises ParentNotFound naming a missing parent, ParentLoop for a chain that comes
        back to one of its images, ChainTooDeep past ``max_depth`` layers.

        A plain path (no ``vhd:``/``aio:``/``raw:`` prefix) has its format probed; a probed
        image that is a differencing VHD raises ProbedParent (EPERM) instead of opening the
        parent its locators name, unless ``follow_probed_parents``. ``probed`` overrides
        what the spec says (True: the caller probed the format itself). Every parent must
        pass ``parent_policy`` (default: the environment's ``BLKTAP_PARENT_DIRS``), else
        ParentNotAllowed (EACCES).

        ``key`` (32 or 64 bytes) opens encrypted VHDs: each VHD layer must carry the key's
        hash, and its data is decrypted on reads and encrypted on writes. An encrypted layer
        without a key, a key whose hash does not match (ENOKEY), or a key for a clear VHD
        raises EncryptionError. ``ciphertext`` skips that check and serves encrypted data as
        it is stored: for callers that only look at the map or move layers' bytes as they
        are (chain depth, coalesce).
        """
        fmt, path = parse_spec(spec)
        if probed is None:
            probed = fmt is None
        layers: list[Layer] = []
        try:
            leaf = open_layer(path, fmt, writable=writable)
            layers.append(leaf)
            if (probed and not follow_probed_parents and isinstance(leaf, VhdImage)
                    and leaf.is_differencing):
                raise probed_parent_error(path, leaf)
            if probed and not follow_probed_parents and isinstance(leaf, Qcow2Image) \
                    and leaf.is_differencing:
                raise probed_backing_error(path, leaf)
            policy = default_policy(parent_policy)
            seen = {cls._identity(leaf)}
            current: Layer = leaf
            while isinstance(current, VhdImage | Qcow2Image) and current.is_differencing:
                if len(layers) >= max_depth:
                    raise ChainTooDeep(f"{path}: chain deeper than {max_depth} images")
                parent: Layer
                if isinstance(current, Qcow2Image) and _names_rbd(current):
                    # A local leaf over a Ceph image (qemu's "rbd:..." backing file, raw):
                    # the last layer, read-only (docs/ceph.md).
                    layers.append(_open_rbd_backing(current, policy))
                    break
                if isinstance(current, VhdImage) and current.parent_rbd is not None:
                    # The same under a VHD (its MACX locator holds the spec).
                    layers.append(open_rbd_parent(current.path, current.parent_rbd, policy))
                    break
                if isinstance(current, Qcow2Image):
                    parent_path, parent = _open_qcow2_backing(current, policy,
                                                              follow_probed_parents)
                    layers.append(parent)
                    if cls._identity(parent) in seen:
                        raise ParentLoop(f"{path}: backing chain loops back to "
                                         f"{parent_path}")
                    seen.add(cls._identity(parent))
                    current = parent
                    continue
                parent_path = policy.check(current.path, current.parent_path())
                if current.parent_is_raw:
                    parent = RawImage.open(parent_path)
                else:
                    parent = VhdImage.open(parent_path)
                layers.append(parent)
                ident = cls._identity(parent)
                if ident in seen:
                    raise ParentLoop(f"{path}: parent chain loops back to {parent_path}")
                seen.add(ident)
                if (check_parent_uuid and isinstance(parent, VhdImage)
                        and current.header is not None
                        and parent.footer.uuid != current.header.prt_uuid):
                    raise ChainError(
                        f"{current.path}: parent {parent_path} has uuid {parent.uuid}, "
                        f"expected {current.header.parent_uuid_obj}")
                current = parent
            ciphers: list[XtsCipher | None] = [None] * len(layers)
            if not ciphertext:
                # Raw layers hold no key hash and are read as stored, as tapdisk's aio
                # driver does; a key for a chain without any VHD to check it is a mistake.
                ciphers = [cipher_for(layer, key) if isinstance(layer, VhdImage) else None
                           for layer in layers]
                if key is not None and not any(isinstance(x, VhdImage) for x in layers):
                    raise EncryptionError(f"{path} is a raw image: it cannot be encrypted, "
                                          f"but a key was given")
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(layers, ciphers)

    @staticmethod
    def _identity(layer: Layer) -> tuple[int, int] | tuple[str, str]:
        if isinstance(layer, RbdImage):
            return "rbd", layer.spec.name()
        st = os.fstat(layer.fd)
        return st.st_dev, st.st_ino

    # -------------------------------------------------------------- properties
    @property
    def leaf(self) -> Layer:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self.leaf.size

    @property
    def sectors(self) -> int:
        return self.leaf.sectors

    def __len__(self) -> int:
        return len(self.layers)

    # -------------------------------------------------------------- reading
    def readinto(self, sector: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` (a whole number of sectors) from the virtual disk at ``sector``."""
        view = memoryview(buf).cast("B")
        if len(view) % SECTOR_SIZE:
            raise OutOfRange("read length is not a whole number of sectors", errno.EINVAL)
        count = len(view) // SECTOR_SIZE
        if sector < 0 or sector + count > self.sectors:
            raise OutOfRange(f"read of {count} sectors at {sector} past the end of the disk "
                             f"({self.sectors} sectors)", errno.EINVAL)
        self._read(0, sector, count, view)

    def read(self, sector: int, count: int) -> bytearray:
        buf = bytearray(count * SECTOR_SIZE)
        self.readinto(sector, buf)
        return buf

    def _read(self, depth: int, sector: int, count: int, view: memoryview) -> None:
        if depth == len(self.layers):
            zero_fill(view)
            return
        layer = self.layers[depth]
        limit = layer.sectors
        if sector + count > limit:
            keep = max(0, limit - sector)
            zero_fill(view[keep * SECTOR_SIZE :])
            count = keep
            if not count:
                return
        if isinstance(layer, Qcow2Image):
            layer.readinto_layer(sector, count, view, functools.partial(self._read, depth + 1))
            return
        if isinstance(layer, RbdImage):  # always the last layer; librbd reads its holes
            layer.readinto(sector * SECTOR_SIZE, view[: count * SECTOR_SIZE])
            return
        for first, n, file_off in layer.extents(sector, count):
            sub = view[(first - sector) * SECTOR_SIZE : (first - sector + n) * SECTOR_SIZE]
            if file_off is None:
                self._read(depth + 1, first, n, sub)
            else:
                preadv_into(layer.fd, sub, file_off)
                cipher = self.ciphers[depth]
                if cipher is not None:
                    cipher.decrypt_in_place(first, sub)

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        """Read bytes at any offset and length inside the disk (a sector-aligned read
        returns its buffer as is, an unaligned one copies the part asked for once)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"read of {length} bytes at {offset} past the end of the disk",
                             errno.EINVAL)
        first = offset // SECTOR_SIZE
        last = -(-(offset + length) // SECTOR_SIZE)
        last = min(last, self.sectors)
        buf = self.read(first, last - first)
        skip = offset - first * SECTOR_SIZE
        if skip == 0 and len(buf) == length:
            return buf
        return bytes(memoryview(buf)[skip : skip + length])

    # -------------------------------------------------------------- writing
    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole sectors into the leaf (encrypted first when the leaf is)."""
        cipher = self.ciphers[0]
        if cipher is not None:
            data = cipher.encrypt(sector, data)
        self.leaf.write(sector, data)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes at any offset, reading and merging partial sectors first."""
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise OutOfRange(f"write of {len(view)} bytes at {offset} past the end of the "
                             f"disk", errno.ENOSPC)
        if not view:
            return
        if offset % SECTOR_SIZE == 0 and len(view) % SECTOR_SIZE == 0:
            self.write(offset // SECTOR_SIZE, view)
            return
        first = offset // SECTOR_SIZE
        last = -(-(offset + len(view)) // SECTOR_SIZE)
        buf = self.read(first, last - first)
        skip = offset - first * SECTOR_SIZE
        buf[skip : skip + len(view)] = view
        self.write(first, buf)

    def flush(self) -> None:
        self.leaf.flush()

    def close(self) -> None:
        errors = []
        for layer in self.layers:
            try:
                layer.close()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- mapping
    def map(self, sector: int = 0, count: int | None = None) -> list[Extent]:
        """Which layer holds each run of the disk, as byte extents, merged."""
        if count is None:
            count = self.sectors - sector
        out: list[list] = []
        for first, n, depth, zero in self._map(0, sector, count):
            if out and out[-1][2] == depth and out[-1][3] == zero \
                    and out[-1][0] + out[-1][1] == first:
                out[-1][1] += n
            else:
                out.append([first, n, depth, zero])
        size = self.size
        result = []
        for first, n, depth, zero in out:
            start = first * SECTOR_SIZE
            end = min((first + n) * SECTOR_SIZE, size)
            result.append(Extent(start, end - start, depth, zero))
        return result

    def _map(self, depth: int, sector: int, count: int
             ) -> Iterator[tuple[int, int, int | None, bool]]:
        if depth == len(self.layers):
            yield sector, count, None, False
            return
        layer = self.layers[depth]
        limit = layer.sectors
        tail = None
        if sector + count > limit:
            keep = max(0, limit - sector)
            tail = (sector + keep, count - keep)
            count = keep
        if count:
            if isinstance(layer, RbdImage):
                for off, n, has_data in layer.data_runs(sector * SECTOR_SIZE,
                                                        count * SECTOR_SIZE):
                    first, stop = off // SECTOR_SIZE, -(-(off + n) // SECTOR_SIZE)
                    if has_data:
                        yield first, stop - first, depth, False
                    else:
                        yield from self._map(depth + 1, first, stop - first)
            elif isinstance(layer, RawImage):
                for first, n, has_data in layer.data_extents(sector, count):
                    if has_data:
                        yield first, n, depth, False
                    else:
                        yield from self._map(depth + 1, first, n)
            elif isinstance(layer, Qcow2Image):
                for first, n, kind in layer.status(sector, count):
                    if kind == q2.HOLE:
                        yield from self._map(depth + 1, first, n)
                    else:
                        yield first, n, depth, kind == q2.ZERO
            else:
                for first, n, file_off in layer.extents(sector, count):
                    if file_off is None:
                        yield from self._map(depth + 1, first, n)
                    else:
                        yield first, n, depth, False
        if tail:
            yield tail[0], tail[1], None, False

    def own_runs(self, depth: int) -> Iterator[tuple[int, int, bool]]:
        """(first sector, count, reads as zeros) of the runs the layer at ``depth`` holds
        itself (its data, and a qcow2 layer's zero clusters), in order; what it leaves to
        the layers below is not listed."""
        layer = self.layers[depth]
        if isinstance(layer, RbdImage):
            for off, n, has_data in layer.data_runs(0, layer.size):
                if has_data:
                    first = off // SECTOR_SIZE
                    yield first, -(-(off + n) // SECTOR_SIZE) - first, False
        elif isinstance(layer, RawImage):
            for first, n, has_data in layer.data_extents(0, layer.sectors):
                if has_data:
                    yield first, n, False
        elif isinstance(layer, Qcow2Image):
            for first, n, kind in layer.status(0, layer.sectors):
                if kind != q2.HOLE:
                    yield first, n, kind == q2.ZERO
        else:
            for first, n, file_off in layer.extents(0, layer.sectors):
                if file_off is not None:
                    yield first, n, False

    def read_from(self, depth: int, sector: int, view: memoryview) -> None:
        """Fill ``view`` (whole sectors) with what the chain reads as from the layer at
        ``depth`` down (depth 0: the disk; past a layer's end: zeros)."""
        self._read(depth, sector, len(view) // SECTOR_SIZE, view)

    def allocated_bytes(self) -> int:
        """Bytes of the disk that some layer holds."""
        return sum(e.length for e in self.map() if e.depth is not None)


def probed_parent_error(path: str, image: VhdImage) -> ProbedParent:
    """The refusal to follow the parent of ``image``, opened from the plain path
    ``path``."""
    name = named_parent(image)
    return ProbedParent(
        f"{path} was probed as a differencing VHD whose parent locator names {name!r}: the "
        f"parents of a probed image are not opened, its content may come from a guest; "
        f"name the format (vhd:{path}) if you trust it", image=path, parent=name)


def refuse_probed_parent(path: str) -> None:
    """For a caller given a plain path that it will take as a VHD and whose parents it
    will follow (coalesce, rebase, a snapshot's parent): ProbedParent if the file is a
    differencing VHD. A file that is no VHD is left to the caller's own open to report."""
    if probe(path) != "vhd":
        return
    with VhdImage.open(path) as image:
        if image.is_differencing:
            raise probed_parent_error(path, image)


def probed_backing_error(path: str, image: Qcow2Image) -> ProbedParent:
    """The refusal to follow the backing file of a qcow2 image whose format was probed
    (opened from a plain path, or a backing file whose child names no format)."""
    name = image.backing_file or ""
    return ProbedParent(
        f"{path} was probed as a qcow2 image whose backing file is {name!r}: the backing "
        f"files of a probed image are not opened, its content may come from a guest; name "
        f"the format (qcow2:{path}) if you trust it", image=path, parent=name)


# Formats a qcow2 image may name for its backing file, in qemu's names and ours.
QCOW2_BACKING_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vpc": "vhd", "vhd": "vhd",
                         "qcow": "qcow"}


def _open_qcow2_backing(child: Qcow2Image, policy: ParentPolicy,
                        follow_probed_parents: bool) -> tuple[str, Layer]:
    """Open the backing file a qcow2 layer names (it must pass ``policy``), in the format
    it names. Without a format the file is probed, as qemu does, and then trusted no
    further: a probed backing file that names parents of its own is refused."""
    name = child.backing_path()
    assert name is not None
    named = child.backing_format or None
    fmt = QCOW2_BACKING_FORMATS.get(named) if named is not None else None
    if named is not None and fmt is None:
        raise UnsupportedImage(f"{child.path}: backing file {name} has format {named!r} "
                               f"(supported: {', '.join(QCOW2_BACKING_FORMATS)})")
    path = policy.check(child.path, name)
    if not os.path.exists(path):
        raise ParentNotFound(f"{child.path}: backing file {name} not found")
    layer = open_layer(path, fmt)
    if fmt is None and not follow_probed_parents and \
            isinstance(layer, VhdImage | Qcow2Image) and layer.is_differencing:
        try:
            if isinstance(layer, VhdImage):
                raise probed_parent_error(path, layer)
            raise probed_backing_error(path, layer)
        finally:
            layer.close()
    return path, layer


def _names_rbd(child: Qcow2Image) -> bool:
    return bool(child.backing_file) and child.backing_file.startswith("rbd:")


def _open_rbd_backing(child: Qcow2Image, policy: ParentPolicy) -> RbdImage:
    """The Ceph image a qcow2 layer names as its backing file (``rbd:POOL/IMAGE[@SNAP]
    [:conf=...]``, format raw as qemu requires): :func:`open_rbd_parent`."""
    name = child.backing_file
    if child.backing_format not in (None, "", "raw"):
        raise UnsupportedImage(f"{child.path}: backing image {name} has format "
                               f"{child.backing_format!r}; an rbd: backing image is raw")
    return open_rbd_parent(child.path, name, policy)


def open_rbd_parent(child: str, spec: str, policy: ParentPolicy) -> RbdImage:
    """The Ceph image ``child`` names as its parent, read-only, if ``policy`` lets it be
    opened (its pool listed in ``BLKTAP_PARENT_RBD``/``--parent-rbd``, no Ceph option
    but conf and id), else ParentNotAllowed (EACCES). A parent the cluster does not have
    is ParentNotFound."""
    policy.check_rbd(child, spec)
    try:
        return RbdImage.open(spec)
    except FormatError as exc:
        if exc.errno == errno.ENOENT:
            raise ParentNotFound(f"{child}: parent {exc}") from None
        raise


def named_parent(image: VhdImage) -> str:
    """The parent a differencing VHD names, as it names it (nothing resolved or opened):
    the first locator that decodes, else the header's parent name."""
    for _, _, name in image.parent_locator_names():
        if name:
            return name
    return image.header.parent_name if image.header is not None else ""


def open_chain(spec: str, *, key: bytes | None = None, writable: bool = False,
               follow_probed_parents: bool = False,
               parent_policy: ParentPolicy | None = None) -> Chain:
    """Open a chain with ``key`` if some VHD layer of it is encrypted, and without it
    otherwise (Chain.open refuses a key for a clear chain; a caller holding one key for
    several disks, say compare or rebase, does not know which of them are encrypted).
    ``follow_probed_parents`` and ``parent_policy`` are Chain.open's."""
    policy = default_policy(parent_policy)
    if key is not None:
        with Chain.open(spec, ciphertext=True, follow_probed_parents=follow_probed_parents,
                        parent_policy=policy) as probe_chain:
            if not any(isinstance(layer, VhdImage) and is_encrypted(layer)
                       for layer in probe_chain.layers):
                key = None
    return Chain.open(spec, writable=writable, key=key,
                      follow_probed_parents=follow_probed_parents, parent_policy=policy)
