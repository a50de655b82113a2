"""vhd-util set: the hidden flag and the marker."""

from __future__ import annotations

import errno
import os

from blktap.cli.vhd_util.common import open_or_exit
from blktap.cli.vhd_util.options import Output, Usage, getopt, strtol
from blktap.errors import BlktapError
from blktap.image.vhd.marker import write_marker

USAGE = "options: <-n name> <-f field> <-v value> [-h help]\n"


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("set", argv, "n:f:v:h", out)
    name = field = None
    value = None
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "f":
            field = val
        elif opt == "v":
            value = strtol(val or "")
        else:
            raise Usage(22)
    if not name or not field or value is None or parsed.args:
        raise Usage(22)
    if len(field) >= 25:
        out.print("invalid field\n")
        raise Usage(22)
    if field not in ("hidden", "marker"):
        out.print(f"invalid field {field}\n")
        raise Usage(22)
    if value < 0 or value > 255:
        out.print(f"invalid value {value}\n")
        raise Usage(22)
    with open_or_exit(name, out, writable=True, allow_disabled=False) as image:
        try:
            if field == "hidden":
                image.set_hidden(value)
            else:
                write_marker(image, value)
        except OSError as exc:
            out.error(f"{name}: cannot set {field}: {os.strerror(exc.errno)}\n")
            return exc.errno or errno.EIO
        except BlktapError as exc:
            out.error(f"{name}: cannot set {field}: {exc}\n")
            return exc.errno
    return 0
