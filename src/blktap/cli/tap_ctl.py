"""``tap-ctl``: a drop-in replacement for the reference C tool.

    tap-ctl COMMAND [OPTIONS]
    COMMAND := { list | allocate | free | create | destroy | spawn | attach | detach |
                 open | close | pause | unpause | stats }

Same commands, getopt strings, usage texts, output bytes and exit codes as the reference
(XenServer's storage manager and xapi parse them; docs/tap-ctl.md has the details). No
arguments or an unknown command print the command list and exit 0. ``--debug`` may appear
anywhere after the command. A failure prints ``strerror(errno)`` on stderr and exits with
that errno; with ``--debug`` a line saying what failed comes first. Everything that talks
to a tapdisk or touches minors is ``blktap.control.client``; this module only parses
options and prints.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from blktap.cli.legacy import legacy_main
from blktap.cli.vhd_util.options import Output, getopt, strtol
from blktap.control.client import ListIncomplete, TapCtl, TapEntry, read_key
from blktap.control.message import Flag
from blktap.errors import BlktapError

COMMANDS = ["list", "allocate", "free", "create", "destroy", "spawn", "attach", "detach",
            "open", "close", "pause", "unpause", "stats"]

# The usage texts are part of the interface: scripts and people see the reference's.
LIST_USAGE = ("usage: list [-h] [-p pid] [-m minor] [-t type] [-f file]\n"
              "\n"
              "Lists tapdisks in the following format:\n"
              f"{'pid':>8} {'minor':>4} {'state':>4} {'type':>10} file\n")
ALLOCATE_USAGE = "usage: allocate [-d device name]>\n"
FREE_USAGE = "usage: free <-m minor>\n"
_OPEN_FLAGS_USAGE = ("[-e <minor> stack on existing tapdisk for the parent chain] "
                     "[-r turn on read caching into leaf node] [-2 <path> "
                     "use secondary image (in mirror mode if no -s)] [-s "
                     "fail over to the secondary image on ENOSPC] "
                     "[-t request timeout in seconds] [-D no O_DIRECT] ")
CREATE_USAGE = ("usage: create <-a type:/path/to/file> [-d device name] [-R readonly] "
                + _OPEN_FLAGS_USAGE
                + "[-C <path/to/logfile> insert log layer to track changed blocks]\n")
DESTROY_USAGE = "usage: destroy <-p pid> <-m minor> [-t timeout secs]\n"
SPAWN_USAGE = "usage: spawn\n"
ATTACH_USAGE = "usage: attach <-p pid> <-m minor>\n"
DETACH_USAGE = "usage: detach <-p pid> <-m minor>\n"
OPEN_USAGE = ("usage: open <-p pid> <-m minor> <-a type:/path/to/file> [-R readonly] "
              + _OPEN_FLAGS_USAGE
              + "[-C </path/to/logfile> insert log layer to track changed blocks] "
              "[-E read encryption key from stdin]\n")
CLOSE_USAGE = "usage: close <-p pid> <-m minor> [-f force] [-t timeout secs]\n"
PAUSE_USAGE = "usage: pause <-p pid> <-m minor> [-t timeout secs]\n"
UNPAUSE_USAGE = ("usage: unpause <-p pid> <-m minor> [-a type:/path/to/file] "
                 "[-2 secondary] "
                 "[-c </path/to/logfile> insert log layer to track changed blocks]\n")
# Ours (not in the command list, which stays the reference's): docs/filters.md.
VALVE_USAGE = ("usage: valve <-p pid> <-m minor> <-l limits>\n"
               "\n"
               "Changes the rate limits of a disk opened as valve:LIMITS:TYPE:PATH, at once.\n"
               "limits := rate=BYTES/s,iops=N,burst=BYTES,iops-burst=N,group=NAME "
               "(any of them; empty: no limit)\n")
STATS_USAGE = ("usage: stats <-p pid> <-m minor>\n"
               "\n"
               "Prints a Python dictionary with the VBD stats. The images are "
               "listed in reverse order (leaf to root)\n")

KEY_SIZES = (32, 64)  # what -E accepts: AES-XTS 256 or 512 bit


def help_text() -> str:
    return "usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := { " + " | ".join(COMMANDS) + " }\n"


class _Exit(Exception):
    """Stop now with this status; the message (if any) is already on stderr."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Errors(Output):
    """Collects getopt's diagnostics: the reference stops at the first bad option, so only
    the first one is printed."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def error(self, text: str) -> None:
        self.lines.append(text)


def atoi(text: str) -> int:
    """C atoi on glibc: strtol's leading digits (0 if none), cut to a 32-bit int."""
    return ((strtol(text) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def state_text(state: int) -> str:
    """printf's ``%#x`` of an int: plain 0 for zero, 0x... (as unsigned) otherwise."""
    value = state & 0xFFFFFFFF
    return f"{value:#x}" if value else "0"


def _stdout_isatty() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class Cli:
    """One run of one command: its stdout is collected and written at the end (as the C
    tool's buffered stdout on a pipe)."""

    def __init__(self, command: str, debug: bool, ctl: TapCtl | None = None) -> None:
        self.command = command
        self.debug = debug
        self.ctl = ctl if ctl is not None else TapCtl()
        self.out = bytearray()

    # ------------------------------------------------------------------ plumbing
    def print(self, text: str | bytes) -> None:
        self.out += text if isinstance(text, bytes) else os.fsencode(text)

    @staticmethod
    def error(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def options(self, args: list[str], optstring: str) -> list[tuple[str, str | None]]:
        """getopt's options in order; a '?' keeps its diagnostic (printed when reached)."""
        errs = _Errors()
        parsed = getopt(self.command, args, optstring, errs)
        opts: list[tuple[str, str | None]] = []
        bad = iter(errs.lines)
        for opt, val in parsed.opts:
            opts.append((opt, next(bad, "") if opt == "?" else val))
        return opts

    def usage(self, text: str) -> int:
        self.error(text)
        return errno.EINVAL

    def help(self, text: str) -> int:
        self.print(text)
        return 0

    def bad_option(self, diagnostic: str | None, text: str) -> int:
        if diagnostic:
            self.error(diagnostic)
        return self.usage(text)

    # ------------------------------------------------------------------ list
    def cmd_list(self, args: list[str]) -> int:
        pid = minor = -1
        kind = path = None
        for opt, val in self.options(args, "m:p:t:f:h"):
            if opt == "m":
                minor = atoi(val or "")
            elif opt == "p":
                pid = atoi(val or "")
            elif opt == "t":
                kind = val
            elif opt == "f":
                path = val
            elif opt == "?":
                return self.bad_option(val, LIST_USAGE)
            elif opt == "h":
                return self.help(LIST_USAGE)
        try:
            entries = self.ctl.list_pid(pid) if pid != -1 else self.ctl.list_all()
        except ListIncomplete as exc:
            # A tapdisk that did not answer is printed with what is known, and the
            # command fails (ETIMEDOUT): never a listing that silently lacks it.
            self._print_list(exc.entries, pid, minor, kind, path)
            raise
        self._print_list(entries, pid, minor, kind, path)
        return 0

    def _print_list(self, entries: list[TapEntry], pid: int, minor: int, kind: str | None,
                    path: str | None) -> None:
        tty = _stdout_isatty()
        for e in entries:
            if minor >= 0 and e.minor != minor:
                continue
            if pid >= 0 and e.pid != pid:
                continue
            if kind is not None and e.type != kind:
                continue
            if path is not None and e.path != path:
                continue
            self.print(_row(e) if tty else _pairs(e))

    # ------------------------------------------------------------------ minors
    def cmd_allocate(self, args: list[str]) -> int:
        for opt, val in self.options(args, "d:h"):
            # -d named the device node in the kernel-driver days; the marker path is
            # what callers parse now, so the name is accepted and not used.
            if opt == "?":
                return self.bad_option(val, ALLOCATE_USAGE)
            if opt == "h":
                return self.help(ALLOCATE_USAGE)
        _minor, marker = self.ctl.allocate()
        self.print(marker + "\n")
        return 0

    def cmd_free(self, args: list[str]) -> int:
        minor = -1
        for opt, val in self.options(args, "m:h"):
            if opt == "m":
                minor = atoi(val or "")
            elif opt == "?":
                return self.bad_option(val, FREE_USAGE)
            elif opt == "h":
                return self.help(FREE_USAGE)
        if minor == -1:
            return self.usage(FREE_USAGE)
        self.ctl.free(minor)
        return 0

    # ------------------------------------------------------------------ lifecycle
    def cmd_create(self, args: list[str]) -> int:
        params: str | None = None
        o = _OpenOptions()
        for opt, val in self.options(args, "a:RDd:e:rb2:st:C:h"):
            if opt == "a":
                params = val
            elif opt == "d":
                pass  # a device name: see allocate
            elif opt == "?":
                return self.bad_option(val, CREATE_USAGE)
            elif opt == "h":
                return self.help(CREATE_USAGE)
            else:
                o.take(opt, val or "")
        if params is None:
            return self.usage(CREATE_USAGE)
        _tid, _minor, marker = self.ctl.create(
            params, o.flags, prt_minor=o.prt_minor, secondary=o.secondary,
            req_timeout=o.req_timeout, logpath=o.logpath)
        self.print(marker + "\n")
        return 0

    def cmd_destroy(self, args: list[str]) -> int:
        t = self._pid_minor(args, "p:m:t:h", DESTROY_USAGE)
        if t.code is not None:
            return t.code
        self.ctl.destroy(t.pid, t.minor, t.timeout)
        return 0

    def cmd_spawn(self, args: list[str]) -> int:
        for opt, val in self.options(args, "h"):
            if opt == "?":
                return self.bad_option(val, SPAWN_USAGE)
            if opt == "h":
                return self.help(SPAWN_USAGE)
        tid = self.ctl.spawn()
        self.print(f"tapdisk spawned with pid {tid}\n" if _stdout_isatty() else f"{tid}\n")
        return 0

    def cmd_attach(self, args: list[str]) -> int:
        # The reference prints attach's -h usage on stderr (and still exits 0).
        t = self._pid_minor(args, "p:m:h", ATTACH_USAGE, help_to_err=True)
        if t.code is not None:
            return t.code
        self.ctl.attach(t.pid, t.minor)
        return 0

    def cmd_detach(self, args: list[str]) -> int:
        t = self._pid_minor(args, "p:m:h", DETACH_USAGE)
        if t.code is not None:
            return t.code
        self.ctl.detach(t.pid, t.minor)
        return 0

    def cmd_open(self, args: list[str]) -> int:
        pid = minor = -1
        params: str | None = None
        key: bytes | None = None
        o = _OpenOptions()
        for opt, val in self.options(args, "a:RDm:p:e:rb2:st:C:Eh"):
            if opt == "p":
                pid = atoi(val or "")
            elif opt == "m":
                minor = atoi(val or "")
            elif opt == "a":
                params = val
            elif opt == "E":
                # Read at once, where the option stands, as the reference does.
                if key is not None:
                    self.error("Only supply -E once\n")
                    raise _Exit(1)
                key = read_key(sys.stdin.buffer) if sys.stdin is not None else b""
                if len(key) not in KEY_SIZES:
                    self.error("Unsupported keysize, use either 256 bit or 512 bit key\n")
                    raise _Exit(1)
            elif opt == "?":
                return self.bad_option(val, OPEN_USAGE)
            elif opt == "h":
                return self.help(OPEN_USAGE)
            else:
                o.take(opt, val or "")
        if pid == -1 or minor == -1 or params is None:
            return self.usage(OPEN_USAGE)
        self.ctl.open(pid, minor, params, o.flags, prt_minor=o.prt_minor,
                      secondary=o.secondary, req_timeout=o.req_timeout, logpath=o.logpath,
                      key=key)
        return 0

    def cmd_close(self, args: list[str]) -> int:
        t = self._pid_minor(args, "p:m:ft:h", CLOSE_USAGE)
        if t.code is not None:
            return t.code
        self.ctl.close(t.pid, t.minor, t.force, t.timeout)
        return 0

    def cmd_pause(self, args: list[str]) -> int:
        # The reference's -t falls through into its usage error (a missing break); ours
        # bounds the wait as close's and destroy's -t do.
        t = self._pid_minor(args, "p:m:t:h", PAUSE_USAGE)
        if t.code is not None:
            return t.code
        self.ctl.pause(t.pid, t.minor, t.timeout)
        return 0

    def cmd_unpause(self, args: list[str]) -> int:
        pid = minor = -1
        params = secondary = logpath = None
        for opt, val in self.options(args, "p:m:a:2:c:h"):
            if opt == "p":
                pid = atoi(val or "")
            elif opt == "m":
                minor = atoi(val or "")
            elif opt == "a":
                params = val
            elif opt == "2":
                secondary = val
            elif opt == "c":
                logpath = val
            elif opt == "?":
                return self.bad_option(val, UNPAUSE_USAGE)
            elif opt == "h":
                return self.help(UNPAUSE_USAGE)
        if pid == -1 or minor == -1:
            return self.usage(UNPAUSE_USAGE)
        self.ctl.unpause(pid, minor, params, secondary=secondary, logpath=logpath)
        return 0

    def cmd_valve(self, args: list[str]) -> int:
        pid = minor = -1
        limits: str | None = None
        for opt, val in self.options(args, "p:m:l:h"):
            if opt == "p":
                pid = atoi(val or "")
            elif opt == "m":
                minor = atoi(val or "")
            elif opt == "l":
                limits = val or ""
            elif opt == "?":
                return self.bad_option(val, VALVE_USAGE)
            elif opt == "h":
                return self.help(VALVE_USAGE)
        if pid == -1 or minor == -1 or limits is None:
            return self.usage(VALVE_USAGE)
        self.ctl.set_limits(pid, minor, limits)
        return 0

    def cmd_stats(self, args: list[str]) -> int:
        t = self._pid_minor(args, "p:m:h", STATS_USAGE)
        if t.code is not None:
            return t.code
        text = self.ctl.stats(t.pid, t.minor)
        self.print(text + b"\n\n")  # one newline from the library, one from the CLI
        return 0

    # ------------------------------------------------------------------ shared
    def _pid_minor(self, args: list[str], optstring: str, text: str,
                   help_to_err: bool = False) -> _Target:
        """The common ``-p pid -m minor [-t secs] [-f]`` commands; ``code`` is set when
        the command must stop here with it."""
        pid = minor = -1
        timeout: float | None = None
        force = False
        for opt, val in self.options(args, optstring):
            if opt == "p":
                pid = atoi(val or "")
            elif opt == "m":
                minor = atoi(val or "")
            elif opt == "t":
                timeout = float(atoi(val or ""))
            elif opt == "f":
                force = True
            elif opt == "?":
                return _Target(pid, minor, timeout, force, self.bad_option(val, text))
            elif opt == "h":
                if help_to_err:
                    self.error(text)
                    return _Target(pid, minor, timeout, force, 0)
                return _Target(pid, minor, timeout, force, self.help(text))
        if pid == -1 or minor == -1:
            return _Target(pid, minor, timeout, force, self.usage(text))
        return _Target(pid, minor, timeout, force, None)


class _Target(NamedTuple):
    pid: int
    minor: int
    timeout: float | None
    force: bool
    code: int | None  # set: stop with this exit code


class _OpenOptions:
    """The image options open and create share, encoded as the reference encodes them."""

    def __init__(self) -> None:
        self.flags = 0
        self.prt_minor: int | None = None
        self.secondary: str | None = None
        self.req_timeout = 0
        self.logpath: str | None = None

    def take(self, opt: str, val: str) -> None:
        if opt == "R":
            self.flags |= Flag.RDONLY
        elif opt == "D":
            self.flags |= Flag.NO_O_DIRECT
        elif opt == "r":
            self.flags |= Flag.ADD_LCACHE
        elif opt == "b":  # ours: the reference's tap-ctl has no option for ADD_CACHE
            self.flags |= Flag.ADD_CACHE
        elif opt == "e":
            self.flags |= Flag.REUSE_PRT
            self.prt_minor = atoi(val)
        elif opt == "2":
            self.flags |= Flag.SECONDARY
            self.secondary = val
        elif opt == "s":
            self.flags |= Flag.STANDBY
        elif opt == "t":
            self.req_timeout = atoi(val)
        elif opt == "C":
            self.flags |= Flag.ADD_LOG
            self.logpath = val


def _pairs(e: TapEntry) -> str:
    """The pipe format sm and xapi parse: the known fields, space separated."""
    fields = []
    if e.pid is not None:
        fields.append(f"pid={e.pid}")
    if e.minor is not None:
        fields.append(f"minor={e.minor}")
    if e.state is not None:
        fields.append(f"state={state_text(e.state)}")
    if e.args is not None:
        fields.append(f"args={e.args}")
    return " ".join(fields) + "\n"


def _row(e: TapEntry) -> str:
    """The terminal format: fixed columns, '-' for what is unknown."""
    def known(v: object) -> str:
        return "-" if v is None else str(v)
    state = "-" if e.state is None else state_text(e.state)
    return (f"{known(e.pid):>8} {known(e.minor):>4} {state:>4} "
            f"{known(e.type):>10} {known(e.path)}\n")


HANDLERS: dict[str, Callable[[Cli, list[str]], int]] = {
    name: getattr(Cli, f"cmd_{name}") for name in [*COMMANDS, "valve"]}


def run(argv: list[str]) -> tuple[int, bytes]:
    """Run tap-ctl on ``argv`` (without the program name): (exit code, stdout bytes).
    Diagnostics go to stderr as they happen."""
    if not argv or len(argv[0]) >= 25 or argv[0] not in HANDLERS:
        return 0, help_text().encode()
    command = argv[0]
    args = [a for a in argv[1:] if a != "--debug"]
    cli = Cli(command, debug=len(args) != len(argv) - 1)
    try:
        code = HANDLERS[command](cli, args)
    except _Exit as exc:
        return exc.code, bytes(cli.out)
    except BlktapError as exc:
        if cli.debug:
            cli.error(f"tap-ctl {command}: {exc}\n")
        code = exc.errno or errno.EIO
    except OSError as exc:
        if cli.debug:
            cli.error(f"tap-ctl {command}: {exc}\n")
        code = exc.errno or errno.EIO
    if code:
        cli.error(os.strerror(code) + "\n")
    return code, bytes(cli.out)


def _run_and_print(argv: list[str], out: Output) -> int:
    code, data = run(argv[1:])
    try:
        out.raw(data)
    except BrokenPipeError:
        pass  # the reference ignores SIGPIPE: output to a closed pipe is lost quietly
    return code


def main(argv: list[str] | None = None) -> int:
    # SIGTERM raises, so that an interrupted create undoes its steps (frees the minor,
    # stops the tapdisk it spawned) as a failed one does.
    return legacy_main("tap-ctl", _run_and_print,
                       None if argv is None else ["tap-ctl", *argv])

if __name__ == "__main__":
    sys.exit(main())
