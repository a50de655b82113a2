"""vhd-util revert: undo an interrupted journaled resize with its journal."""

from __future__ import annotations

from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.vhd.journal import Journal, remove_journal

USAGE = "options: <-n name> <-j journal> [-h help]\n"


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("revert", argv, "n:j:h", out)
    name = jname = None
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "j":
            jname = val
        else:
            raise Usage(22)
    if not name or not jname or parsed.args:
        raise Usage(22)
    try:
        journal = Journal.open(jname)
    except BlktapError as exc:
        out.print(f"opening journal failed: {-exc.errno} ({exc})\n")
        return exc.errno
    with journal:
        try:
            journal.check_image(name)
        except BlktapError as exc:
            out.print(f"opening journal failed: {-exc.errno} ({exc})\n")
            return exc.errno
        try:
            journal.revert(name)
        except BlktapError as exc:
            out.print(f"reverting journal failed: {-exc.errno} ({exc})\n")
            return exc.errno
    try:
        remove_journal(jname)
    except BlktapError as exc:
        out.print(f"removing journal failed: {-exc.errno} ({exc})\n")
        return exc.errno
    return 0
