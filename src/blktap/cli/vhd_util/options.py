"""Command-line plumbing that makes vhd-util behave like the C tool: glibc getopt (with
argument permutation and its diagnostics), C number parsing, and stdio-like output."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

U64 = (1 << 64) - 1
LLONG_MAX = (1 << 63) - 1


class Usage(Exception):
    """The subcommand must print its usage; ``code`` is its exit status."""

    def __init__(self, code: int = 22) -> None:
        super().__init__(code)
        self.code = code


class Exit(Exception):
    """The subcommand stops with exit status ``code``; it has already said why."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Parsed:
    opts: list[tuple[str, str | None]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)


def getopt(prog: str, argv: list[str], optstring: str, err: Output) -> Parsed:
    """glibc getopt(3) in its default GNU mode: options and operands may mix, ``--`` ends
    the options, unknown options and missing arguments print glibc's message on stderr and
    come back as '?'."""
    takes_arg = {c: optstring[i + 1 : i + 2] == ":" for i, c in enumerate(optstring) if c != ":"}
    out = Parsed()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            out.args.extend(argv[i:])
            break
        if not word.startswith("-") or word == "-":
            out.args.append(word)
            continue
        pos = 1
        while pos < len(word):
            ch = word[pos]
            pos += 1
            if ch not in takes_arg:
                err.error(f"{prog}: invalid option -- '{ch}'\n")
                out.opts.append(("?", None))
                continue
            if not takes_arg[ch]:
                out.opts.append((ch, None))
                continue
            if pos < len(word):
                out.opts.append((ch, word[pos:]))
            elif i < len(argv):
                out.opts.append((ch, argv[i]))
                i += 1
            else:
                err.error(f"{prog}: option requires an argument -- '{ch}'\n")
                out.opts.append(("?", None))
            break
    return out


def _digits(text: str) -> tuple[bool, int]:
    s = text.lstrip(" \t\n\r\f\v")
    neg = False
    if s[:1] in "+-" and s:
        neg = s[0] == "-"
        s = s[1:]
    n = 0
    for ch in s:
        if not ch.isdigit() or not ch.isascii():
            break
        n = n * 10 + int(ch)
    return neg, n


def strtoull(text: str) -> int:
    """C strtoull(text, NULL, 10): leading digits only, 0 if none, negatives wrap."""
    neg, n = _digits(text)
    n = min(n, U64)
    return (-n) & U64 if neg else n


def strtol(text: str) -> int:
    """C strtol(text, NULL, 10) on a 64-bit host: out-of-range values clamp."""
    neg, n = _digits(text)
    n = min(n, LLONG_MAX + neg)
    return -n if neg else n


def strtoll_checked(text: str) -> int | None:
    """C strtoll(text, NULL, 10), or None where it would overflow (errno ERANGE)."""
    neg, n = _digits(text)
    if n > LLONG_MAX + neg:
        return None
    return -n if neg else n


class Output:
    """stdout and stderr as the C tool's stdio uses them: text to stdout is buffered until
    exit unless stdout is a terminal (so raw write(2) output comes first on a pipe, as with
    the reference), stderr is unbuffered."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._tty = os.isatty(1)

    def print(self, text: str) -> None:
        if self._tty:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            self._text.append(text)

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        if self._tty:
            sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def flush(self) -> None:
        """fflush(stdout): what was printed so far goes out now."""
        if self._text:
            sys.stdout.write("".join(self._text))
            self._text.clear()
        sys.stdout.flush()

    def error(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self) -> None:
        self.flush()
