"""Ceph RBD images: the ``rbd:`` spec, the Python bindings, opening an image.

The spec is qemu's: ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE...]`` where ``conf``
names the ceph.conf, ``id`` the client (``client.ID``; default ``admin``), and any other
key is a Ceph option set on the connection (``mon_host``, ``keyring``,
``rados_osd_op_timeout``...). A backslash quotes the next character (``\\:``, ``\\@``).
A snapshot is always opened read-only.

librbd's bindings (Debian's ``python3-rbd`` and ``python3-rados``) are installed for the
system's Python. When they are not importable as they are (a virtualenv of another
Python build), :func:`bindings` loads those two extension modules, and only those, from
the system's package folders (``BLKTAP_CEPH_PYTHONPATH`` names others) when they were
built for this interpreter's ABI; otherwise the error says what to install.
"""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from blktap.errors import FormatError, OutOfRange, UnsupportedImage, UsageError

SECTOR_SIZE = 512
SYSTEM_DIRS = ("/usr/lib/python3/dist-packages",
               f"/usr/lib/python3.{sys.version_info.minor}/dist-packages",
               "/usr/local/lib/python3/dist-packages")
# How long connecting may take before it fails (librados's default is 300 s).
DEFAULT_MOUNT_TIMEOUT = "30"
# An OSD request unanswered this long fails with ETIMEDOUT, which the driver turns into
# EAGAIN: the VBD then retries it until its own timeout. 0 would hold it forever.
DEFAULT_OSD_OP_TIMEOUT = "30"

_bindings: tuple[ModuleType, ModuleType] | None = None


def _load_extension(name: str, dirs: list[str]) -> ModuleType | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or importlib.machinery.EXTENSION_SUFFIXES[0]
    for folder in dirs:
        path = os.path.join(folder, name + suffix)
        if not os.path.exists(path):
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return None


def bindings() -> tuple[ModuleType, ModuleType]:
    """(rados, rbd), imported once; UnsupportedImage (ENOSYS) when they cannot be."""
    global _bindings
    if _bindings is not None:
        return _bindings
    try:
        rados = importlib.import_module("rados")
        rbd = importlib.import_module("rbd")
    except ImportError:
        extra = os.environ.get("BLKTAP_CEPH_PYTHONPATH", "")
        dirs = [d for d in extra.split(os.pathsep) if d] + list(SYSTEM_DIRS)
        try:
            rados = sys.modules.get("rados") or _load_extension("rados", dirs)
            rbd = _load_extension("rbd", dirs) if rados is not None else None
        except ImportError as exc:
            raise UnsupportedImage(
                f"rbd: Ceph's Python bindings do not load in this Python "
                f"({sys.version.split()[0]}): {exc}", errno.ENOSYS) from None
        if rados is None or rbd is None:
            raise UnsupportedImage(
                "rbd: Ceph's Python bindings (python3-rbd, python3-rados) are not "
                f"installed for Python 3.{sys.version_info.minor} (looked in "
                f"{', '.join(dirs)}; BLKTAP_CEPH_PYTHONPATH names other folders)",
                errno.ENOSYS) from None
    _bindings = (rados, rbd)
    return _bindings


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class RbdSpec:
    pool: str
    image: str
    namespace: str = ""
    snap: str | None = None
    conf: str | None = None
    user: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def name(self) -> str:
        """POOL[/NS]/IMAGE[@SNAP], for messages."""
        ns = f"{self.namespace}/" if self.namespace else ""
        at = f"@{self.snap}" if self.snap else ""
        return f"{self.pool}/{ns}{self.image}{at}"

    def text(self) -> str:
        """The whole spec, ``rbd:`` first, quoted so that :func:`parse_spec` gives it
        back (what a VHD's locator stores)."""
        parts = [_quote(p) for p in (self.pool, self.namespace, self.image) if p]
        out = "rbd:" + "/".join(parts) + (f"@{_quote(self.snap)}" if self.snap else "")
        pairs = ([("conf", self.conf)] if self.conf else []) + \
            ([("id", self.user)] if self.user else []) + list(self.options.items())
        return out + "".join(f":{_quote(k, ':=')}={_quote(v, ':')}" for k, v in pairs)


def _quote(text: str, special: str = ":@/") -> str:
    return "".join("\\" + c if c in special or c == "\\" else c for c in text)


def _split_unquoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not quoted by a backslash; quotes stay in place."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unquote(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_spec(text: str) -> RbdSpec:
    """``[rbd:]POOL[/NS]/IMAGE[@SNAP][:KEY=VALUE...]`` -> RbdSpec (UsageError if bad)."""
    body = text[4:] if text.startswith("rbd:") else text
    fields = _split_unquoted(body, ":")
    where, opts = fields[0], fields[1:]
    at = _split_unquoted(where, "@")
    if len(at) > 2:
        raise UsageError(f"rbd:{body}: more than one '@' in the image name")
    snap = _unquote(at[1]) if len(at) == 2 else None
    path = [_unquote(p) for p in _split_unquoted(at[0], "/")]
    if len(path) == 2:
        pool, namespace, image = path[0], "", path[1]
    elif len(path) == 3:
        pool, namespace, image = path
    else:
        raise UsageError(f"rbd:{body}: name the image as POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    if not pool or not image or (len(at) == 2 and not snap):
        raise UsageError(f"rbd:{body}: empty pool, image or snapshot name")
    conf = user = None
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key, value = _unquote(key), _unquote(value)
        if not eq or not key:
            raise UsageError(f"rbd:{body}: option {opt!r} is not KEY=VALUE")
        if key == "conf":
            conf = value
        elif key == "id":
            user = value
        else:
            options[key] = value
    return RbdSpec(pool, image, namespace, snap, conf, user, options)


def as_spec(text: str | RbdSpec) -> RbdSpec:
    return text if isinstance(text, RbdSpec) else parse_spec(text)


# ----------------------------------------------------------------------------- opening
def _cluster(spec: RbdSpec) -> Any:
    """A not yet connected ``rados.Rados`` for the spec: its ``conf`` file (which must
    be readable), else librados's usual search ($CEPH_CONF, /etc/ceph/ceph.conf...) when
    there is a file to find (without one, ``mon_host`` and the other options may say
    everything, as with qemu); then the timeouts and the spec's options."""
    rados, _ = bindings()
    cluster = rados.Rados(rados_id=spec.user)
    try:
        if spec.conf:
            try:
                cluster.conf_read_file(spec.conf)
            except Exception as exc:
                raise _error(spec, f"cannot read {spec.conf}", exc) from None
        else:
            try:
                cluster.conf_read_file()
            except Exception as exc:
                if abs(getattr(exc, "errno", 0) or 0) != errno.ENOENT:
                    raise _error(spec, "cannot read the Ceph configuration", exc) from None
        cluster.conf_parse_env()
        cluster.conf_set("client_mount_timeout", DEFAULT_MOUNT_TIMEOUT)
        cluster.conf_set("rados_osd_op_timeout", DEFAULT_OSD_OP_TIMEOUT)
        for key, value in spec.options.items():
            try:
                cluster.conf_set(key, value)
            except Exception as exc:
                raise UsageError(f"rbd:{spec.name()}: option {key}={value}: {exc}",
                                 errno.EINVAL) from None
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _error(spec: RbdSpec, what: str, exc: BaseException) -> FormatError:
    code = getattr(exc, "errno", None) or errno.EIO
    code = abs(code)
    return FormatError(f"rbd:{spec.name()}: {what}: {exc}", code)


class RbdImage:
    """One open RBD image: its cluster connection, I/O context and ``rbd.Image``.

    The synchronous helpers (``readinto``, ``write``, ``data_runs``) are for the tools;
    the tapdisk driver uses ``image``'s aio calls itself."""

    def __init__(self, spec: RbdSpec, cluster: Any, ioctx: Any, image: Any,
                 writable: bool) -> None:
        self.spec = spec
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image
        self.writable = writable
        self.path = "rbd:" + spec.name()
        self.size = image.size()
        stat = image.stat()
        self.object_size = 1 << stat["order"]
        _, rbd = bindings()
        self.fast_diff = bool(image.features() & rbd.RBD_FEATURE_FAST_DIFF) and not (
            image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID)
        self._closed = False

    @classmethod
    def open(cls, text: str | RbdSpec, *, writable: bool = False) -> RbdImage:
        """Connect and open (blocking). A snapshot is read-only: writable is refused."""
        spec = as_spec(text)
        if spec.snap and writable:
            raise UsageError(f"rbd:{spec.name()}: a snapshot is read-only", errno.EROFS)
        _, rbd = bindings()
        cluster = _cluster(spec)
        ioctx = None
        try:
            try:
                cluster.connect()
            except Exception as exc:
                raise _error(spec, "cannot connect to the cluster", exc) from None
            try:
                ioctx = cluster.open_ioctx(spec.pool)
            except Exception as exc:
                raise _error(spec, f"pool {spec.pool!r}", exc) from None
            if spec.namespace:
                ioctx.set_namespace(spec.namespace)
            try:
                image = rbd.Image(ioctx, spec.image, snapshot=spec.snap,
                                  read_only=not writable)
            except Exception as exc:
                raise _error(spec, "cannot open the image", exc) from None
            return cls(spec, cluster, ioctx, image, writable)
        except BaseException:
            if ioctx is not None:
                ioctx.close()
            cluster.shutdown()
            raise

    @property
    def sectors(self) -> int:
        return -(-self.size // SECTOR_SIZE)

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs (offset, length, holds data) covering [offset, offset+length), from
        diff_iterate against nothing (the object map with fast-diff: whole objects)."""
        end = min(offset + length, self.size)
        found: list[tuple[int, int]] = []

        def seen(off: int, n: int, exists: bool) -> int:
            if exists:
                found.append((max(off, offset), min(off + n, end)))
            return 0

        self.image.diff_iterate(offset, end - offset, None, seen, include_parent=True,
                                whole_object=self.fast_diff)
        return data_runs_from(found, offset, end)

    def allocated_bytes(self) -> int:
        """Bytes in objects that exist (whole objects with fast-diff)."""
        return sum(n for _, n, data in self.data_runs(0, self.size) if data)

    def readinto(self, offset: int, view: memoryview) -> None:
        n = len(view)
        inside = max(0, min(n, self.size - offset))
        if inside:
            data = self.image.read(offset, inside)
            view[: len(data)] = data
            if len(data) < n:
                view[len(data):] = bytes(n - len(data))
        elif n:
            view[:] = bytes(n)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise UsageError(f"{self.path} is open read-only", errno.EROFS)
        if offset + len(data) > self.size:
            raise OutOfRange(f"write past the end of {self.path}", errno.ENOSPC)
        buf = data if isinstance(data, bytes | bytearray) else bytes(data)
        self.image.write(buf, offset)

    def flush(self) -> None:
        if self.writable and not self._closed:
            self.image.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.image.close()
        finally:
            self.ioctx.close()
            self.cluster.shutdown()

    def __enter__(self) -> RbdImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RbdImage {self.path} size={self.size}>"


def data_runs_from(found: list[tuple[int, int]], offset: int, end: int
                   ) -> list[tuple[int, int, bool]]:
    """Runs (offset, length, holds data) covering [offset, end) from the (start, stop)
    extents diff_iterate found holding data (any order, overlaps allowed)."""
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    for a, b in sorted(found):
        if b <= pos:
            continue
        a = max(a, pos)
        if a > pos:
            runs.append((pos, a - pos, False))
        runs.append((a, b - a, True))
        pos = b
    if pos < end:
        runs.append((pos, end - pos, False))
    return runs


@contextmanager
def _pool(spec: RbdSpec, what: str) -> Iterator[tuple[Any, ModuleType]]:
    """(I/O context of the spec's pool and namespace, the rbd module), for one management
    call; any failure of the cluster is a FormatError saying ``what`` failed."""
    _, rbd = bindings()
    cluster = _cluster(spec)
    try:
        try:
            cluster.connect()
            with cluster.open_ioctx(spec.pool) as ioctx:
                if spec.namespace:
                    ioctx.set_namespace(spec.namespace)
                yield ioctx, rbd
        except (UsageError, FormatError):
            raise
        except Exception as exc:
            raise _error(spec, what, exc) from None
    finally:
        cluster.shutdown()


def create(text: str | RbdSpec, size: int) -> None:
    """Create an image of ``size`` bytes (the cluster's default features); EEXIST if one
    of that name exists."""
    spec = as_spec(text)
    if spec.snap:
        raise UsageError(f"rbd:{spec.name()}: cannot create a snapshot as an image")
    with _pool(spec, "cannot create the image") as (ioctx, rbd):
        rbd.RBD().create(ioctx, spec.image, size)


def remove(text: str | RbdSpec) -> None:
    """Remove an image (without snapshots); ENOENT when there is none."""
    spec = as_spec(text)
    with _pool(spec, "cannot remove the image") as (ioctx, rbd):
        rbd.RBD().remove(ioctx, spec.image)


def rename(text: str | RbdSpec, new_name: str) -> None:
    """Rename an image inside its pool (EEXIST when the new name is taken)."""
    spec = as_spec(text)
    with _pool(spec, f"cannot rename the image to {new_name}") as (ioctx, rbd):
        rbd.RBD().rename(ioctx, spec.image, new_name)


def exists(text: str | RbdSpec) -> bool:
    spec = as_spec(text)
    with _pool(spec, "cannot list the pool") as (ioctx, rbd):
        return spec.image in rbd.RBD().list(ioctx)


# ----------------------------------------------------------------------------- the tools
class RbdChain:
    """An RBD image seen as a one-layer :class:`~blktap.image.chain.Chain` (what
    ``blktap info/convert/compare/map`` use of one): reads, the map, sizes. Where the
    image is a clone, librbd reads through its parent itself (and the map includes it)."""

    def __init__(self, image: RbdImage) -> None:
        self.image = image
        self.layers = [image]
        self.ciphers = [None]

    @classmethod
    def open(cls, text: str | RbdSpec, *, writable: bool = False) -> RbdChain:
        return cls(RbdImage.open(text, writable=writable))

    @property
    def leaf(self) -> RbdImage:
        return self.image

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def sectors(self) -> int:
        return self.image.sectors

    def __len__(self) -> int:
        return 1

    def readinto(self, sector: int, buf: bytearray | memoryview) -> None:
        self.image.readinto(sector * SECTOR_SIZE, memoryview(buf).cast("B"))

    def pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.image.readinto(offset, memoryview(buf))
        return buf

    def map(self, sector: int = 0, count: int | None = None) -> list:
        from blktap.image.chain import Extent

        start = sector * SECTOR_SIZE
        end = self.size if count is None else min(self.size, (sector + count) * SECTOR_SIZE)
        out: list[Extent] = []
        for off, n, data in self.image.data_runs(start, end - start) if end > start else ():
            depth = 0 if data else None
            if out and out[-1].depth == depth and out[-1].offset + out[-1].length == off:
                out[-1] = Extent(out[-1].offset, out[-1].length + n, depth)
            else:
                out.append(Extent(off, n, depth))
        return out

    def allocated_bytes(self) -> int:
        return self.image.allocated_bytes()

    def flush(self) -> None:
        self.image.flush()

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> RbdChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

