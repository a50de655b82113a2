"""Helpers of the ``blktap`` command: sizes, error lines, JSON, tables and a progress bar.

Everything that prints lives in the CLI; these helpers only format, and write to the
streams they are given.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from blktap.errors import BlktapError, UsageError
from blktap.image.parents import ENV_PARENT_DIRS, ParentPolicy

PROG = "blktap"

# Every unit is a power of 1024, as in qemu-img and vhd-util ("64M" is 64 MiB).
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNIT_NAMES = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


# ------------------------------------------------------------------------------ signals
class Terminated(BaseException):
    """SIGTERM arrived: raised wherever the program was, so that the cleanups on the way
    out run (a file being built is discarded) as they do for Ctrl-C."""


TERMINATED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM killed


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, the next SIGTERM raises :class:`Terminated` (in the main thread
    only, where Python runs signal handlers); a second SIGTERM kills at once, as by
    default. The previous handler is back afterwards (main() may run inside a test)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def print_note(message: str, stream: TextIO | None = None) -> None:
    print_error(f"note: {message}", stream)


def print_warning(message: str, stream: TextIO | None = None) -> None:
    print_error(f"warning: {message}", stream)


# ------------------------------------------------------------------------------ parents
def add_parent_dir(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--parent-dir", metavar="DIR", action="append", default=[],
                     help=f"open parents only from inside DIR (repeatable; symlinks are "
                          f"resolved first); given, it takes the place of {ENV_PARENT_DIRS}")


def parent_policy(args: argparse.Namespace) -> ParentPolicy:
    """The --parent-dir directories, else the environment's."""
    dirs = getattr(args, "parent_dir", None)
    if dirs:
        return ParentPolicy.confined_to(dirs)
    return ParentPolicy.from_env()


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
    """A one-line progress bar redrawn with ``\\r``; silent unless the stream is a terminal.

    Redraws at most every ``interval`` seconds; ``close`` clears the line.
    """

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.1) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.interval = interval
        self._last = float("-inf")
        self._drawn = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval and done < self.total:
            return
        self._last = now
        self._draw(done)

    def line(self, done: int) -> str:
        done = min(max(done, 0), self.total)
        fraction = done / self.total if self.total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return (f"{self.label} [{bar}] {int(fraction * 100):3d}%  "
                f"{human_size(done)} / {human_size(self.total)}")

    def _draw(self, done: int) -> None:
        self.stream.write("\r" + self.line(done) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
