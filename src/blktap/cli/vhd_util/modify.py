"""vhd-util modify: kill data (-z), set the physical size (-s), set the parent (-p [-m])."""

from __future__ import annotations

from blktap.cli.vhd_util.common import err_of, open_or_exit
from blktap.cli.vhd_util.options import U64, Output, Usage, getopt, strtoll_checked
from blktap.errors import BlktapError
from blktap.image.vhd.modify import kill_data, set_physical_size
from blktap.image.vhd.reparent import set_parent

USAGE = ("*** Dangerous operations, use with care ***\n"
         "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size] "
         "[-z zero (kill data)] [-h help]\n")

def run(argv: list[str], out: Output) -> int:
    parsed = getopt("modify", argv, "n:s:p:mzh", out)
    name = parent = None
    size: int | None = None
    raw = kill = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "s":
            size = strtoll_checked(val or "")
            if size is None:
                out.error(f"Invalid size '{val}'\n")
                raise Usage(22)
        elif opt == "p":
            parent = val
        elif opt == "m":
            raw = True
        elif opt == "z":
            kill = True
        else:
            raise Usage(22)
    if not name or parsed.args:
        raise Usage(22)
    open_or_exit(name, out, writable=True, allow_disabled=False).close()
    # The reference's order. Unlike the reference (which goes on and returns the last
    # operation's status), the first failure stops: a caller must not read success
    # after a refused operation.
    if kill:
        try:
            kill_data(name)
        except (BlktapError, OSError) as exc:
            return _failed(out, "failed to zero VHD", exc)
    if size is not None:
        try:
            set_physical_size(name, size)
        except (BlktapError, OSError) as exc:
            return _failed(out, f"failed to set physical size to {size & U64}", exc)
    if parent is not None:
        try:
            set_parent(name, parent, raw=raw)
        except (BlktapError, OSError) as exc:
            return _failed(out, f"failed to set parent to '{parent}'", exc)
    return 0


def _failed(out: Output, what: str, exc: BaseException) -> int:
    """The reference's line on stdout, and why on stderr."""
    err = err_of(exc)
    out.print(f"{what}: {-err}\n")
    out.error(f"vhd-util modify: {exc}\n")
    return err
