"""``blktap`` maintenance commands: coalesce, rebase, resize.

They change images in place, so each one says exactly what it did, and ``--json`` gives
the same facts to scripts.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from blktap.cli import qcow2_layers
from blktap.cli.common import (
    add_output_option,
    add_parent_dir,
    add_progress_option,
    describe_size,
    human_size,
    parent_policy,
    parse_size,
    print_json,
    print_note,
    progress_for,
)
from blktap.errors import BlktapError, UsageError
from blktap.image.chain import parse_spec, probe, refuse_probed_parent
from blktap.image.crypto import read_key_file
from blktap.image.fileio import file_size_of, is_regular
from blktap.image.vhd.coalesce import coalesce
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.journal import revert as revert_resize
from blktap.image.vhd.rebase import rebase
from blktap.image.vhd.resize import load_target, resize, round_size

log = logging.getLogger("blktap.cli")
Register = Callable[[Any, str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_commands(sub: Any, command: Register) -> None:
    cmd = command(sub, "coalesce", cmd_coalesce,
                  "Merge IMAGE, a differencing VHD, into its parent.")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("--sparse", action="store_true",
                     help="do not allocate blocks of zeros in a parent that reads zeros there")
    cmd.add_argument("--rebase-children", action="store_true",
                     help="then point the VHDs in IMAGE's folder whose parent is IMAGE at "
                          "IMAGE's parent (their content does not change)")
    cmd.add_argument("--remove", action="store_true",
                     help="then delete IMAGE (refused while a VHD in its folder still has "
                          "IMAGE as its parent)")
    add_output_option(cmd)
    add_progress_option(cmd)
    add_parent_dir(cmd)

    cmd = command(sub, "commit", cmd_commit,
                  "Write what IMAGE holds into its parent (qcow2 over qcow2, VHD or raw; "
                  "a VHD: as coalesce).")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    add_parent_dir(cmd)

    cmd = command(sub, "resize", cmd_resize,
                  "Grow IMAGE's virtual size to SIZE (a VHD, a qcow2 image or a raw file; "
                  "a qcow2 image also shrinks when nothing is stored past SIZE).")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("size", metavar="SIZE", type=parse_size,
                     help="the new virtual size: bytes or 64M, 10G... (VHD: rounded up to "
                          "2 MiB)")
    cmd.add_argument("--journal", metavar="PATH",
                     help="where to keep the undo journal while a VHD's metadata must move "
                          "(default: a hidden file beside IMAGE, removed when done)")
    add_output_option(cmd)

    cmd = command(sub, "revert", cmd_revert,
                  "Undo an interrupted VHD resize with its journal.")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("journal", metavar="JOURNAL")
    add_output_option(cmd)

    cmd = command(sub, "rebase", cmd_rebase,
                  "Give IMAGE, a differencing VHD or a qcow2 image, the parent PARENT; its "
                  "content stays the same (qcow2: PARENT '' removes the backing file).")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("parent", metavar="PARENT")
    cmd.add_argument("--raw-parent", action="store_true",
                     help="PARENT is a raw image (same as an aio:/raw: prefix)")
    cmd.add_argument("--unsafe", action="store_true",
                     help="only rewrite the parent pointers, copying nothing (right when "
                          "PARENT holds the same data as the old parent; vhd-util modify -p)")
    cmd.add_argument("--key-file", metavar="PATH",
                     help="the AES-XTS key (32 or 64 bytes) of an encrypted chain")
    add_output_option(cmd)
    add_progress_option(cmd)
    add_parent_dir(cmd)


def vhd_path(spec: str, *, follows_parent: bool = False) -> str:
    """The path of a VHD argument. ``follows_parent``: the command will open the image's
    parent, which a plain (probed) path does not allow (docs/security.md)."""
    fmt, path = parse_spec(spec)
    if fmt not in (None, "vhd"):
        raise UsageError(f"{spec}: this command works on VHD images")
    if fmt is None and follows_parent:
        refuse_probed_parent(path)
    return path


def children_of(image: str) -> list[str]:
    """The VHD files in ``image``'s folder whose parent is ``image``."""
    folder = os.path.dirname(os.path.abspath(image))
    target = os.stat(image)
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if os.path.samestat(entry.stat(), target):
            continue
        try:
            with VhdImage.open(entry.path) as candidate:
                if not candidate.is_differencing:
                    continue
                parent = candidate.parent_path()
        except (OSError, BlktapError):  # not a VHD, or a broken one: not ours
            continue
        if os.path.exists(parent) and os.path.samestat(os.stat(parent), target):
            found.append(entry.path)
    return found


def cmd_coalesce(args: argparse.Namespace) -> int:
    path = vhd_path(args.image, follows_parent=True)
    policy = parent_policy(args)
    with VhdImage.open(path) as child:
        # The library counts blocks; the bar shows bytes of the disk covered.
        block_size = child.block_size
        total = len(child.bat) * block_size
    children = children_of(path) if args.rebase_children or args.remove else []
    if args.remove and children and not args.rebase_children:
        raise UsageError(f"not removing {path}: {', '.join(children)} still use it as "
                         f"their parent (add --rebase-children)")
    log.info("coalescing %s into its parent%s", path, " (sparse)" if args.sparse else "")
    with progress_for(args, "coalescing", total) as progress:
        started = time.monotonic()
        result = coalesce(path, sparse=args.sparse,
                          progress=lambda done, _: progress.update(done * block_size),
                          parent_policy=policy)
        elapsed = time.monotonic() - started
    report: dict[str, Any] = {
        "image": path, "parent": result.parent, "parent_is_raw": result.parent_is_raw,
        "sectors": result.sectors, "bytes": result.bytes, "blocks": result.blocks,
        "skipped_zero_bytes": result.skipped_zero_sectors * 512,
        "seconds": round(elapsed, 3), "rebased": [], "removed": False,
    }
    if args.rebase_children:
        from blktap.image.vhd.reparent import set_parent

        for child_path in children:
            set_parent(child_path, result.parent, raw=result.parent_is_raw)
            report["rebased"].append(child_path)
    if args.remove:
        os.unlink(path)
        report["removed"] = True
    if args.json:
        print_json(report)
        return 0
    rate = result.bytes / elapsed if elapsed > 0 else 0
    print(f"Coalesced {path} into {result.parent}: {describe_size(result.bytes)} in "
          f"{result.blocks} block{'s' if result.blocks != 1 else ''} "
          f"({human_size(int(rate))}/s)")
    if result.skipped_zero_sectors:
        print_note(f"{human_size(result.skipped_zero_sectors * 512)} of zeros were not "
                   f"allocated in the parent (--sparse)")
    for rebased in report["rebased"]:
        print(f"Rebased {rebased} onto {result.parent}")
    if report["removed"]:
        print(f"Removed {path}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    if qcow2_layers.is_qcow2(args.image):
        return qcow2_layers.cmd_commit(args)
    args.sparse = False
    args.rebase_children = args.remove = False
    return cmd_coalesce(args)


def cmd_rebase(args: argparse.Namespace) -> int:
    if qcow2_layers.is_qcow2(args.image):
        return qcow2_layers.cmd_rebase(args)
    path = vhd_path(args.image, follows_parent=True)
    policy = parent_policy(args)
    fmt, parent = parse_spec(args.parent)
    raw = args.raw_parent or fmt in ("raw", "aio")
    if fmt == "vhd" and args.raw_parent:
        raise UsageError(f"{args.parent}: the vhd: prefix contradicts --raw-parent")
    if fmt is None and not raw:
        refuse_probed_parent(parent)
    log.info("rebasing %s onto %s (%s)", path, parent,
             "pointers only" if args.unsafe else "content kept")
    with progress_for(args, "comparing parents", 1) as progress:

        def report(done: int, total: int) -> None:
            progress.total = total
            progress.update(done)

        key = read_key_file(args.key_file) if args.key_file else None
        result = rebase(path, parent, raw=raw, safe=not args.unsafe, key=key, progress=report,
                        parent_policy=policy)
    if args.json:
        print_json({"image": path, "parent": result.parent.path, "parent_is_raw": raw,
                    "safe": not args.unsafe, "compared_bytes": result.compared_bytes,
                    "copied_bytes": result.copied_bytes})
        return 0
    how = ("pointers only" if args.unsafe else
           f"{human_size(result.copied_bytes)} copied in to keep its content")
    print(f"Rebased {path} onto {result.parent.path} ({how})")
    return 0


def default_journal(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.resize-journal")


def cmd_resize(args: argparse.Namespace) -> int:
    fmt, path = parse_spec(args.image)
    fmt = fmt or probe(path)
    if fmt == "raw":
        return _resize_raw(path, args)
    if fmt == "qcow2":
        return qcow2_layers.cmd_resize(args, path)
    target = load_target(path)
    old = target.size
    new = round_size(args.size)
    if args.size < old:
        raise UsageError(f"{path}: shrinking a VHD is not supported ({describe_size(old)} "
                         f"now, {describe_size(args.size)} asked)", errno.ENOSYS)
    how = "unchanged"
    if new != old:
        if target.is_dynamic and new <= target.max_fast_size:
            resize(path, new)
            how = "fast: within the preallocated metadata"
        else:
            journal = args.journal or default_journal(path)
            resize(path, new, journal=journal)
            how = "journaled: the metadata grew"
    if args.json:
        print_json({"image": path, "format": "vhd", "old_size": old, "new_size": new,
                    "method": how.split(":")[0]})
        return 0
    if new != args.size:
        print_note(f"size rounded up from {describe_size(args.size)} to "
                   f"{describe_size(new)}: VHD sizes are whole 2 MiB blocks")
    print(f"Resized {path}: {describe_size(old)} -> {describe_size(new)} ({how})")
    return 0


def _resize_raw(path: str, args: argparse.Namespace) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        old = file_size_of(fd)
        if args.size < old:
            raise UsageError(f"{path}: shrinking is not supported (it would cut off data)",
                             errno.ENOSYS)
        if not is_regular(fd):
            if args.size != old:
                raise UsageError(f"{path}: a block device cannot be resized here",
                                 errno.EINVAL)
        elif args.size != old:
            os.ftruncate(fd, args.size)
            os.fsync(fd)
    finally:
        os.close(fd)
    if args.json:
        print_json({"image": path, "format": "raw", "old_size": old, "new_size": args.size,
                    "method": "truncate"})
        return 0
    print(f"Resized {path}: {describe_size(old)} -> {describe_size(args.size)}")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    path = vhd_path(args.image)
    revert_resize(path, args.journal)
    if args.json:
        print_json({"image": path, "journal": args.journal, "reverted": True})
        return 0
    print(f"Reverted {path} to its size before the interrupted resize; {args.journal} "
          f"removed")
    return 0
