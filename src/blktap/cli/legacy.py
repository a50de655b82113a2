"""The ``main`` the drop-in tools share (``vhd-util``, ``cbt-util``, ``tap-ctl``): C stdio
emulated by :class:`~blktap.cli.vhd_util.options.Output`, and the same clean ends.

- Ctrl-C (SIGINT) exits 130; SIGTERM and SIGHUP raise
  :class:`~blktap.cli.common.Terminated` wherever the command is, so that a file being
  built is discarded on the way out (what a shell reports: 143, 129);
- output to a closed pipe exits 32 (EPIPE) without a traceback;
- what was printed is flushed at the end, as C's exit() does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from blktap.cli.common import Terminated, print_version_if_asked, sigterm_raises
from blktap.cli.vhd_util.options import Output

EPIPE_EXIT = 32
INTERRUPTED_EXIT = 130  # what a shell reports for a process SIGINT ended

Runner = Callable[[list[str], Output], int]


def legacy_main(prog: str, run: Runner, argv: list[str] | None = None, *,
                version: bool = True) -> int:
    """Run ``run(argv, out)`` (``argv`` with the program name first, as C's); with
    ``version``, ``--version`` prints ours instead (a tool whose reference treats it as
    a command passes False)."""
    args = sys.argv if argv is None else argv
    if version and print_version_if_asked(prog, args[1:]):
        return 0
    out = Output()
    try:
        with sigterm_raises():
            code = run(args, out)
    except KeyboardInterrupt:
        code = INTERRUPTED_EXIT
    except Terminated as exc:
        code = exc.exit_code
    except BrokenPipeError:
        code = EPIPE_EXIT
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass
    return code


__all__ = ["legacy_main"]
