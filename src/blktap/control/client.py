"""The tap-ctl client library: talk to running tapdisks, manage minors, spawn tapdisks.

Every call that talks to a tapdisk opens one AF_UNIX stream connection to its control
socket ``<dir>/ctl<id>``, writes one request (the 544-byte message and its trailers), reads
the reply (LIST: a run of replies) and closes the connection, as the reference tap-ctl does.
An ERROR reply raises :class:`BlktapError` with the reply's errno and the tapdisk's message
text (when it gave one). Nothing here prints: ``blktap.cli.tap_ctl`` is the front-end.

The "id" of a tapdisk is the number in its socket name; the reference's tapdisk uses its
pid, and so do we. Minors are marker files handled by :class:`RunDir`.

Behaviour taken from the reference (``control/tap-ctl-*.c``), kept on purpose:

* ``list`` is a three-way outer join of the minors (marker files), the tapdisks (control
  sockets that answer PID) and the VBDs each tapdisk reports. A socket nobody listens on
  (a dead tapdisk's leftover: connection refused) is skipped; a tapdisk whose LIST fails
  or is empty shows as its pid alone; a marker no VBD claims shows as its minor alone.
  VBDs come out in the reverse of the order the tapdisk sends them (the reference
  prepends each to its list).
* ``create`` = allocate, spawn, attach, open; a failed open is unwound with detach + free,
  a failed spawn or attach with free. ``destroy`` = close, detach, free, stopping at the
  first failure.
* OPEN carries the minor in ``cookie`` and ``devnum``, ``prt_devnum`` = the ``-e`` minor or
  -1, ``req_timeout`` as a u16. RESUME carries only flags, path and secondary.

Where we differ (see docs/tap-ctl.md): the errno of an ERROR reply to ATTACH, DETACH and
STATS is reported (the reference turns the first two into EINVAL and prints a blank stats
answer); a reply of the wrong type is EINVAL everywhere; PID/LIST/STATS have a 10 s
timeout (the reference waits forever for PID); spawn has an overall time limit.

A tapdisk that is alive but does not answer PID or LIST in time (stopped, hung, or its
socket's backlog full) is never left out of ``list``, where its minors would look
orphaned and be freed: it is listed with what is known (its pid, and the minors whose
marker it holds locked) and ``list`` raises :class:`ListIncomplete` (ETIMEDOUT) carrying
the whole list, which tap-ctl prints before failing.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from blktap.control import message as m
from blktap.control.message import Flag, Message, MessageType, Params
from blktap.control.rundir import ENV_VAR, MAX_MINORS, MinorInfo, RunDir
from blktap.errors import BlktapError, ControlProtocolError

QUERY_TIMEOUT = 10.0  # PID, LIST, STATS: the reference's list/stats use 10 s
SPAWN_TIMEOUT = 60.0  # for the launched tapdisk to print its socket and exit
# Slow hosts (an emulated dom0, a loaded machine: starting Python can take a minute) may
# give it longer; the reference has no limit at all.
SPAWN_TIMEOUT_ENV = "BLKTAP_SPAWN_TIMEOUT"


def spawn_timeout() -> float:
    """SPAWN_TIMEOUT, or ``$BLKTAP_SPAWN_TIMEOUT`` seconds when that is a positive number."""
    try:
        value = float(os.environ.get(SPAWN_TIMEOUT_ENV, ""))
    except ValueError:
        return SPAWN_TIMEOUT
    return value if value > 0 else SPAWN_TIMEOUT
SPAWN_RETRIES = 3  # a tapdisk killed by SIGUSR1 before it set its handlers is retried
NO_PARENT = -1  # prt_devnum when no -e minor is given (the reference sends -1)
_SOCKET_RE = re.compile(r"ctl(\d+)$")
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), NUL included
_KEY_BOUND = 1025  # read at most this much key from a stream (32 or 64 are valid)
_CONNECT_RETRY = 0.02  # seconds between connects to a socket whose backlog is full


@dataclass(frozen=True)
class TapEntry:
    """One row of ``list``: any of the fields may be unknown (None)."""

    pid: int | None = None
    minor: int | None = None
    state: int | None = None
    type: str | None = None
    path: str | None = None

    @property
    def args(self) -> str | None:
        """``type:path`` as tap-ctl prints it after ``args=``, or None."""
        if self.type is None or self.path is None:
            return None
        return f"{self.type}:{self.path}"


class ListIncomplete(BlktapError):
    """``list`` could not ask every tapdisk: ``entries`` is the list nonetheless, with
    what is known of the tapdisks that did not answer (``silent``, their ids)."""

    default_errno = errno.ETIMEDOUT

    def __init__(self, message: str, entries: list[TapEntry], silent: list[int],
                 errno: int | None = None) -> None:
        super().__init__(message, errno)
        self.entries = entries
        self.silent = silent


def parse_params(params: str) -> tuple[str, str]:
    """Split ``type:path`` at its first colon (the path may hold more)."""
    kind, sep, path = params.partition(":")
    if not sep:
        raise BlktapError(f"'{params}': expected TYPE:PATH", errno.EINVAL)
    return kind, path


def tapdisk_binary() -> str:
    """The tapdisk to spawn: ``$TAPDISK``, else ``tapdisk`` beside this Python (our venv's
    console script), else ``tapdisk`` on PATH."""
    env = os.environ.get("TAPDISK")
    if env:
        return env
    beside = os.path.join(os.path.dirname(sys.executable), "tapdisk")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("tapdisk")
    if found:
        return found
    raise BlktapError("no tapdisk binary: set TAPDISK or put tapdisk on PATH", errno.ENOENT)


def _error(text: str, code: int) -> BlktapError:
    return BlktapError(f"{text}: {os.strerror(code)}", code)


def _check_minor(minor: int) -> None:
    # The cookie is a u16; the marker files stop at MAX_MINORS anyway.
    if not 0 <= minor <= 0xFFFF:
        raise BlktapError(f"invalid minor {minor}", errno.EINVAL)


class TapCtl:
    """tap-ctl operations against the runtime directory ``rundir`` (default: the one
    ``$BLKTAP_CONTROL_DIR`` names, else /run/blktap-control)."""

    def __init__(self, rundir: RunDir | None = None,
                 query_timeout: float = QUERY_TIMEOUT) -> None:
        self.rundir = rundir if rundir is not None else RunDir()
        self.query_timeout = query_timeout  # for each tapdisk's PID + LIST in list

    # ------------------------------------------------------------------ transport
    def _connect(self, tid: int, deadline: float | None) -> socket.socket:
        if tid < 0:
            raise BlktapError(f"invalid tapdisk id {tid}", errno.EINVAL)
        path = self.rundir.control_socket(tid)
        if len(os.fsencode(path)) >= _SUN_PATH_MAX:
            raise _error(f"{path}: socket name too long", errno.ENAMETOOLONG)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                _arm(sock, deadline)
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    # EAGAIN: the listen backlog is full (a stopped or swamped tapdisk):
                    # alive, so wait for room rather than give up on it.
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError from None
                    time.sleep(_CONNECT_RETRY)
        except TimeoutError:
            sock.close()
            raise _error(f"connecting to {path}", errno.ETIMEDOUT) from None
        except OSError as exc:
            sock.close()
            code = exc.errno or errno.EIO
            if code == errno.ECONNREFUSED:
                raise _error(f"{path}: no tapdisk {tid} listens there (stale socket of a "
                             "dead tapdisk?)", code) from None
            if code == errno.ENOENT:
                raise _error(f"{path}: no tapdisk {tid}", code) from None
            raise _error(f"connecting to {path}", code) from None
        return sock

    def _send(self, sock: socket.socket, request: Message, deadline: float | None) -> bool:
        """Send ``request``; False if the peer hung up first (its reply may still be
        waiting, e.g. an ERROR it answered before reading our trailers)."""
        data = m.encode(request)
        try:
            _arm(sock, deadline)
            sock.sendall(data)
        except TimeoutError:
            raise _error(f"sending {request.type.label}", errno.ETIMEDOUT) from None
        except (BrokenPipeError, ConnectionResetError):
            return False
        except OSError as exc:
            raise _error(f"sending {request.type.label}", exc.errno or errno.EIO) from None
        return True

    @staticmethod
    def _receive(sock: socket.socket, request: Message, deadline: float | None,
                 short: int = errno.EIO) -> Message:
        """One reply. A stream that ends early is ``short`` (the reference: EIO), a
        malformed reply EINVAL, no reply in time ETIMEDOUT."""
        try:
            _arm(sock, deadline)
            return m.read_message(sock)
        except TimeoutError:
            raise _error(f"waiting for the {request.type.label} reply",
                         errno.ETIMEDOUT) from None
        except ControlProtocolError as exc:
            code = short if exc.errno == errno.EPROTO else exc.errno
            raise BlktapError(f"bad {request.type.label} reply: {exc}", code) from None
        except OSError as exc:
            raise _error(f"reading the {request.type.label} reply",
                         exc.errno or errno.EIO) from None

    def _exchange(self, tid: int, request: Message, expect: MessageType,
                  timeout: float | None) -> Message:
        """One request, one reply of type ``expect``; an ERROR reply raises its errno."""
        deadline = _deadline(timeout)
        with self._connect(tid, deadline) as sock:
            sent = self._send(sock, request, deadline)
            try:
                reply = self._receive(sock, request, deadline)
            except BlktapError:
                if not sent:
                    raise _error(f"tapdisk {tid} hung up on {request.type.label}",
                                 errno.EPIPE) from None
                raise
        return _expect(reply, expect, request, tid)

    # ------------------------------------------------------------------ queries
    def pid(self, tid: int, timeout: float | None = QUERY_TIMEOUT) -> int:
        """The pid the tapdisk behind ``ctl<tid>`` reports (PID)."""
        reply = self._exchange(tid, Message(MessageType.PID), MessageType.PID_RSP, timeout)
        assert isinstance(reply.payload, m.Pid)
        return reply.payload.pid

    def vbds(self, tid: int, pid: int | None = None,
             timeout: float | None = QUERY_TIMEOUT) -> list[TapEntry]:
        """The VBDs one tapdisk serves (LIST), in the order tap-ctl prints them."""
        deadline = _deadline(timeout)
        request = Message(MessageType.LIST, 0xFFFF)  # the reference sends cookie -1
        out: list[TapEntry] = []
        with self._connect(tid, deadline) as sock:
            self._send(sock, request, deadline)
            while True:
                reply = self._receive(sock, request, deadline, short=errno.EPROTO)
                if reply.type is MessageType.ERROR:
                    _expect(reply, MessageType.LIST_RSP, request, tid)
                if reply.type is not MessageType.LIST_RSP:
                    raise BlktapError(f"tapdisk {tid} answered LIST with "
                                      f"{reply.type.label}", errno.EPROTO)
                entry = reply.payload
                assert isinstance(entry, m.ListEntry)
                if entry.count == 0:
                    break
                kind = path = None
                if entry.path:
                    kind, path = parse_params(entry.path)
                out.append(TapEntry(pid if pid is not None else tid,
                                    None if entry.minor == -1 else entry.minor,
                                    None if entry.state == -1 else entry.state, kind, path))
        out.reverse()
        return out

    def tapdisk_ids(self) -> list[int]:
        """The ids of every ``ctl<id>`` name in the runtime directory, in glob order."""
        try:
            names = os.listdir(self.rundir.path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _error(f"cannot list {self.rundir.path}", exc.errno or errno.EIO) from exc
        ids: list[int] = []
        for name in sorted(names):
            # The reference globs ctl* and scans a number after the prefix.
            hit = re.match(r"ctl([+-]?\d+)", name)
            if hit:
                ids.append(int(hit.group(1)))
        return ids

    def list_pid(self, tid: int) -> list[TapEntry]:
        """``list -p``: one tapdisk's VBDs, or the tapdisk alone when it serves none or
        its LIST fails; nothing when it does not answer PID (no tapdisk there).
        :class:`ListIncomplete` when it does not answer in time."""
        entries, silent = self._list_tapdisk(tid, None)
        if silent:
            raise _incomplete(entries, [tid])
        return entries

    def list_all(self) -> list[TapEntry]:
        """``list``: the three-way join of tapdisks, their VBDs and the minors.
        :class:`ListIncomplete` when some tapdisk does not answer in time."""
        minors = {info.minor: info for info in self.rundir.minors()}
        out: list[TapEntry] = []
        silent: list[int] = []
        for tid in self.tapdisk_ids():
            found, mute = self._list_tapdisk(tid, minors)
            if mute:
                silent.append(tid)
            for vbd in found:
                if vbd.minor is not None:
                    minors.pop(vbd.minor, None)
                out.append(vbd)
        out.extend(TapEntry(minor=n) for n in sorted(minors))
        if silent:
            raise _incomplete(out, silent)
        return out

    def _list_tapdisk(self, tid: int, minors: dict[int, MinorInfo] | None
                      ) -> tuple[list[TapEntry], bool]:
        """One tapdisk's rows, and whether it failed to answer in time. A tapdisk that
        does not answer is listed with the minors it holds (``minors``: the markers, with
        their flock holders; None: read them) rather than dropped: they are not orphans."""
        deadline = _deadline(self.query_timeout)
        try:
            pid = self.pid(tid, _left(deadline))
        except BlktapError as exc:
            if exc.errno != errno.ETIMEDOUT:
                return [], False  # a stale socket (connection refused), or no tapdisk
            return self._held_by(tid, tid, minors), True
        if pid < 0:
            return [], False
        try:
            found = self.vbds(tid, pid, _left(deadline))
        except BlktapError as exc:
            if exc.errno == errno.ETIMEDOUT:
                return self._held_by(tid, pid, minors), True
            found = []
        return found or [TapEntry(pid=pid)], False

    def _held_by(self, tid: int, pid: int, minors: dict[int, MinorInfo] | None
                 ) -> list[TapEntry]:
        """What is known of a tapdisk that does not answer: its pid, with each minor
        whose marker it holds (highest first, as its VBDs would be printed)."""
        if minors is None:
            minors = {info.minor: info for info in self.rundir.minors()}
        held = sorted((n for n, info in minors.items() if info.holder in (tid, pid)),
                      reverse=True)
        return [TapEntry(pid=pid, minor=n) for n in held] or [TapEntry(pid=pid)]

    def stats(self, tid: int, minor: int, timeout: float | None = QUERY_TIMEOUT) -> bytes:
        """The stats text of one VBD (STATS_RSP and its body), without newlines added."""
        _check_minor(minor)
        reply = self._exchange(tid, Message(MessageType.STATS, minor), MessageType.STATS_RSP,
                               timeout)
        return reply.text or b""

    # ------------------------------------------------------------------ VBD lifecycle
    def attach(self, tid: int, minor: int, timeout: float | None = None) -> None:
        _check_minor(minor)
        self._exchange(tid, Message(MessageType.ATTACH, minor), MessageType.ATTACH_RSP,
                       timeout)

    def detach(self, tid: int, minor: int, timeout: float | None = None) -> None:
        _check_minor(minor)
        self._exchange(tid, Message(MessageType.DETACH, minor), MessageType.DETACH_RSP,
                       timeout)

    def open(self, tid: int, minor: int, params: str, flags: int = 0, *,
             prt_minor: int | None = None, secondary: str | None = None,
             req_timeout: int = 0, logpath: str | None = None, key: bytes | None = None,
             timeout: float | None = None) -> m.Image:
        """OPEN ``params`` (``type:path``) on an attached minor; returns the disk's size.

        ``flags`` carries RDONLY, NO_O_DIRECT, ADD_LCACHE, STANDBY, ...; REUSE_PRT,
        SECONDARY, ADD_LOG and OPEN_ENCRYPTED are added when ``prt_minor``, ``secondary``,
        ``logpath`` and ``key`` are given. ``req_timeout`` (seconds, 0 = tapdisk's
        default) is sent as the reference does, truncated to its u16 field.
        """
        _check_minor(minor)
        if prt_minor is not None:
            flags |= Flag.REUSE_PRT
        if secondary is not None:
            flags |= Flag.SECONDARY
        if logpath is not None:
            flags |= Flag.ADD_LOG
        if key is not None:
            flags |= Flag.OPEN_ENCRYPTED
        _check_trailers(flags, logpath, key)
        payload = Params(flags=int(flags), path=params, devnum=minor,
                         prt_devnum=(NO_PARENT if prt_minor is None else prt_minor) & 0xFFFFFFFF,
                         req_timeout=req_timeout & 0xFFFF, secondary=secondary or "")
        request = _build(MessageType.OPEN, minor, payload, logpath, key)
        reply = self._exchange(tid, request, MessageType.OPEN_RSP, timeout)
        assert isinstance(reply.payload, m.Image)
        return reply.payload

    def close(self, tid: int, minor: int, force: bool = False,
              timeout: float | None = None) -> None:
        """CLOSE, or FORCE_SHUTDOWN with ``force`` (skips waiting for dead rings)."""
        _check_minor(minor)
        kind = MessageType.FORCE_SHUTDOWN if force else MessageType.CLOSE
        self._exchange(tid, Message(kind, minor), MessageType.CLOSE_RSP, timeout)

    def pause(self, tid: int, minor: int, timeout: float | None = None) -> None:
        _check_minor(minor)
        self._exchange(tid, Message(MessageType.PAUSE, minor), MessageType.PAUSE_RSP, timeout)

    def unpause(self, tid: int, minor: int, params: str | None = None, flags: int = 0, *,
                secondary: str | None = None, logpath: str | None = None,
                timeout: float | None = None) -> None:
        """RESUME, optionally onto new ``params`` (a new leaf), with a new secondary and
        CBT log (without ``logpath`` the tapdisk drops its log layer, as the reference)."""
        _check_minor(minor)
        if secondary is not None:
            flags |= Flag.SECONDARY
        if logpath is not None:
            flags |= Flag.ADD_LOG
        _check_trailers(flags, logpath, None)
        payload = Params(flags=int(flags), path=params or "", secondary=secondary or "")
        request = _build(MessageType.RESUME, minor, payload, logpath, None)
        self._exchange(tid, request, MessageType.RESUME_RSP, timeout)

    def set_limits(self, tid: int, minor: int, limits: str,
                   timeout: float | None = None) -> None:
        """VALVE_SET: the valve of an open VBD takes ``limits`` (docs/filters.md) at once."""
        _check_minor(minor)
        raw = limits.encode()
        if len(raw) >= m.STRING_LENGTH:
            raise BlktapError(f"limits: {len(raw)} bytes, at most {m.STRING_LENGTH - 1}",
                              errno.ENAMETOOLONG)
        self._exchange(tid, Message(MessageType.VALVE_SET, minor, m.Text(limits)),
                       MessageType.VALVE_SET_RSP, timeout)

    # ------------------------------------------------------------------ minors
    def allocate(self) -> tuple[int, str]:
        """A new minor: (minor, marker path)."""
        return self.rundir.allocate()

    def free(self, minor: int) -> None:
        """Release a minor nobody holds (EWOULDBLOCK while a tapdisk is attached to it)."""
        if not 0 <= minor < MAX_MINORS:
            # No marker can exist for it: answer as the reference's failed open does.
            raise _error(f"cannot free minor {minor}", errno.ENOENT)
        self.rundir.free(minor)

    # ------------------------------------------------------------------ processes
    def spawn(self, timeout: float | None = None) -> int:
        """Start a tapdisk and return its id (the number in its control socket name).

        The contract with our tapdisk: it is run without arguments, with stdout a pipe
        and the runtime directory in ``$BLKTAP_CONTROL_DIR``; it prints
        ``<dir>/ctl<pid>`` and a newline, daemonizes, and the process we launched exits
        0 once the daemon serves, so that stdout reaches EOF. A launched process that
        exits non-zero fails with its exit status as errno; one killed by SIGUSR1 is
        retried (as the reference: a debug signal may hit it before its handlers are
        set); one that prints no socket path fails with EPROTO.
        """
        if timeout is None:
            timeout = spawn_timeout()
        binary = tapdisk_binary()
        env = dict(os.environ)
        env[ENV_VAR] = self.rundir.path
        self.rundir.ensure()
        for attempt in range(SPAWN_RETRIES):
            out, status = _run_tapdisk(binary, env, timeout)
            if status == -signal.SIGUSR1 and attempt + 1 < SPAWN_RETRIES:
                continue
            break
        if status < 0:
            raise BlktapError(f"{binary} was killed by signal {-status}", errno.EINTR)
        if status > 0:
            code = status
            raise BlktapError(f"{binary} exited with status {status}: "
                              f"{os.strerror(code)}", code)
        return self._spawned_id(binary, out)

    def _spawned_id(self, binary: str, out: bytes) -> int:
        lines = [ln.strip() for ln in os.fsdecode(out).splitlines() if ln.strip()]
        hit = _SOCKET_RE.search(lines[-1]) if lines else None
        if hit is None:
            shown = lines[-1][:200] if lines else "nothing"
            raise BlktapError(f"{binary} printed {shown!r}, not its control socket path "
                              "(<dir>/ctl<pid>)", errno.EPROTO)
        where = os.path.dirname(lines[-1]) or "."
        if os.path.realpath(where) != os.path.realpath(self.rundir.path):
            raise BlktapError(f"{binary} serves in {where}, not in {self.rundir.path} "
                              f"(is {ENV_VAR} passed on?)", errno.EPROTO)
        return int(hit.group(1))

    def create(self, params: str, flags: int = 0, *, prt_minor: int | None = None,
               secondary: str | None = None, req_timeout: int = 0,
               logpath: str | None = None) -> tuple[int, int, str]:
        """allocate + spawn + attach + open; returns (tapdisk id, minor, marker path).

        On failure the steps done are undone as the reference does: a failed open
        detaches (our tapdisk then exits, its last VBD gone) and frees the minor; a failed
        spawn or attach frees the minor, and after a failed attach the tapdisk spawned
        for it is stopped. The first error is the one raised.
        """
        minor, marker = self.allocate()
        try:
            tid = self.spawn()
        except BaseException:
            _quietly(self.free, minor)
            raise
        try:
            self.attach(tid, minor)
        except BaseException:
            # The tapdisk we just started serves nothing and never would (it only exits
            # when a VBD is removed): stop it, which the reference leaves running.
            _stop_spawned(tid)
            _quietly(self.free, minor)
            raise
        try:
            self.open(tid, minor, params, flags, prt_minor=prt_minor, secondary=secondary,
                      req_timeout=req_timeout, logpath=logpath)
        except BaseException:
            _quietly(self.detach, tid, minor)
            _quietly(self.free, minor)
            raise
        return tid, minor, marker

    def destroy(self, tid: int, minor: int, timeout: float | None = None) -> None:
        """close + detach + free, stopping at the first failure (``timeout`` bounds the
        close, as the reference's ``-t``)."""
        self.close(tid, minor, False, timeout)
        self.detach(tid, minor)
        self.free(minor)

    # ------------------------------------------------------------------ Xen blkif
    def disk_info(self, tid: int, minor: int, timeout: float | None = QUERY_TIMEOUT) -> m.Image:
        """DISK_INFO: the size of the disk a minor serves (sectors, sector size, VDISK_*
        info bits), what tapback tells the guest."""
        _check_minor(minor)
        reply = self._exchange(tid, Message(MessageType.DISK_INFO, minor),
                               MessageType.DISK_INFO_RSP, timeout)
        assert isinstance(reply.payload, m.Image)
        return reply.payload

    def xen_connect(self, tid: int, minor: int, blkif: m.Blkif,
                    timeout: float | None = QUERY_TIMEOUT) -> None:
        """XENBLKIF_CONNECT: have the tapdisk map a guest's ring and serve ``minor`` on
        it. EALREADY (that ring is already connected) is raised like any other errno:
        tapback decides that it is fine."""
        _check_minor(minor)
        self._exchange(tid, Message(MessageType.XENBLKIF_CONNECT, minor, blkif),
                       MessageType.XENBLKIF_CONNECT_RSP, timeout)

    def xen_disconnect(self, tid: int, domid: int, devid: int, minor: int = 0,
                       timeout: float | None = QUERY_TIMEOUT) -> None:
        """XENBLKIF_DISCONNECT of the ring of ``domid``/``devid``. The reference sends a
        zero cookie (its tapdisk finds the ring by domid and devid); we send the minor
        when we know it, which a tapdisk that looks only at the payload ignores."""
        _check_minor(minor)
        self._exchange(tid, Message(MessageType.XENBLKIF_DISCONNECT, minor,
                                    m.Blkif(domid=domid, devid=devid)),
                       MessageType.XENBLKIF_DISCONNECT_RSP, timeout)


# ----------------------------------------------------------------------------- helpers
def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(timeout, 0.0)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _incomplete(entries: list[TapEntry], silent: list[int]) -> ListIncomplete:
    which = ", ".join(str(t) for t in silent)
    return ListIncomplete(f"tapdisk {which} did not answer in time; listed with what is "
                          f"known: {os.strerror(errno.ETIMEDOUT)}", entries, silent)


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Give the next socket operation what is left of the deadline. A deadline already
    past still gets a moment (the reference's select with a zero timeout polls once)."""
    if deadline is None:
        sock.settimeout(None)
    else:
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))


def _expect(reply: Message, expect: MessageType, request: Message, tid: int) -> Message:
    if reply.type is expect:
        return reply
    if reply.type in (MessageType.ERROR, MessageType.RUNTIME_ERROR):
        assert isinstance(reply.payload, m.Response)
        code = reply.payload.error or errno.EIO
        why = f" ({reply.payload.message})" if reply.payload.message else ""
        raise BlktapError(f"tapdisk {tid}: {request.type.label} failed: "
                          f"{os.strerror(code)}{why}", code)
    raise BlktapError(f"tapdisk {tid} answered {request.type.label} with "
                      f"{reply.type.label}", errno.EINVAL)


def _check_trailers(flags: int, logpath: str | None, key: bytes | None) -> None:
    if bool(flags & Flag.ADD_LOG) != (logpath is not None):
        raise BlktapError("ADD_LOG needs a log path and a log path needs ADD_LOG",
                          errno.EINVAL)
    if bool(flags & Flag.OPEN_ENCRYPTED) != (key is not None):
        raise BlktapError("OPEN_ENCRYPTED needs a key and a key needs OPEN_ENCRYPTED",
                          errno.EINVAL)


def _build(kind: MessageType, minor: int, payload: Params, logpath: str | None,
           key: bytes | None) -> Message:
    request = Message(kind, minor, payload, logpath, key)
    try:
        m.encode(request)  # fail here, with the codec's errno, before connecting
    except ControlProtocolError as exc:
        raise BlktapError(f"{kind.label}: {exc}", exc.errno) from None
    return request


def _run_tapdisk(binary: str, env: dict[str, str], timeout: float) -> tuple[bytes, int]:
    """Run the tapdisk launcher to its exit; (its stdout, its wait status as Popen gives
    it: negative = killed by that signal)."""
    try:
        proc = subprocess.Popen([binary], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=env, close_fds=True)
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise _error(f"cannot run {binary}", code) from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BlktapError(f"{binary} did not print its socket and exit within {timeout:g} s "
                          "(does its daemon keep stdout open?)", errno.ETIMEDOUT) from None
    return out, proc.returncode


def _stop_spawned(tid: int) -> None:
    """SIGTERM the tapdisk ``create`` spawned, if that pid still runs a tapdisk."""
    try:
        with open(f"/proc/{tid}/cmdline", "rb") as f:
            if b"tapdisk" not in f.read():
                return
        os.kill(tid, signal.SIGTERM)
    except OSError:
        pass


def _quietly(fn: Callable[..., object], *args: int) -> None:
    """Run an unwinding step; its own failure must not hide the error being unwound."""
    try:
        fn(*args)
    except BlktapError:
        pass


def read_key(stream: BinaryIO) -> bytes:
    """Read an encryption key from a binary stream until EOF (at most 1025 bytes, so that
    an over-long key is seen as such rather than cut to a valid size)."""
    chunks: list[bytes] = []
    total = 0
    while total < _KEY_BOUND:
        data = stream.read(_KEY_BOUND - total)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)
