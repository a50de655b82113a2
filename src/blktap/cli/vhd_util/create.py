"""vhd-util create: a new fixed or dynamic VHD."""

from __future__ import annotations

from blktap.cli.vhd_util.common import err_of
from blktap.cli.vhd_util.options import Output, Usage, getopt, strtoull
from blktap.errors import BlktapError
from blktap.image.vhd.create import create as make_vhd

USAGE = ("options: <-n name> <-s size (MB)> [-r reserve] [-h help] "
         "[<-S size (MB) for metadata preallocation (see vhd-util resize)>]\n")
MB = 1 << 20


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("create", argv, "n:s:S:rh", out)
    name = None
    size_mb = meta_mb = 0
    have_size = False
    fixed = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "s":
            size_mb, have_size = strtoull(val or ""), True
        elif opt == "S":
            meta_mb, have_size = strtoull(val or ""), True
        elif opt == "r":
            fixed = True
        else:
            raise Usage(22)
    if not name or not have_size or parsed.args:
        raise Usage(22)
    if meta_mb and meta_mb < size_mb:
        out.print("Error: <-S size> must be greater than <-s size>\n")
        return 22
    if fixed and meta_mb:
        out.error(f"{name}: metadata preallocation (-S) applies to dynamic disks only\n")
        return 22
    size = size_mb * MB if size_mb else meta_mb * MB
    try:
        make_vhd(name, size, fixed=fixed,
                          prealloc_size=meta_mb * MB if meta_mb else None)
    except BlktapError as exc:
        reason = str(exc).removeprefix(f"{name}: ")
        out.error(f"{name}: failed to create: {reason}\n")
        return err_of(exc)
    return 0
