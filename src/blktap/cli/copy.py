"""``blktap copy``: copy the allocated extents of a disk onto another.

    blktap copy SRC DST [--zero-holes] [--progress] [--json]
                [--check-mirror PID:MINOR] [--chunk SIZE] [--depth N] [--no-direct]

SRC and DST are driver specs, as tapdisk opens them (``vhd:PATH``, ``aio:PATH``,
``qcow2:PATH``, and remote disks where a driver for them is installed). SRC is opened
read-only; its block status says what holds data, and only that is read and written
(ranges reading as zeros are skipped, or zeroed on DST with ``--zero-holes``). DST keeps
its size and must be at least as large as SRC. This is the background copy of a live
storage migration (docs/migration.md): ``--check-mirror`` then asks the tapdisk
mirroring the live disk whether its mirror is intact, and fails (EIO) if it failed
during the copy.

Prints one summary line (or a JSON object); a progress bar on stderr when it is a
terminal or with ``--progress``. Errors: one line, exit code the errno.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import sys
from collections.abc import Callable
from typing import Any

from blktap.cli.common import Progress, add_output_option, human_size, print_json
from blktap.errors import BlktapError, UsageError


def add_parser(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "copy", run_args,
                  "Copy only the allocated extents of a disk onto another (block status).")
    cmd.add_argument("src", metavar="SRC", help="TYPE:PATH of the disk to read")
    cmd.add_argument("dst", metavar="DST", help="TYPE:PATH of the disk to write")
    cmd.add_argument("--zero-holes", action="store_true",
                     help="make the ranges SRC reads as zeros zero on DST too (for a "
                          "destination that is not empty)")
    cmd.add_argument("-p", "--progress", action="store_true",
                     help="draw the progress bar even when stderr is not a terminal")
    add_output_option(cmd)
    cmd.add_argument("--check-mirror", metavar="PID:MINOR",
                     help="after the copy, fail unless that tapdisk's mirror is intact")
    cmd.add_argument("--chunk", default="2M", help="bytes per request (default 2M)")
    cmd.add_argument("--depth", type=int, default=4, help="requests in flight (default 4)")
    cmd.add_argument("--no-direct", dest="direct", action="store_false",
                     help="use the page cache (files on tmpfs)")


def parse_target(text: str) -> tuple[int, int]:
    pid, sep, minor = text.partition(":")
    if not sep or not pid.isdigit() or not minor.isdigit():
        raise UsageError(f"--check-mirror {text!r}: use PID:MINOR (as tap-ctl list prints)")
    return int(pid), int(minor)


def mirror_problem(pid: int, minor: int) -> str | None:
    """Why the mirror of that VBD is not intact, or None."""
    from blktap.control.client import TapCtl

    stats = json.loads(TapCtl().stats(pid, minor))
    mirror = stats.get("mirror")
    if mirror is None:
        return f"tapdisk {pid} minor {minor} has no secondary"
    if stats.get("nbd_mirror_failed") or mirror.get("state") != "active":
        return (f"the mirror of tapdisk {pid} minor {minor} to {mirror.get('secondary')} is "
                f"{mirror.get('state')}: {mirror.get('error') or 'no error recorded'}")
    return None


def run_args(args: argparse.Namespace) -> int:
    from blktap.cli.serve import parse_size

    chunk = parse_size(args.chunk)
    if chunk % 512:
        raise UsageError(f"--chunk {args.chunk}: not a multiple of 512")
    if args.depth < 1:
        raise UsageError("--depth must be at least 1")
    target = parse_target(args.check_mirror) if args.check_mirror else None
    result = asyncio.run(_copy(args, chunk))
    if target is not None:
        problem = mirror_problem(*target)
        if problem is not None:
            raise BlktapError(problem, errno.EIO)
    if args.json:
        print_json({"src": args.src, "dst": args.dst, "size": result.size,
                    "copied": result.copied, "zeroed": result.zeroed,
                    "skipped": result.skipped, "extents": result.extents,
                    "seconds": round(result.seconds, 3)})
    else:
        rate = result.copied / result.seconds if result.seconds > 0 else 0
        print(f"Copied {human_size(result.copied)} in {result.extents} extents from "
              f"{args.src} to {args.dst} ({human_size(result.skipped + result.zeroed)} of "
              f"zeros {'zeroed' if args.zero_holes else 'skipped'}, "
              f"{result.seconds:.1f} s, {human_size(int(rate))}/s)")
    return 0


async def _copy(args: argparse.Namespace, chunk: int) -> Any:
    from blktap.io import best_engine
    from blktap.tapdisk.copy import copy_allocated
    from blktap.tapdisk.drivers import open_stack

    engine = best_engine()
    opened = []
    try:
        src = await engine.call(open_stack, engine, args.src, writable=False,
                                direct=args.direct)
        opened.append(src)
        dst = await engine.call(open_stack, engine, args.dst, writable=True,
                                direct=args.direct)
        opened.append(dst)
        with Progress("copying", src.size, enabled=True if args.progress else None) as bar:
            return await copy_allocated(src, dst, zero_holes=args.zero_holes, chunk=chunk,
                                        depth=args.depth, progress=bar.update)
    finally:
        # DST's close writes its metadata back (a VHD's batmap and footer): its errors
        # count, unless the copy failed already.
        errors: list[BaseException] = []
        for top in reversed(opened):
            try:
                await top.close_chain()
            except (OSError, BlktapError) as exc:
                errors.append(exc)
        engine.close()
        if errors and sys.exc_info()[1] is None:
            raise errors[0]
