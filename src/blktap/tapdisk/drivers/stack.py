"""Building a driver stack from ``type:args``: the reference's chain construction.

1. ``type:`` is looked up in the one table (:mod:`.registry`); a plain path is probed
   (``vhd``, ``qcow2`` or ``aio``), where the caller allows it.
2. The layer is opened (:meth:`Driver.open_layer`). VHD and qcow2 images come back with
   their whole chain attached (the library's chain checks, :mod:`.images`).
3. Its :meth:`Driver.parent_spec` (``td_get_parent_id``) is opened the same way, from
   step 1: read-only for a parent an image names (the parent policy confines it like a
   VHD's, loops and depth are refused like a VHD chain's), with the layer's own
   writability for the layer a filter wraps. A filter's size is its parent's. Then
   :meth:`Driver.validate_parent` (``td_validate_parent``) may refuse it.
4. What the layer declares is checked against what it implements (:func:`check_layer`):
   a plugin that declares a capability it lacks is refused at open, not at the first
   request that needs it.

Whatever fails, what was opened is closed again, and the error names the layer.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re

from blktap.errors import (
    BlktapError,
    ChainTooDeep,
    DriverError,
    EncryptionError,
    ParentLoop,
    UsageError,
)
from blktap.image.chain import DEFAULT_MAX_DEPTH, probe
from blktap.image.parents import ParentPolicy, default_policy
from blktap.io.engine import Engine
from blktap.tapdisk.driver import CAP_METHODS, WRITE_CAPS, Caps, Driver, OpenContext
from blktap.tapdisk.drivers import registry

_SPEC = re.compile(r"^([a-z][a-z0-9+_-]*):(.*)$")
# An NBD URI given whole (nbd://..., nbds+unix://...) is the nbd driver's path.
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


# ---------------------------------------------------------------------- names
def split_type(spec: str) -> tuple[str | None, str]:
    """``type:path`` -> (type, path); a plain path -> (None, path). An unknown or
    unimplemented type is an error, and so is a plugin that cannot be loaded; nothing
    is opened."""
    match = _SPEC.match(spec)
    if match:
        kind, path = match[1], match[2]
        if kind in NBD_SCHEMES and path.startswith("//"):
            return "nbd", spec  # an NBD URI given whole is the nbd driver's path
        registry.driver_class(kind, spec)  # raises: ENOENT, ENOSYS, ELIBBAD (plugins)
        if not path:
            raise UsageError(f"{spec}: no path after {kind}:")
        return kind, path
    return None, spec


def require_type(spec: str) -> tuple[str, str]:
    """``type:path`` -> (type, path); a plain path is an error (EINVAL), as in the
    reference tapdisk: a disk a guest writes to must not have its format guessed."""
    kind, path = split_type(spec)
    if kind is None:
        raise UsageError(f"{spec}: no driver type; name it TYPE:PATH "
                         f"({', '.join(k + ':' for k in registry.implemented())})")
    return kind, path


def probed_driver(path: str) -> str:
    """The driver for a file of probed format: never ``aio`` for a VHD or qcow2 image,
    which would serve its metadata as disk content."""
    return {"vhd": "vhd", "qcow2": "qcow2", "qcow": "qcow"}.get(probe(path), "aio")


def parse(spec: str) -> tuple[str, str]:
    """``type:path`` -> (type, path); a plain path -> (probed type, path)."""
    kind, path = split_type(spec)
    if kind is None:
        kind = probed_driver(path)
    return kind, path


# ---------------------------------------------------------------------- checks
def check_layer(driver: Driver, spec: str, writable: bool) -> None:
    """Refuse a layer whose declarations do not hold (DriverError, EINVAL; EROFS for a
    layer asked to be writable that cannot be written)."""
    caps = driver.caps
    if not isinstance(caps, Caps):
        raise DriverError(f"{spec}: caps is {caps!r}, not a blktap.driver.Caps")
    if not isinstance(driver.size, int) or isinstance(driver.size, bool) or driver.size < 0:
        raise DriverError(f"{spec}: size {driver.size!r} is not a byte count")
    kind = type(driver)
    for cap, method in CAP_METHODS.items():
        if caps & cap and getattr(kind, method) is getattr(Driver, method):
            raise DriverError(f"{spec}: declares Caps.{cap.name} but does not "
                              f"implement {method}()")
    if caps & WRITE_CAPS and not driver.writable:
        raise DriverError(f"{spec}: declares Caps.{(caps & WRITE_CAPS).name} but was "
                          f"opened read-only")
    if writable and not (driver.writable and caps & Caps.WRITE):
        raise DriverError(f"{spec}: cannot be written (no Caps.WRITE); open it "
                          f"read-only", errno.EROFS)
    if not writable and driver.writable:
        raise DriverError(f"{spec}: was asked to open read-only but says it is writable")


def _identity(spec: str) -> object:
    """What two specs naming the same layer share: the file's (device, inode) when the
    args are an existing file system object, else the spec itself."""
    _, _, args = spec.partition(":")
    try:
        st = os.stat(args)
    except (OSError, ValueError):
        return spec
    return st.st_dev, st.st_ino


def close_now(driver: Driver) -> None:
    """Close a stack that will never be served, from the thread that opened it (not the
    event loop's): each layer's close() runs until it first waits; what it handed to
    the engine by then completes there."""
    for layer in driver.chain():
        coro = layer.close()
        try:
            coro.send(None)
        except StopIteration:
            continue
        except Exception:  # noqa: S112 - the open's error is the one to report
            continue
        coro.close()


# ---------------------------------------------------------------------- opening
def open_stack(engine: Engine, spec: str, *, writable: bool, direct: bool = True,
               key: bytes | None = None, follow_probed_parents: bool = False,
               parent_policy: ParentPolicy | None = None) -> Driver:
    """Open the driver stack for ``spec`` (blocking: metadata is read here).

    For a VHD, every parent named by its locators is opened read-only (the library's
    chain checks apply: loops, uuids, depth, the parent policy ``parent_policy``, by
    default the environment's); a raw parent gets the ``aio`` driver. A plain path is
    probed, and a probed differencing VHD raises ProbedParent unless
    ``follow_probed_parents`` (docs/security.md). Any other driver may name its parent
    (:meth:`Driver.parent_spec`), opened as described in this module's doc.

    ``key`` (``tap-ctl open -E``) opens an encrypted VHD chain with the library's checks
    (docs/encryption.md): an encrypted layer without a key or a key for a clear one is
    refused with EINVAL, a key whose hash does not match with ENOKEY. Each VHD driver gets
    its own layer's cipher; a raw parent is read as stored. Drivers without
    ``accepts_key`` (``aio``, ``ram``...) have nothing to check a key against and refuse
    one (EINVAL).
    """
    ctx = OpenContext(engine, writable, direct=direct, key=key,
                      follow_probed_parents=follow_probed_parents,
                      parent_policy=parent_policy)
    return _open(ctx, spec, seen={_identity(spec)}, depth=1, top=True)


def _open(ctx: OpenContext, spec: str, *, seen: set[object], depth: int,
          top: bool = False) -> Driver:
    kind, args = split_type(spec)
    if kind is None:
        if not top:
            raise UsageError(f"{spec}: a layer below another must be named TYPE:ARGS")
        kind = probed_driver(args)
        ctx = dataclasses.replace(ctx, probed=True)
    cls = registry.driver_class(kind, spec)
    if ctx.key is not None and not cls.accepts_key:
        raise EncryptionError(f"{args}: the {kind} driver serves data as it is stored and "
                              f"cannot decrypt it, but a key was given", errno.EINVAL)
    plugin = registry.table()[kind].plugin
    try:
        driver = cls.open_layer(ctx, args)
    except BlktapError:
        raise
    except OSError as exc:
        if not plugin:
            raise
        raise BlktapError(f"{spec}: {exc.strerror or exc}", exc.errno or errno.EIO) from exc
    except Exception as exc:
        if not plugin:
            raise
        raise DriverError(f"{spec}: {registry.table()[kind].origin} failed to open: "
                          f"{type(exc).__name__}: {exc}", errno.EIO) from exc
    if not isinstance(driver, Driver):
        raise DriverError(f"{spec}: open_layer returned {type(driver).__name__}, not a "
                          f"Driver")
    try:
        if not driver.path:
            driver.path = args
        below = driver.parent_spec() if driver.parent is None else None
        if below is not None:
            _attach(ctx, driver, spec, below, seen=seen, depth=depth)
        check_layer(driver, spec, ctx.writable)
    except BaseException:
        close_now(driver)
        raise
    return driver


def _attach(ctx: OpenContext, driver: Driver, spec: str, below: str, *,
            seen: set[object], depth: int) -> None:
    """Open the layer ``driver`` names below it, attach and validate it."""
    if not isinstance(below, str):
        raise DriverError(f"{spec}: parent_spec() returned {below!r}, not a TYPE:ARGS str")
    if depth >= DEFAULT_MAX_DEPTH:
        raise ChainTooDeep(f"{spec}: stack deeper than {DEFAULT_MAX_DEPTH} layers")
    ident = _identity(below)
    if ident in seen:
        raise ParentLoop(f"{spec}: its parent {below} is already in the stack")
    if driver.is_filter:
        # The filter's user named what it wraps: it is opened as the filter is.
        pctx = dataclasses.replace(ctx, probed=False,
                                   writable=ctx.writable and type(driver).parent_writable)
    else:
        # A parent named by an image: whoever wrote the image chose it.
        kind, _, args = below.partition(":")
        if kind == "rbd":  # a Ceph image: only from the pools the operator lists
            default_policy(ctx.parent_policy).check_rbd(spec, below)
        elif os.path.exists(args):
            policy = default_policy(ctx.parent_policy)
            real = os.path.realpath(args)
            if not policy.allows(real):
                policy.check(spec, args)  # raises ParentNotAllowed, saying why
        pctx = dataclasses.replace(ctx, probed=False, writable=False)
    parent = _open(pctx, below, seen=seen | {ident}, depth=depth + 1)
    try:
        driver.parent = parent
        if driver.is_filter:
            driver.size = parent.size
        driver.validate_parent(parent)
    except BlktapError:
        close_now(parent)
        driver.parent = None
        raise
    except Exception as exc:
        close_now(parent)
        driver.parent = None
        raise DriverError(f"{spec}: validate_parent({below}) failed: "
                          f"{type(exc).__name__}: {exc}", errno.EIO) from exc


__all__ = ["check_layer", "close_now", "open_stack", "parse", "probed_driver",
           "require_type", "split_type"]
