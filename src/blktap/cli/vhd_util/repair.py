"""vhd-util repair: rewrite both footers from the good one (-b: from the copy at 0).

The reference's lines and exit codes: ``error opening NAME: -ERRNO`` when the image does
not open (alone, as every command's open error), ``error writing footer: -ERRNO`` when
repairing fails, followed by one line on stderr with the reason. We refuse (``error
writing footer: -22``, nothing written) an image the repair would leave failing ``check``
or would lose data in (see image/vhd/repair.py)."""

from __future__ import annotations

from blktap.cli.vhd_util.common import err_of, open_or_exit
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.vhd.repair import repair

USAGE = "options: <-n name> <-b use the back-up footer> [-h help]\n"


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("repair", argv, "n:bh", out)
    name = None
    backup = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "b":
            backup = True
        else:
            raise Usage(22)
    if not name or parsed.args:
        raise Usage(22)
    footer = "backup" if backup else "auto"
    open_or_exit(name, out, writable=True, footer=footer, allow_disabled=False).close()
    try:
        repair(name, use_backup=backup)
    except (BlktapError, OSError) as exc:
        err = err_of(exc)
        out.print(f"error writing footer: {-err}\n")
        out.error(f"vhd-util repair: {exc}\n")
        return err
    return 0
