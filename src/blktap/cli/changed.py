"""``blktap changed LOG``: the extents a CBT log marks as changed, for humans and scripts.

Text: a table of byte offsets and lengths (runs of changed 64 KiB blocks, the last cut at
the disk's end) and a summary line; ``--json``: the header fields and the same extents.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from blktap.cli.common import add_output_option, format_table, human_size, print_json
from blktap.image import cbt


def add_parser(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "changed", run_args,
                  "List the extents a changed-block tracking log (cbt-util's) marks as "
                  "written.")
    cmd.add_argument("log", metavar="LOG", help="the CBT log file (e.g. VDI.cbtlog)")
    add_output_option(cmd)


def report(path: str) -> dict:
    header, bitmap = cbt.read_log(path)
    extents = cbt.changed_extents(header, bitmap)
    return {"log": path, "size": header.size, "block_size": cbt.BLOCK,
            "parent": str(header.parent), "child": str(header.child),
            "consistent": header.consistent,
            "changed_bytes": sum(n for _, n in extents),
            "extents": [{"offset": o, "length": n} for o, n in extents]}


def run_args(args: argparse.Namespace) -> int:
    info = report(args.log)
    if args.json:
        print_json(info)
        return 0
    rows = [(e["offset"], e["length"]) for e in info["extents"]]
    if rows:
        print("\n".join(format_table(("offset", "length"), rows, "rr")))
    print(f"{human_size(info['changed_bytes'])} changed in {len(rows)} extents "
          f"of a {human_size(info['size'])} disk")
    return 0
