"""Helpers of the ``blktap`` command: sizes, error lines, JSON, tables and a progress bar.

Everything that prints lives in the CLI; these helpers only format, and write to the
streams they are given.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from blktap.errors import BlktapError, UsageError
from blktap.image.parents import ENV_PARENT_DIRS, ENV_PARENT_RBD, ParentPolicy

PROG = "blktap"

# Every unit is a power of 1024, as in qemu-img and vhd-util ("64M" is 64 MiB).
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNIT_NAMES = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


# ------------------------------------------------------------------------------ signals
class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised wherever the program was, so that the cleanups on
    the way out run (a file being built is discarded) as they do for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process that signal killed: 128 + its number."""
        return 128 + self.signum

    @property
    def message(self) -> str:
        return "hangup" if self.signum == signal.SIGHUP else "terminated"


TERMINATED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM killed
# The signals that end a command cleanly (SIGINT is Python's KeyboardInterrupt).
CLEAN_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, the next SIGTERM or SIGHUP raises :class:`Terminated` (in the main
    thread only, where Python runs signal handlers); a second one kills at once, as by
    default. The previous handlers are back afterwards (main() may run inside a test).
    A SIGHUP that was ignored when the program started (nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        for sig in CLEAN_EXIT_SIGNALS:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {}
    for sig in CLEAN_EXIT_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_IGN and sig == signal.SIGHUP:
            continue
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------ version
def version_line(prog: str) -> str:
    from blktap import __version__

    return f"{prog} (blktap) {__version__}"


def print_version_if_asked(prog: str, args: Sequence[str]) -> bool:
    """For the legacy tools, whose reference takes no --version: ``--version`` as the
    only argument prints the version (a call the reference tools' callers never make, so
    their behaviour stays the reference's for everything else)."""
    if list(args) != ["--version"]:
        return False
    sys.stdout.write(version_line(prog) + "\n")
    sys.stdout.flush()
    return True


# ------------------------------------------------------------------------------ sizes
def parse_size(text: str) -> int:
    """Bytes from ``"512"``, ``"64M"``, ``"10G"``, ``"1.5GiB"``, ``"4k"``, ``"2MB"``.

    Units are binary (K = 1024). Raises UsageError for anything else, including a
    fraction that does not come to a whole number of bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None or (match[3] and match[3].lower() == "ib" and not match[2]):
        raise UsageError(f"invalid size {text!r} (use bytes or a number with K, M, G, T, "
                         f"e.g. 512, 64M, 10G)")
    try:
        value = Decimal(match[1]) * (1 << _UNIT_SHIFT[match[2].lower()])
    except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
        raise UsageError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def human_size(nbytes: int) -> str:
    """``67108864`` -> ``"64 MiB"``, ``1572864`` -> ``"1.5 MiB"``, 2040 GiB -> ``"2040 GiB"``,
    ``100`` -> ``"100 bytes"``: exact when a short exact form exists, else one decimal."""
    unit = 0
    while unit + 1 < len(_UNIT_NAMES) and nbytes >= 1 << (10 * (unit + 1)):
        unit += 1
    if unit == 0:
        return f"{nbytes} byte" if nbytes == 1 else f"{nbytes} bytes"
    scale = 1 << (10 * unit)
    if nbytes % scale == 0:
        return f"{nbytes // scale} {_UNIT_NAMES[unit]}"
    if (nbytes * 100) % scale == 0:
        return f"{nbytes / scale:g} {_UNIT_NAMES[unit]}"
    smaller = scale >> 10
    if nbytes % smaller == 0 and nbytes // smaller < 10240:
        return f"{nbytes // smaller} {_UNIT_NAMES[unit - 1]}"
    return f"{nbytes / scale:.1f} {_UNIT_NAMES[unit]}"


def describe_size(nbytes: int) -> str:
    """A size for people and for scripts at once: ``"64 MiB (67108864 bytes)"``."""
    short = human_size(nbytes)
    if nbytes < 1024:
        return short
    return f"{short} ({nbytes} bytes)"


# ------------------------------------------------------------------------------ errors
def error_message(exc: BaseException) -> str:
    """One line describing an error (a library error's message, or ``path: strerror``)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text = f"{exc.filename}: {text}"
        if exc.filename2 is not None:
            text = f"{text} ({exc.filename2})"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


def exit_code(exc: BaseException) -> int:
    """The exit code for an error: its errno (positive, below 256), else EIO."""
    code = exc.errno if isinstance(exc, BlktapError | OSError) else None
    if isinstance(code, int) and 0 < code < 256:
        return code
    return errno.EIO


def print_error(message: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    stream.write(f"{PROG}: {message}\n")
    stream.flush()


# -q: notes are not printed (errors and warnings are). Set by main() for one command.
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def print_note(message: str, stream: TextIO | None = None) -> None:
    if not _quiet:
        print_error(f"note: {message}", stream)


def print_warning(message: str, stream: TextIO | None = None) -> None:
    print_error(f"warning: {message}", stream)


# ------------------------------------------------------------------------------ parents
def add_parent_dir(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--parent-dir", metavar="DIR", action="append", default=[],
                     help=f"open parents only from inside DIR (repeatable; symlinks are "
                          f"resolved first); given, it takes the place of {ENV_PARENT_DIRS}")
    cmd.add_argument("--parent-rbd", metavar="POOL", action="append", default=[],
                     help=f"let images name parents on Ceph in POOL (or POOL/NAMESPACE; * "
                          f"for every pool; repeatable); given, it takes the place of "
                          f"{ENV_PARENT_RBD} (default: no Ceph parent is followed)")


def parent_policy(args: argparse.Namespace) -> ParentPolicy:
    """The --parent-dir directories and --parent-rbd pools, else the environment's."""
    dirs = getattr(args, "parent_dir", None)
    if dirs:
        env_rbd = {ENV_PARENT_RBD: os.environ.get(ENV_PARENT_RBD, "")}
        policy = ParentPolicy(ParentPolicy.confined_to(dirs).dirs,
                              ParentPolicy.from_env(env_rbd).rbd)
    else:
        policy = ParentPolicy.from_env()
    pools = getattr(args, "parent_rbd", None)
    if pools:
        policy = policy.with_rbd(pools)
    return policy


# ------------------------------------------------------------------------------ output
def print_json(data: Any, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(data, indent=2) + "\n")


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                 align: str = "") -> list[str]:
    """Lines of a plain-text table. ``align`` holds one letter per column, ``l`` or ``r``
    (left by default); the last column is never padded."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if i < len(align) and align[i] == "r":
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return lines


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress line: ``label [####----] 42%  1.2 GiB / 3 GiB  210 MiB/s  ETA 0:09``.

    On a terminal it is one line redrawn with ``\\r`` at most every ``interval`` seconds
    and cleared by ``close``; with ``redraw`` off (``-p`` into a pipe or a log) it is a
    line of its own at most every ``line_interval`` seconds, and always at the end (an
    update that reaches the total is drawn).
    Silent unless enabled (by default: when the stream is a terminal). The rate is the
    average since the start, the ETA what is left at that rate; ``clock`` is for tests.
    """

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.1, *,
                 redraw: bool = True, line_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.redraw = redraw
        self.interval = interval if redraw else line_interval
        self.clock = clock
        self.started = clock()
        self._last = float("-inf")
        self._drawn = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self._last < self.interval and done < self.total:
            return
        self._last = now
        self._draw(done)

    def line(self, done: int) -> str:
        done = min(max(done, 0), self.total)
        fraction = done / self.total if self.total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        text = (f"{self.label} [{bar}] {int(fraction * 100):3d}%  "
                f"{human_size(done)} / {human_size(self.total)}")
        elapsed = self.clock() - self.started
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            text += f"  {short_size(rate)}/s"
            if done < self.total:
                text += f"  ETA {format_duration((self.total - done) / rate)}"
        return text

    def _draw(self, done: int) -> None:
        if self.redraw:
            self.stream.write("\r" + self.line(done) + "\x1b[K")
        else:
            self.stream.write(self.line(done) + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if not (self.enabled and self._drawn):
            return
        if self.redraw:  # lines of their own stay: the last update drew the end
            self.stream.write("\r\x1b[K")
        self.stream.flush()
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def short_size(nbytes: float) -> str:
    """``1.5 GiB``, ``210 MiB``, ``12.3 KiB``: three significant figures at most."""
    unit = 0
    while unit + 1 < len(_UNIT_NAMES) and nbytes >= 1024:
        nbytes /= 1024
        unit += 1
    if unit == 0:
        return f"{int(nbytes)} B"
    return f"{nbytes:.3g} {_UNIT_NAMES[unit]}"


def format_duration(seconds: float) -> str:
    """``0:09``, ``12:05``, ``1:02:03``."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ------------------------------------------------------------------------------ options
# -p, -q, -v/--debug and --output, the same on every subcommand. Their defaults sit on the
# top-level parser, so that they can be given before the subcommand too.
OUTPUT_FORMATS = ("human", "json")


def add_common_options(cmd: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``-q``, ``-v`` and ``--debug`` (on every command). On a subcommand they default to
    nothing, so that ``blktap -q convert`` keeps what the top level parsed."""
    default: Any = argparse.SUPPRESS if not top else None
    cmd.add_argument("-q", "--quiet", action="store_true",
                     default=default if not top else False,
                     help="print nothing but errors (no progress, no notes, no report "
                          "unless --output=json): the exit code tells")
    cmd.add_argument("-v", "--verbose", action="count",
                     default=default if not top else 0,
                     help="log what is done on stderr (-vv: in detail)")
    cmd.add_argument("--debug", action="store_true", default=default if not top else False,
                     help="log everything, and show a traceback on an internal error")


def add_output_option(cmd: argparse.ArgumentParser) -> None:
    """``--output=human|json`` for a command that reports; ``--json`` is its alias."""
    cmd.add_argument("--output", choices=OUTPUT_FORMATS, default="human",
                     help="how to print the result (default: human)")
    cmd.add_argument("--json", dest="output", action="store_const", const="json",
                     help="the same as --output=json")


def add_progress_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-p", "--progress", action="store_true",
                     help="show progress with rate and ETA (default: on a terminal), even "
                          "into a pipe or a log")


def progress_for(args: argparse.Namespace, label: str, total: int,
                 stream: TextIO | None = None) -> Progress:
    """The progress line a command asked for: none with -q, a redrawn bar on a terminal,
    lines of their own with -p elsewhere."""
    stream = stream or sys.stderr
    if getattr(args, "quiet", False):
        return Progress(label, total, stream, enabled=False)
    terminal = is_terminal(stream)
    forced = bool(getattr(args, "progress", False))
    return Progress(label, total, stream, enabled=terminal or forced, redraw=terminal)
