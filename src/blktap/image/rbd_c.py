"""librbd's C API through ctypes: the data path of the ``rbd`` driver.

The Python bindings (:mod:`blktap.image.rbd`) run every completion's callback on a
librbd thread with the GIL taken, and move data as ``bytes``. Here the driver's
requests go to librbd's C calls instead:

- reads scatter-gather straight into the caller's buffers (``rbd_aio_readv``);
- librbd sends writes from the buffer it is given rather than from a copy of its own
  (:data:`OUR_DEFAULTS`): the caller gives it one that stays untouched until the
  completion;
- completions are created without a callback: librbd queues them on the image and
  signals an eventfd (``rbd_set_image_notification``); the event loop watches that fd
  and collects every finished request at once (``rbd_poll_io_events``). No librbd thread
  ever runs Python or takes the GIL, and there is one wake-up per batch.

The connection is made as :func:`blktap.image.rbd._cluster` does (the same spec, conf
file, timeouts and options). :func:`load` returns None where the libraries or these
calls are missing; the driver then keeps to the bindings.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Container, Sequence
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint64,
    c_void_p,
)
from typing import Any

from blktap.errors import FormatError, UsageError
from blktap.image.rbd import DEFAULT_MOUNT_TIMEOUT, DEFAULT_OSD_OP_TIMEOUT, RbdSpec

EVENT_TYPE_EVENTFD = 2  # librbd.h
POLL_BATCH = 64
# librbd copies every write's data into its own buffer unless told otherwise, so that a
# caller changing its buffer while the write is in flight (a guest's page, under qemu)
# cannot send the OSDs bytes whose checksum no longer matches. Every buffer this path
# hands librbd is ours and untouched until the write's completion, which librbd delivers
# only once its messenger has let go of the buffer: the copy is pure cost (a sixth of
# the loop thread's time on 1 MiB writes). librbd still copies where its cache needs it;
# a spec's own ``rbd_disable_zero_copy_writes`` wins.
OUR_DEFAULTS = {"client_mount_timeout": DEFAULT_MOUNT_TIMEOUT,
                "rados_osd_op_timeout": DEFAULT_OSD_OP_TIMEOUT,
                "rbd_disable_zero_copy_writes": "false"}


class IoVec(Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


DiffCallback = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)

_libs: tuple[Any, Any] | None | bool = False  # False: not tried yet


def _declare(lib: Any, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def load() -> tuple[Any, Any] | None:
    """(librados, librbd) with the calls used here declared, or None."""
    global _libs
    if _libs is not False:
        return _libs  # type: ignore[return-value]
    try:
        rados = ctypes.CDLL("librados.so.2")
        rbd = ctypes.CDLL("librbd.so.1")
        p = c_void_p
        _declare(rados, "rados_create", c_int, POINTER(p), c_char_p)
        _declare(rados, "rados_conf_read_file", c_int, p, c_char_p)
        _declare(rados, "rados_conf_parse_env", c_int, p, c_char_p)
        _declare(rados, "rados_conf_set", c_int, p, c_char_p, c_char_p)
        _declare(rados, "rados_conf_get", c_int, p, c_char_p, c_char_p, c_size_t)
        _declare(rados, "rados_connect", c_int, p)
        _declare(rados, "rados_shutdown", None, p)
        _declare(rados, "rados_ioctx_create", c_int, p, c_char_p, POINTER(p))
        _declare(rados, "rados_ioctx_set_namespace", None, p, c_char_p)
        _declare(rados, "rados_ioctx_destroy", None, p)
        _declare(rbd, "rbd_open", c_int, p, c_char_p, POINTER(p), c_char_p)
        _declare(rbd, "rbd_open_read_only", c_int, p, c_char_p, POINTER(p), c_char_p)
        _declare(rbd, "rbd_close", c_int, p)
        _declare(rbd, "rbd_set_image_notification", c_int, p, c_int, c_int)
        _declare(rbd, "rbd_poll_io_events", c_int, p, POINTER(p), c_int)
        # (cb_arg, callback): both NULL here (completions are polled).
        _declare(rbd, "rbd_aio_create_completion", c_int, p, p, POINTER(p))
        _declare(rbd, "rbd_aio_get_arg", p, p)
        _declare(rbd, "rbd_aio_get_return_value", c_ssize_t, p)
        _declare(rbd, "rbd_aio_release", None, p)
        _declare(rbd, "rbd_aio_read", c_int, p, c_uint64, c_size_t, p, p)
        _declare(rbd, "rbd_aio_write", c_int, p, c_uint64, c_size_t, p, p)
        _declare(rbd, "rbd_aio_readv", c_int, p, POINTER(IoVec), c_int, c_uint64, p)
        _declare(rbd, "rbd_aio_flush", c_int, p, p)
        _declare(rbd, "rbd_aio_discard", c_int, p, c_uint64, c_uint64, p)
        _declare(rbd, "rbd_aio_write_zeroes", c_int, p, c_uint64, c_uint64, p, c_int, c_int)
        _declare(rbd, "rbd_diff_iterate2", c_int, p, c_char_p, c_uint64, c_uint64, c_uint8,
                 c_uint8, DiffCallback, p)
        _libs = (rados, rbd)
    except (OSError, AttributeError):
        _libs = None
    return _libs  # type: ignore[return-value]


def _check(ret: int, spec: RbdSpec, what: str) -> None:
    if ret < 0:
        raise FormatError(f"rbd:{spec.name()}: {what}: {os.strerror(-ret)}", -ret)


class CImage:
    """One image opened through librbd's C API, its completions signalled on
    ``self.eventfd`` and collected by :meth:`poll`."""

    def __init__(self, spec: RbdSpec, writable: bool) -> None:
        libs = load()
        if libs is None:
            raise FormatError(f"rbd:{spec.name()}: librbd's C library does not load",
                              errno.ENOSYS)
        self.rados, self.rbd = libs
        self.spec = spec
        self.cluster = c_void_p()
        self.ioctx = c_void_p()
        self.image = c_void_p()
        self.eventfd = -1
        self._events = (c_void_p * POLL_BATCH)()
        self._out = c_void_p()
        rbd = self.rbd
        self._create = rbd.rbd_aio_create_completion
        self._release = rbd.rbd_aio_release
        self._value = rbd.rbd_aio_get_return_value
        self._poll = rbd.rbd_poll_io_events
        self._aio_read = rbd.rbd_aio_read
        self._aio_write = rbd.rbd_aio_write
        self._arg = rbd.rbd_aio_get_arg
        # The calls a compiled pass issues requests with (driver.AsyncTarget's ops), and
        # those a compiled reaper takes completions with (driver.Reaper's).
        self.ops = tuple(ctypes.cast(fn, c_void_p).value for fn in (
            self._create, self._aio_read, self._aio_write, self._release))
        self.reap_calls = tuple(ctypes.cast(fn, c_void_p).value for fn in (
            self._poll, self._arg, self._value, self._release))
        try:
            self._open(writable)
        except BaseException:
            self.close()
            raise

    def _open(self, writable: bool) -> None:
        spec, rados = self.spec, self.rados
        user = spec.user.encode() if spec.user else None
        _check(rados.rados_create(byref(self.cluster), user), spec, "librados")
        if spec.conf:
            _check(rados.rados_conf_read_file(self.cluster, spec.conf.encode()), spec,
                   f"cannot read {spec.conf}")
        else:
            ret = rados.rados_conf_read_file(self.cluster, None)
            if ret < 0 and ret != -errno.ENOENT:
                _check(ret, spec, "cannot read the Ceph configuration")
        rados.rados_conf_parse_env(self.cluster, None)
        options = {**OUR_DEFAULTS, **spec.options}
        for key, value in options.items():
            if rados.rados_conf_set(self.cluster, key.encode(), value.encode()) < 0:
                raise UsageError(f"rbd:{spec.name()}: option {key}={value} refused",
                                 errno.EINVAL)
        _check(rados.rados_connect(self.cluster), spec, "cannot connect to the cluster")
        _check(rados.rados_ioctx_create(self.cluster, spec.pool.encode(),
                                        byref(self.ioctx)), spec, f"pool {spec.pool!r}")
        if spec.namespace:
            rados.rados_ioctx_set_namespace(self.ioctx, spec.namespace.encode())
        opener = self.rbd.rbd_open if writable else self.rbd.rbd_open_read_only
        snap = spec.snap.encode() if spec.snap else None
        _check(opener(self.ioctx, spec.image.encode(), byref(self.image), snap), spec,
               "cannot open the image")
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        _check(self.rbd.rbd_set_image_notification(self.image, self.eventfd,
                                                   EVENT_TYPE_EVENTFD),
               spec, "completion notification")

    def config(self, key: str) -> str:
        """The value of a Ceph option as this connection has it (its conf file, the
        environment, our defaults and the spec's options applied)."""
        out = ctypes.create_string_buffer(256)
        ret = self.rados.rados_conf_get(self.cluster, key.encode(), out, len(out))
        if ret < 0:
            raise OSError(-ret, f"{key}: {os.strerror(-ret)}")
        return out.value.decode()

    # ---------------------------------------------------------------- requests
    # Each call issues one request and returns its completion (an address), which
    # poll() gives back once librbd is done; refused requests raise OSError and leave
    # nothing behind. The caller keeps the buffers (and what pins them) until then.
    def _completion(self) -> int:
        ret = self._create(None, None, self._out)
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))
        return self._out.value  # type: ignore[return-value]

    def _issue(self, ret: int, comp: int) -> int:
        if ret < 0:  # refused before queueing: no completion will come
            self._release(comp)
            raise OSError(-ret, os.strerror(-ret))
        return comp

    @staticmethod
    def pin(view: memoryview) -> Any:
        """A ctypes array over a writable buffer (passed as its address)."""
        return (ctypes.c_char * len(view)).from_buffer(view)

    @classmethod
    def iovec(cls, iov: Sequence[memoryview]) -> tuple[Any, list[Any]]:
        """An iovec array for writable buffers and what keeps them pinned."""
        vec = (IoVec * len(iov))()
        keep: list[Any] = [vec]
        for i, view in enumerate(iov):
            pinned = cls.pin(view)
            keep.append(pinned)
            vec[i].iov_base = ctypes.addressof(pinned)
            vec[i].iov_len = len(view)
        return vec, keep

    def read(self, offset: int, pinned: Any) -> int:
        comp = self._completion()
        return self._issue(self._aio_read(self.image, offset, len(pinned), pinned, comp),
                           comp)

    def write(self, offset: int, pinned: Any) -> int:
        comp = self._completion()
        return self._issue(self._aio_write(self.image, offset, len(pinned), pinned, comp),
                           comp)

    def readv(self, offset: int, vec: Any) -> int:
        comp = self._completion()
        return self._issue(self.rbd.rbd_aio_readv(self.image, vec, len(vec), offset, comp),
                           comp)

    def flush(self) -> int:
        comp = self._completion()
        return self._issue(self.rbd.rbd_aio_flush(self.image, comp), comp)

    def discard(self, offset: int, length: int) -> int:
        comp = self._completion()
        return self._issue(self.rbd.rbd_aio_discard(self.image, offset, length, comp), comp)

    def write_zeroes(self, offset: int, length: int, flags: int) -> int:
        comp = self._completion()
        return self._issue(self.rbd.rbd_aio_write_zeroes(self.image, offset, length, comp,
                                                         flags, 0), comp)

    def poll(self, mine: Container[int]) -> tuple[list[tuple[int, int]],
                                                 list[tuple[int, int]]]:
        """Every request finished since the last call (the eventfd's count is cleared
        first, so a completion landing meanwhile signals again): (completion, return
        value) of those in ``mine`` (the caller's, issued here), and (argument, return
        value) of the others, which a compiled pass issued with an argument of its own
        (driver.AsyncTarget)."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        out: list[tuple[int, int]] = []
        theirs: list[tuple[int, int]] = []
        image, events = self.image, self._events
        poll, value, release, get_arg = self._poll, self._value, self._release, self._arg
        while True:
            n = poll(image, events, POLL_BATCH)
            for comp in events[:n]:
                if comp in mine:
                    out.append((comp, value(comp)))
                else:
                    theirs.append((get_arg(comp), value(comp)))
                release(comp)
            if n < POLL_BATCH:
                return out, theirs

    # ---------------------------------------------------------------- the map
    def data_runs(self, offset: int, length: int, end: int, whole_object: bool
                  ) -> list[tuple[int, int]]:
        """(start, stop) of the extents holding data in [offset, end), unsorted
        (blocking: diff_iterate against nothing)."""
        found: list[tuple[int, int]] = []

        def seen(off: int, n: int, exists: int, _arg: Any) -> int:
            if exists:
                found.append((max(off, offset), min(off + n, end)))
            return 0

        callback = DiffCallback(seen)
        ret = self.rbd.rbd_diff_iterate2(self.image, None, offset, length, 1,
                                         1 if whole_object else 0, callback, None)
        if ret < 0:
            raise OSError(-ret, f"rbd:{self.spec.name()}: diff_iterate: "
                                f"{os.strerror(-ret)}")
        return found

    def close(self) -> None:
        if self.image:
            self.rbd.rbd_close(self.image)
            self.image = c_void_p()
        if self.ioctx:
            self.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = c_void_p()
        if self.cluster:
            self.rados.rados_shutdown(self.cluster)
            self.cluster = c_void_p()
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1

