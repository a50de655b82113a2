"""``vhd-util``: a drop-in replacement for the reference C tool.

Same commands, flags, output bytes and exit codes (an errno), because XenServer's storage
manager parses them. Behaviour that differs on purpose is listed in docs/compat.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from blktap.cli.vhd_util.options import Exit, Output, Usage
from blktap.errors import BlktapError

# The reference's command table, in its order (it is printed in the usage).
COMMANDS = ["create", "snapshot", "query", "read", "set", "repair", "resize", "fill",
            "coalesce", "modify", "scan", "check", "revert", "key", "copy"]

Handler = Callable[[list[str], Output], int]
# Each command lives in its own module (``run(argv, out) -> exit code`` and ``USAGE``),
# imported only when that command runs.
MODULES = {command: command for command in COMMANDS}
MODULES["set"] = "set_field"


def handler_of(command: str) -> tuple[Handler, str] | None:
    try:
        module = importlib.import_module(f"blktap.cli.vhd_util.{MODULES[command]}")
    except ModuleNotFoundError as exc:
        if exc.name != f"blktap.cli.vhd_util.{MODULES[command]}":
            raise
        return None
    return module.run, module.USAGE


def usage_text() -> str:
    return ("usage: vhd-util COMMAND [OPTIONS]\n"
            "COMMAND := { " + " | ".join(COMMANDS) + " }\n")


def run(argv: list[str], out: Output) -> int:
    if len(argv) < 2:
        out.print(usage_text())
        return 0
    command = argv[1]
    if len(command) >= 25 or command not in COMMANDS:
        out.error(f"invalid COMMAND {command}\n")
        out.print(usage_text())
        return 0
    args = [a for a in argv[2:] if a != "--debug"]
    found = handler_of(command)
    if found is None:
        out.error(f"vhd-util {command}: not implemented yet in this version of blktap\n")
        return 95  # EOPNOTSUPP
    handler, usage = found
    try:
        return handler(args, out)
    except Usage as exc:
        out.print(usage)
        return exc.code
    except Exit as exc:
        return exc.code
    except BlktapError as exc:
        # A fault found mid-command (say, a block past the end of a damaged file).
        out.error(f"vhd-util {command}: {exc}\n")
        return exc.errno
    except OSError as exc:
        out.error(f"vhd-util {command}: {exc.filename or ''}: {os.strerror(exc.errno or 5)}\n")
        return exc.errno or 5


def main(argv: list[str] | None = None) -> int:
    from blktap.cli.legacy import legacy_main  # (it imports this package's options)

    return legacy_main("vhd-util", run, argv)

if __name__ == "__main__":
    sys.exit(main())
