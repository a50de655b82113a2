"""``cbt-util``: a drop-in replacement for the reference tool that manages CBT logs.

Same commands, flags, usage texts (on stdout), messages (on stderr) and exit codes (an
errno: 22 for a usage error, 5 for a short file, the open's errno when a file cannot be
opened) as the reference, which XenServer's storage manager runs. Where the reference
cannot tell (a uuid that does not parse, a truncated bitmap read by ``get -s``), this one
refuses with EINVAL or EIO instead of writing or printing garbage: docs/cbt.md.
"""

from __future__ import annotations

import errno
import sys
import uuid

from blktap.cli.legacy import legacy_main
from blktap.cli.vhd_util.options import Output, getopt, strtol, strtoull
from blktap.errors import BlktapError
from blktap.image import cbt

COMMANDS = ["create", "set", "get", "coalesce"]

CREATE_USAGE = ("cbt-util create: Create new CBT metadata log with default values\n\n"
                "Options:\n\t-n Log file name\n\t-s Num blocks in bitmap\n\t[-h help]\n")
SET_USAGE = ("cbt-util set: Set field in log file\n\n"
             "Options:\n"
             " -n name\tName of log file\n"
             "[-p parent]\tParent log file UUID\n"
             "[-c child]\tChild log file UUID\n"
             "[-f 0|1]\tConsistency flag\n"
             "[-s size]\tSize of the disk in bytes\n"
             "[-h]\t\thelp\n")
GET_USAGE = ("cbt-util get: Read field from log file\n\n"
             "Options:\n"
             " -n name\tName of log file\n"
             "[-p]\t\tPrint parent log file UUID\n"
             "[-c]\t\tPrint child log file UUID\n"
             "[-f]\t\tPrint consistency flag\n"
             "[-s]\t\tPrint size of disk in bytes\n"
             "[-b]\t\tPrint bitmap contents\n"
             "[-h]\t\thelp\n")
COALESCE_USAGE = ("cbt-util coalesce: Coalesce contents of parent bitmap on to child "
                  "bitmap\n\nOptions:\n\t-p Parent log file name\n"
                  "\t-c Child log file name\n\t[-h help]\n")


class _Usage(Exception):
    pass


def usage_text() -> str:
    return ("usage: cbt-util COMMAND [OPTIONS]\n"
            "COMMAND := { " + " | ".join(COMMANDS) + " }\n")


def _options(prog: str, argv: list[str], optstring: str,
             out: Output) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for opt, val in getopt(prog, argv, optstring, out).opts:
        if opt in ("?", "h"):
            raise _Usage
        found[opt] = val
    return found


def _int32(text: str) -> int:
    """C atoi on a 64-bit host: the low 32 bits of strtol, signed."""
    v = strtol(text) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _uuid(text: str) -> uuid.UUID:
    try:
        if len(text) != 36:
            raise ValueError
        return uuid.UUID(text)
    except ValueError:
        raise BlktapError(f"Invalid UUID {text}", errno.EINVAL) from None


def cmd_create(argv: list[str], out: Output) -> int:
    o = _options("cbt-util", argv, "n:s:h", out)
    name, size = o.get("n"), strtoull(o.get("s") or "")
    if not name or not size:
        raise _Usage
    cbt.create(name, size)
    return 0


def cmd_set(argv: list[str], out: Output) -> int:
    o = _options("cbt-util", argv, "n:p:c:f:s:h", out)
    name = o.get("n")
    size = strtoull(o.get("s") or "")
    if not name or not ("p" in o or "c" in o or "f" in o or size):
        raise _Usage
    cbt.update(name,
               parent=_uuid(o["p"] or "") if "p" in o else None,
               child=_uuid(o["c"] or "") if "c" in o else None,
               consistent=_int32(o["f"] or "") if "f" in o else None,
               size=size or None)
    return 0


def cmd_get(argv: list[str], out: Output) -> int:
    o = _options("cbt-util", argv, "n:pcfsbh", out)
    name = o.get("n")
    asked = [k for k in "pcfsb" if k in o]
    if not name or len(asked) != 1:
        raise _Usage
    what = asked[0]
    if what == "b":
        _header, bitmap = cbt.read_log(name)
        out.raw(bitmap)
        return 0
    header = cbt.read_header(name)
    if what == "p":
        out.print(f"{header.parent}\n")
    elif what == "c":
        out.print(f"{header.child}\n")
    elif what == "f":
        out.print(f"{header.consistent}\n")
    else:
        out.print(f"{header.size}\n")
    return 0


def cmd_coalesce(argv: list[str], out: Output) -> int:
    o = _options("cbt-util", argv, "p:c:h", out)
    parent, child = o.get("p"), o.get("c")
    if not parent or not child:
        raise _Usage
    cbt.coalesce(parent, child)
    return 0


HANDLERS = {"create": (cmd_create, CREATE_USAGE), "set": (cmd_set, SET_USAGE),
            "get": (cmd_get, GET_USAGE), "coalesce": (cmd_coalesce, COALESCE_USAGE)}


def run(argv: list[str], out: Output) -> int:
    if len(argv) < 2:
        out.print(usage_text())
        return 0
    command = argv[1]
    if command not in HANDLERS:
        out.error(f"Invalid COMMAND {command}\n")
        out.print(usage_text())
        return 0
    handler, usage = HANDLERS[command]
    try:
        return handler(argv[2:], out)
    except _Usage:
        out.print(usage)
        return errno.EINVAL
    except BlktapError as exc:
        # The reference's coalesce message has no newline; every other one has.
        text = str(exc)
        out.error(text if text.endswith("can't coalesce") else text + "\n")
        return exc.errno
    except OSError as exc:
        out.error(f"{exc.filename or ''}: {exc.strerror}\n")
        return exc.errno or errno.EIO


def main(argv: list[str] | None = None) -> int:
    # The reference's cbt-util takes --version for a command it does not know.
    return legacy_main("cbt-util", run, argv, version=False)

if __name__ == "__main__":
    sys.exit(main())
