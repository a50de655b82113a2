"""vhd-util check: validate an image (and with -p its ancestors)."""

from __future__ import annotations

from blktap.cli.vhd_util import dump
from blktap.cli.vhd_util.common import open_vhd
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.vhd import check as vhd_check

USAGE = ("options: -n <file> [-i ignore missing primary footers] [-I ignore parent uuids] "
         "[-t ignore timestamps] [-B do not check BAT for overlapping (precludes -s, -b)] "
         "[-p check parents] [-b check bitmaps] [-s stats] [-h help]\n")


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("check", argv, "n:iItpbBsh", out)
    name = None
    opts = vhd_check.CheckOptions()
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "i":
            opts.ignore_footer = True
        elif opt == "I":
            opts.ignore_parent_uuid = True
        elif opt == "t":
            opts.ignore_timestamps = True
        elif opt == "p":
            opts.check_parents = True
        elif opt == "b":
            opts.check_bitmaps = True
        elif opt == "B":
            opts.skip_overlap = True
        elif opt == "s":
            opts.stats = True
        elif opt == "h":
            raise Usage(0)
        else:
            raise Usage(22)
    if not name or parsed.args or (opts.skip_overlap and (opts.stats or opts.check_bitmaps)):
        raise Usage(22)
    chain = vhd_check.check(name, opts)
    for result in chain.results:
        _report(result, opts, out)
    for line in chain.walk_messages:
        out.print(line + "\n")
    if chain.results[0].ok:
        for line in vhd_check.stats_lines(chain):
            out.print(line + "\n")
    return chain.errno


def _report(result: vhd_check.CheckResult, opts: vhd_check.CheckOptions, out: Output) -> None:
    for line in result.messages:
        out.print(line + "\n")
    if result.ok:
        if not result.fixed and not opts.stats:
            out.print(f"{result.path} is valid\n")
        return
    if not result.dump:
        return
    out.print(f"{result.path} appears invalid; dumping metadata\n")
    out.print(_dump(result.path))


def _dump(path: str) -> str:
    """Exactly what ``read -p`` prints for the image."""
    try:
        image = open_vhd(path)
    except BlktapError as exc:
        return dump.open_failure_text(path, exc.errno)
    with image:
        if image.is_fixed:
            return f"Failed to get bat for {path}: -22\n"
        return dump.image_text(image)
