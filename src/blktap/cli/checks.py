"""``blktap check`` and ``blktap measure``: qemu-img's check and measure, for every
format this package reads (raw, VHD and its chains, qcow2).

    blktap check [-r leaks|all] [--output=json] IMAGE
    blktap measure [-O FMT] [-o OPTIONS] [--fixed] [--output=json] (--size SIZE | IMAGE)

check's exit code is qemu-img's: 0 clean, 1 the check could not complete (the file cannot
be opened or read), 2 corruptions, 3 leaks only. ``vhd:PATH`` also checks the VHD's
parents (within ``--parent-dir``); a plain path checks that image alone.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from blktap.cli.common import (
    add_output_option,
    add_parent_dir,
    error_message,
    parent_policy,
    parse_size,
    print_error,
    print_json,
)
from blktap.errors import BlktapError, FormatError, UsageError
from blktap.image import checking
from blktap.image import measure as measuring
from blktap.image.chain import Chain, parse_spec, probe
from blktap.image.qcow2 import structs as qs
from blktap.image.qcow2.create import DEFAULT_CLUSTER_SIZE
from blktap.image.qcow2.image import Qcow2Image

log = logging.getLogger("blktap.cli")
Register = Callable[[Any, str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]
# The qcow2 creation options that change what a new image needs (qemu-img's names).
MEASURE_QCOW2_OPTIONS = ("cluster_size", "refcount_bits", "extended_l2", "preallocation")


def add_commands(sub: Any, command: Register) -> None:
    cmd = command(sub, "check", cmd_check,
                  "Check an image's consistency as qemu-img check does. Exit 0 clean, 1 "
                  "check not completed, 2 corruptions, 3 leaks only.")
    cmd.add_argument("image", metavar="IMAGE",
                     help="qcow2:PATH, vhd:PATH (with its parents), raw:PATH, or a plain "
                          "path (format probed; the image alone)")
    cmd.add_argument("-r", "--repair", choices=("leaks", "all"),
                     help="repair leaks only, or everything that can be")
    add_output_option(cmd)
    add_parent_dir(cmd)

    cmd = command(sub, "measure", cmd_measure,
                  "Say how large a new image would be: for a virtual size, or to convert "
                  "IMAGE into (qemu-img measure).")
    cmd.add_argument("image", metavar="IMAGE", nargs="?",
                     help="the disk to convert (its whole chain)")
    cmd.add_argument("--size", metavar="SIZE", type=parse_size,
                     help="measure a new, empty image of SIZE instead: bytes or 64M, 10G...")
    cmd.add_argument("-O", "--output-format", choices=measuring.FORMATS, default="raw",
                     help="the target's format (default raw)")
    cmd.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                     help="qcow2 target options, NAME=VALUE[,...]: "
                          + ", ".join(MEASURE_QCOW2_OPTIONS))
    cmd.add_argument("--fixed", action="store_true", help="a fixed VHD target")
    add_output_option(cmd)
    add_parent_dir(cmd)


# ------------------------------------------------------------------------------ check
def cmd_check(args: argparse.Namespace) -> int:
    fmt, path = parse_spec(args.image)
    try:
        explicit = fmt is not None
        fmt = fmt or probe(path)
        policy = parent_policy(args) if explicit and fmt == "vhd" else None
        log.info("checking %s (%s%s%s)", path, fmt, ", with its parents" if policy else "",
                 f", repairing {args.repair}" if args.repair else "")
        verdicts = checking.check(path, fmt, repair=args.repair, parents=policy)
        for v in verdicts:
            log.debug("%s: %d check errors, %d corruptions, %d leaks", v.path,
                      v.check_errors, v.corruptions, v.leaks)
    except UsageError:
        raise
    except (BlktapError, OSError) as exc:
        # qemu-img check: an image that cannot be opened is a check not completed.
        print_error(error_message(exc))
        return 1
    if args.json:
        out = verdicts[0].as_json()
        if len(verdicts) > 1:
            out["parents"] = [v.as_json() for v in verdicts[1:]]
        print_json(out)
    else:
        for i, verdict in enumerate(verdicts):
            if len(verdicts) > 1:
                if i:
                    print()
                print(f"{verdict.path} ({verdict.format}, depth {i}):")
            for line in verdict.messages:
                print(line)
            if verdict.messages:
                print()
            print("\n".join(verdict.summary()))
    return checking.exit_code(verdicts)


# ------------------------------------------------------------------------------ measure
def measure_options(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    if args.fixed and fmt != "vhd":
        raise UsageError("--fixed applies to VHD targets")
    if not args.options:
        return {"fixed": True} if args.fixed else {}
    if fmt != "qcow2":
        raise UsageError("-o applies to qcow2 targets")
    from blktap.cli.main import qcow2_options  # the same parser as create and convert

    options = qcow2_options(args.options)
    if "backing_file" in options:
        raise UsageError("measure: a target with a backing_file is not supported")
    if options.get("compat", "1.1") not in ("1.1", "v3"):
        args.no_bitmaps = True  # compat=0.10 images cannot hold bitmaps
    return {k: v for k, v in options.items() if k in MEASURE_QCOW2_OPTIONS}


def source_bitmaps(chain: Chain) -> list[tuple[str, int]] | None:
    """The persistent bitmaps of a qcow2 source ((name, granularity bits) each), or None
    when the source cannot have any (not a qcow2 v3 image)."""
    leaf = chain.leaf
    if not isinstance(leaf, Qcow2Image) or leaf.version < 3:
        return None
    found = leaf.bitmaps
    if found is None or not leaf.header.autoclear_features & qs.AUTOCLEAR_BITMAPS:
        return []
    raw = os.pread(leaf.fd, found.directory_size, found.directory_offset)
    entries = qs.unpack_bitmap_directory(raw, found.nb_bitmaps)
    if isinstance(entries, str):
        raise FormatError(f"{leaf.path}: {entries}")
    return [(e.name, e.granularity_bits) for e in entries]


def cmd_measure(args: argparse.Namespace) -> int:
    fmt = args.output_format
    options = measure_options(args, fmt)
    if args.size is not None and args.image is not None:
        raise UsageError("--size cannot be used together with an image")
    if args.size is None and args.image is None:
        raise UsageError("give --size SIZE or an image")
    bitmaps: int | None = None
    if args.image is None:
        result = measuring.measure(fmt, args.size, None, **options)
    else:
        with Chain.open(args.image, ciphertext=True,
                        parent_policy=parent_policy(args)) as chain:
            runs = measuring.data_extents(chain.map())
            size = chain.size
            found = source_bitmaps(chain)
        result = measuring.measure(fmt, size, runs, **options)
        if fmt == "qcow2" and found is not None and not getattr(args, "no_bitmaps", False):
            bitmaps = measuring.qcow2_bitmaps_size(
                found, size, int(options.get("cluster_size", DEFAULT_CLUSTER_SIZE)))
    if args.json:
        out = {"required": result.required, "fully-allocated": result.fully_allocated}
        if bitmaps is not None:
            out["bitmaps"] = bitmaps
        print_json(out)
    else:
        print(f"required size: {result.required}")
        print(f"fully allocated size: {result.fully_allocated}")
        if bitmaps is not None:
            print(f"bitmaps size: {bitmaps}")
    return 0
