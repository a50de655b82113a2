"""vhd-util snapshot: a differencing child of a VHD or raw parent."""

from __future__ import annotations

import errno

from blktap.cli.vhd_util.common import err_of
from blktap.cli.vhd_util.options import Output, Usage, getopt, strtol, strtoull
from blktap.errors import BlktapError, ChainTooDeep
from blktap.image.vhd.create import snapshot as make_snapshot

USAGE = ("options: <-n name> <-p parent name> [-l snapshot depth limit] [-m parent_is_raw] "
         "[-S size (MB) for metadata preallocation (see vhd-util resize)] "
         "[-e link to supplied parent name even if it's empty] [-h help]\n")


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("snapshot", argv, "n:p:S:l:meh", out)
    name = parent = None
    meta_mb = limit = 0
    raw = empty_ok = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "p":
            parent = val
        elif opt == "S":
            meta_mb = strtoull(val or "")
        elif opt == "l":
            limit = strtol(val or "")
        elif opt == "m":
            raw = True
        elif opt == "e":
            empty_ok = True
        elif opt == "h":
            raise Usage(0)
        else:
            raise Usage(22)
    if not name or not parent or parsed.args:
        raise Usage(22)
    try:
        make_snapshot(name, parent, raw_parent=raw, skip_empty=not empty_ok,
                            prealloc_size=meta_mb << 20 if meta_mb else None,
                            depth_limit=limit if limit > 0 and not raw else None)
    except ChainTooDeep as exc:
        if exc.errno == errno.ENOSPC:
            out.print(f"{exc}\n")
        else:
            out.print(f"error checking snapshot depth: {-exc.errno}\n")
        return exc.errno
    except BlktapError as exc:
        out.error(f"{name}: snapshot failed: {exc}\n")
        return err_of(exc)
    return 0
