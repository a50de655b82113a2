"""vhd-util fill: allocate every block (-b: BAT and bitmaps only; -f/-t a sector range)."""

from __future__ import annotations

import errno

from blktap.cli.vhd_util.common import err_of, open_or_exit
from blktap.cli.vhd_util.options import U64, Output, Usage, getopt, strtoull
from blktap.errors import BlktapError
from blktap.image.vhd.fill import fill

USAGE = ("options: <-n name> [-h help] [-b initialise the BAT and bitmaps, don't write to "
         "the data blocks (much faster)] [-f start intialisation from this sector, only "
         "usable with -b] [-t intialise up to this sector (inclusive), only usable with -b] "
         "[-B ignore the 2 TB limit, only usable with -b]\n")

# strtoull's largest value stands for "not given", as in the reference.
UNSET = U64


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("fill", argv, "n:f:t:bBh", out)
    name = None
    first = last = UNSET
    bitmaps_only = ignore_limit = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "f":
            first = strtoull(val or "")
        elif opt == "t":
            last = strtoull(val or "")
        elif opt == "b":
            bitmaps_only = True
        elif opt == "B":
            # Accepted for compatibility; the limit is the format's (a BAT entry is a
            # 32-bit sector number), so it still applies: the reference would store
            # wrapped-around offsets.
            ignore_limit = True
        else:
            raise Usage(22)
    if not name or parsed.args:
        raise Usage(22)
    if (first != UNSET or last != UNSET) and not bitmaps_only:
        out.print("-f/-t can only be used with -b\n")
        raise Usage(22)
    if first != UNSET and last != UNSET and last < first:
        out.print(f"invalid sector range {first}-{last}\n")
        raise Usage(22)
    if ignore_limit and not bitmaps_only:
        out.print("-B can only be used with -b\n")
        raise Usage(22)
    open_or_exit(name, out, writable=True, allow_disabled=False).close()
    try:
        fill(name, bitmaps_only=bitmaps_only,
             first_sector=None if first == UNSET else first,
             last_sector=None if last == UNSET else last)
    except (BlktapError, OSError) as exc:
        err = err_of(exc)
        if err == errno.EOVERFLOW:
            out.print(f"{exc}\n")  # the reference's own line
        else:
            out.error(f"vhd-util fill: {exc}\n")
        return err
    return 0
