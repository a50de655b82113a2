"""``blktap snapshot/rebase/commit/resize`` on qcow2 images (the VHD commands hand over
to these functions when the image is qcow2; the library is
:mod:`blktap.image.qcow2.layers`)."""

from __future__ import annotations

import argparse
import errno
import time

from blktap.cli.common import (
    describe_size,
    human_size,
    parent_policy,
    print_json,
    print_note,
)
from blktap.errors import UsageError
from blktap.image.chain import parse_spec, probe, probed_backing_error, refuse_probed_parent
from blktap.image.qcow2 import layers
from blktap.image.qcow2.image import Qcow2Image


def is_qcow2(spec: str) -> bool:
    """The spec names a qcow2 image: a qcow2: prefix, or a plain path that probes so."""
    fmt, path = parse_spec(spec)
    if fmt is not None:
        return fmt == "qcow2"
    try:
        return probe(path) == "qcow2"
    except OSError:
        return False


def qcow2_path(spec: str, *, follows_parent: bool) -> str:
    """The path of a qcow2 argument; a probed (plain path) image whose backing file the
    command would open is refused, as for VHD (docs/security.md)."""
    fmt, path = parse_spec(spec)
    if fmt is None and follows_parent:
        with Qcow2Image.open(path) as image:
            if image.is_differencing:
                raise probed_backing_error(path, image)
    return path


def backing_arg(spec: str, raw_flag: bool) -> tuple[str, str]:
    """(format, path) of a backing file argument: a prefix, --raw-parent, or probed (a
    probed image that names parents of its own is refused)."""
    fmt, path = parse_spec(spec)
    if raw_flag:
        if fmt not in (None, "raw"):
            raise UsageError(f"{spec}: the {fmt}: prefix contradicts --raw-parent")
        return "raw", path
    if fmt is not None:
        return fmt, path
    fmt = probe(path)
    if fmt == "vhd":
        refuse_probed_parent(path)
    elif fmt == "qcow2":
        qcow2_path(path, follows_parent=True)
    elif fmt == "raw":
        raise UsageError(f"{path} is a raw image: pass --raw-parent (or name it "
                         f"raw:{path}) to use it as a backing file")
    return fmt, path


def cmd_snapshot(args: argparse.Namespace, child: str) -> int:
    fmt, parent = backing_arg(args.parent, args.raw_parent)
    if args.prealloc is not None:
        raise UsageError("--prealloc applies to VHD snapshots")
    size = layers.snapshot(child, parent, fmt)
    print(f"Created {child}: qcow2, {describe_size(size)}, backing file {parent} ({fmt})")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    path = qcow2_path(args.image, follows_parent=not args.unsafe)
    if args.parent in ("", "none:"):
        new, fmt = None, None
    else:
        fmt, new = backing_arg(args.parent, args.raw_parent)
    result = layers.rebase(path, new, fmt, safe=not args.unsafe,
                           parent_policy=parent_policy(args))
    if args.json:
        print_json({"image": path, "format": "qcow2", "parent": new, "parent_format": fmt,
                    "safe": not args.unsafe, "compared_bytes": result.compared_bytes,
                    "copied_bytes": result.copied_bytes})
        return 0
    how = ("pointers only" if args.unsafe else
           f"{human_size(result.copied_bytes)} copied in to keep its content")
    print(f"Rebased {path} onto {new or 'no backing file'} ({how})")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    path = qcow2_path(args.image, follows_parent=True)
    started = time.monotonic()
    result = layers.commit(path, parent_policy=parent_policy(args))
    elapsed = time.monotonic() - started
    if args.json:
        print_json({"image": path, "format": "qcow2", "parent": result.backing,
                    "parent_format": result.backing_format, "bytes": result.bytes,
                    "seconds": round(elapsed, 3)})
        return 0
    print(f"Committed {path} into {result.backing} ({result.backing_format}): "
          f"{describe_size(result.bytes)}")
    print_note(f"{path} is unchanged and still reads the same; delete it or keep writing "
               f"to it")
    return 0


def cmd_resize(args: argparse.Namespace, path: str) -> int:
    if args.size % 512:
        raise UsageError(f"invalid size {args.size}: a qcow2 size is a multiple of 512",
                         errno.EINVAL)
    old, new = layers.resize(path, args.size)
    if args.json:
        print_json({"image": path, "format": "qcow2", "old_size": old, "new_size": new,
                    "method": "unchanged" if old == new else
                    "grow" if new > old else "shrink"})
        return 0
    print(f"Resized {path}: {describe_size(old)} -> {describe_size(new)}")
    return 0
