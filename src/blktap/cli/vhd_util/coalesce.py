"""vhd-util coalesce: merge a differencing VHD into its immediate parent.

Prints ``Coalesced N sectors`` with no trailing newline, as the reference does (sm parses
``^Coalesced (\\d+) sectors``).
"""

from __future__ import annotations

import os
import struct

from blktap.cli.vhd_util.common import err_of, open_vhd
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.parents import ParentPolicy
from blktap.image.vhd.coalesce import coalesce

USAGE = "options: <-n name> [-s sparse] [-p progress] [-h help]\n"


def _percent(done: int, total: int) -> str:
    # The reference divides in single precision: ((float)i / (float)n) * 100.00.
    ratio = struct.unpack("f", struct.pack("f", done / total))[0] if total else 0.0
    return f"\r{ratio * 100.0:6.2f}%"


def run(argv: list[str], out: Output) -> int:
    # -o, -a and -x are in the reference's option string but lead to its usage text.
    parsed = getopt("coalesce", argv, "n:o:a:x:sph", out)
    name = None
    sparse = progress = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "s":
            sparse = True
        elif opt == "p":
            progress = True
        else:
            raise Usage(22)
    if not name or parsed.args:
        raise Usage(22)
    return _coalesce(name, sparse, progress, out)


def _fail(out: Output, code: int) -> int:
    out.print(f"error coalescing: {-code}\n")
    return code


def _coalesce(name: str, sparse: bool, progress: bool, out: Output) -> int:
    # The reference reports each stage with its own line; check them in its order before
    # any byte is written.
    try:
        child = open_vhd(name)
    except BlktapError as exc:
        out.print(f"error opening {name}: {-exc.errno}\n")
        return _fail(out, exc.errno)
    with child:
        if not child.is_differencing:
            out.print("coalescing of non-differencing disks is not supported\n")
            return _fail(out, 22)
        try:
            # BLKTAP_PARENT_DIRS confines the parent written to (docs/security.md).
            parent = ParentPolicy.from_env().check(name, child.parent_path())
        except BlktapError as exc:
            out.print(f"error finding {name} parent: {-exc.errno}\n")
            return _fail(out, exc.errno)
        raw_parent = child.parent_is_raw
    if raw_parent:
        try:
            os.close(os.open(parent, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            out.print(f"failed to open parent {parent}: {-(exc.errno or 5)}\n")
            return _fail(out, exc.errno or 5)
    else:
        if sparse:
            out.print("opening for sparse writes\n")
        try:
            open_vhd(parent, writable=True).close()
        except BlktapError as exc:
            out.print(f"error opening {parent}: {-exc.errno}\n")
            return _fail(out, exc.errno)

    shown = 0

    def report(block: int, entries: int) -> None:
        # One line per BAT entry, as the reference prints them.
        nonlocal shown
        while shown < min(block, entries):
            out.print(_percent(shown, entries))
            shown += 1
        out.flush()

    try:
        result = coalesce(name, sparse=sparse, progress=report if progress else None)
    except BlktapError as exc:
        out.flush()
        out.error(f"vhd-util coalesce: {exc}\n")
        return _fail(out, err_of(exc))
    except OSError as exc:
        out.flush()
        out.error(f"vhd-util coalesce: {exc}\n")
        return _fail(out, err_of(exc))
    if progress:
        out.print("\r100.00%\n")
    out.print(f"Coalesced {result.sectors} sectors")
    return 0
