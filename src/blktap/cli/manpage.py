"""Man pages for the console scripts, generated from what the commands themselves know:
the argparse parsers of ``blktap``, ``tapdisk`` and ``tapback``, the reference's usage
texts of ``vhd-util`` and ``tap-ctl`` (which parse options getopt-style, as the C tools).

    python -m blktap.cli.manpage --out DIR      (make man: DIR = build/man)

writes ``DIR/man1/blktap.1`` and ``DIR/man8/{tapdisk,tapback,vhd-util,tap-ctl}.8``, in
the man(7) macros that ``man -l`` and ``groff -man`` render. Our own generator rather than
argparse-manpage: it is some eighty lines, and two of the five tools are not argparse.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from collections.abc import Iterator, Sequence

from blktap import __version__

SEE_ALSO = {"blktap": ["vhd-util(8)", "tap-ctl(8)", "tapdisk(8)", "qemu-img(1)"],
            "tapdisk": ["tap-ctl(8)", "blktap(1)"], "tapback": ["tapdisk(8)", "tap-ctl(8)"],
            "vhd-util": ["blktap(1)", "tap-ctl(8)"], "tap-ctl": ["tapdisk(8)", "vhd-util(8)"]}


def roff(text: str) -> str:
    """Escape text for man(7): backslashes, and a leading dot or quote on a line."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _header(name: str, section: int, summary: str) -> list[str]:
    date = datetime.date.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or 1_700_000_000).isoformat()
    return [f'.TH {name.upper()} {section} "{date}" "blktap {__version__}" "blktap"',
            ".SH NAME", f"{roff(name)} \\- {roff(summary)}"]


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            flags += f" {action.metavar or action.dest.upper()}"
        yield ".TP"
        yield f"\\fB{roff(str(flags))}\\fR"
        yield roff(action.help or "")


def _docs(obj: object) -> str:
    return inspect.cleandoc(getattr(obj, "__doc__", "") or "")


def prose(text: str) -> str:
    """A docstring as man(7): paragraphs (``.PP``), indented blocks kept as they are
    (``.nf``), ``literal`` in bold."""
    out: list[str] = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if not lines:
            continue
        if all(ln.startswith("    ") or not ln.strip() for ln in lines):
            out += [".PP", ".nf", roff(inspect.cleandoc(para)), ".fi"]
            continue
        body = roff(" ".join(ln.strip() for ln in lines))
        parts = body.split("``")
        body = "".join(f"\\fB{p}\\fR" if i % 2 else p for i, p in enumerate(parts))
        out += [".PP", body]
    return "\n".join(out)


def from_argparse(name: str, section: int, parser: argparse.ArgumentParser,
                  doc: str) -> str:
    lines = _header(name, section, parser.description or name)
    lines += [".SH SYNOPSIS", ".nf", roff(parser.format_usage().replace("usage: ", "")),
              ".fi", ".SH DESCRIPTION", prose(doc), ".SH OPTIONS", *_options(parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            lines.append(".SH COMMANDS")
            for cmd, sub in action.choices.items():
                lines += [".SS " + roff(cmd), roff(sub.description or ""), ".PP", ".nf",
                          roff(sub.format_usage().replace("usage: ", "")), ".fi",
                          *_options(sub)]
    if parser.epilog:
        lines += [".SH NOTES", roff(parser.epilog)]
    return "\n".join(lines + _footer(name)) + "\n"


def from_usages(name: str, section: int, summary: str, doc: str, synopsis: str,
                usages: Sequence[tuple[str, str]]) -> str:
    lines = _header(name, section, summary)
    lines += [".SH SYNOPSIS", ".nf", roff(synopsis), ".fi", ".SH DESCRIPTION", prose(doc),
              ".SH COMMANDS"]
    for cmd, usage in usages:
        lines += [".SS " + roff(cmd), ".nf", roff(usage.rstrip()), ".fi"]
    return "\n".join(lines + _footer(name)) + "\n"


def _footer(name: str) -> list[str]:
    return [".SH SEE ALSO", ", ".join(f"\\fB{s.split('(')[0]}\\fR({s.split('(')[1]}"
                                      for s in SEE_ALSO.get(name, [])),
            "The documentation in the project's docs/ folder (docs/operations.md: metrics, "
            "logs, systemd units)."]


def pages() -> dict[str, str]:
    """File name (``man1/blktap.1``...) to page text."""
    from blktap.cli import main as blktap_main
    from blktap.cli import tap_ctl, tapback, tapdisk, vhd_util

    out = {
        "man1/blktap.1": from_argparse("blktap", 1, blktap_main.build_parser(),
                                       _docs(blktap_main).split("\n\n")[0]),
        "man8/tapdisk.8": from_argparse("tapdisk", 8, tapdisk.build_parser(), _docs(tapdisk)),
        "man8/tapback.8": from_argparse("tapback", 8, tapback.build_parser(), _docs(tapback)),
    }
    usages = []
    for cmd in vhd_util.COMMANDS:
        found = vhd_util.handler_of(cmd)
        if found is not None:
            usages.append((cmd, found[1]))
    out["man8/vhd-util.8"] = from_usages(
        "vhd-util", 8, "create, inspect and maintain VHD images (the reference's tool)",
        _docs(vhd_util), vhd_util.usage_text().replace("usage: ", ""), usages)
    ctl_usages = [(cmd, getattr(tap_ctl, f"{cmd.upper()}_USAGE"))
                  for cmd in tap_ctl.COMMANDS if hasattr(tap_ctl, f"{cmd.upper()}_USAGE")]
    out["man8/tap-ctl.8"] = from_usages(
        "tap-ctl", 8, "drive tapdisk processes (the reference's tool)", _docs(tap_ctl),
        "tap-ctl COMMAND [OPTIONS]", ctl_usages)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blktap.cli.manpage",
                                 description="Write the man pages of the console scripts.")
    ap.add_argument("--out", default="build/man", help="directory (default build/man)")
    args = ap.parse_args(argv)
    for rel, text in pages().items():
        path = os.path.join(args.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
