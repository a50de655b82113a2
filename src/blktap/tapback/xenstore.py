"""An asyncio XenStore client: xenstored's UNIX socket or the /dev/xen/xenbus device.

One connection carries many requests at once; each reply is matched to its request by
``req_id`` (xenstored echoes it). Watch events arrive on the same connection whenever
xenstored fires them and are handed to the watch's callback or queue at once, from the
reader: nothing here polls. Transactions: :meth:`XenStore.transact` runs a coroutine
against a transaction and commits it, starting again from scratch when the commit (or a
request inside) answers EAGAIN, which is how xenstored reports a conflicting writer.

Through the xenbus device, the kernel handles WATCH and UNWATCH inside our ``write``: it
holds the connection's message lock while it asks xenstored and waits for the answer. The
kernel's one xenstore thread, which delivers every answer, takes that same lock to hand
us the answer to any *other* request of ours: if one is still on its way, it waits for
our write, which waits for it, and dom0's whole xenstore traffic stops for good (tapback
hung on a guest's shutdown this way: the UNWATCH of the gone frontend while a read of
the backend directory was answered). So on the device a WATCH or UNWATCH is written only
once every request before it has its answer, and nothing is sent while it is written.

Errors: a request xenstored refuses raises :class:`XenStoreError` with its errno
(``ENOENT``, ``EACCES``, ``EAGAIN``...); a connection that breaks fails every request in
flight and every later one with EPIPE, and ends the watches' iterators.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from blktap.errors import XenStoreError
from blktap.tapback import xs_wire as w
from blktap.tapback.xs_wire import Op

log = logging.getLogger("blktap.tapback.xenstore")

ENV_VAR = "XENSTORED_PATH"
DEFAULT_SOCKET = "/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
TRANSACTION_ATTEMPTS = 100
REQUEST_TIMEOUT = 30.0  # xenstored answers in milliseconds; this is for a peer gone mute
T = TypeVar("T")
WatchCallback = Callable[[str, str], None]  # (path that fired, token)


def default_path() -> str:
    """``$XENSTORED_PATH``, else xenstored's socket if it exists, else /dev/xen/xenbus."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    if os.path.exists(DEFAULT_SOCKET):
        return DEFAULT_SOCKET
    return XENBUS_DEVICE


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Watch:
    """A registered watch. Without a callback its events queue up: iterate it
    (``async for path in watch``) to get the paths that fired, in order."""

    def __init__(self, xs: XenStore, path: str, token: str,
                 callback: WatchCallback | None) -> None:
        self.xs, self.path, self.token, self.callback = xs, path, token, callback
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = False

    def _fire(self, path: str) -> None:
        if self.callback is not None:
            try:
                self.callback(path, self.token)
            except Exception:  # a bug in one handler must not stop the reader
                log.exception("watch %s (%s): handler failed", self.path, self.token)
        else:
            self._queue.put_nowait(path)

    def _end(self) -> None:
        self.closed = True
        self._queue.put_nowait(None)

    async def get(self) -> str:
        """The next path that fired; XenStoreError(EPIPE) once the watch is gone."""
        path = await self._queue.get()
        if path is None:
            self._queue.put_nowait(None)  # keep the end visible to every waiter
            raise XenStoreError(f"watch {self.path} ended", errno.EPIPE)
        return path

    def pending(self) -> list[str]:
        """The events queued so far, without waiting."""
        out: list[str] = []
        while not self._queue.empty():
            path = self._queue.get_nowait()
            if path is None:
                self._queue.put_nowait(None)
                break
            out.append(path)
        return out

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            try:
                yield await self.get()
            except XenStoreError:
                return

    async def close(self) -> None:
        await self.xs.unwatch(self)


class Tx:
    """The requests of one transaction (``XenStore.transact`` hands one to its body)."""

    def __init__(self, xs: XenStore, tx_id: int) -> None:
        self.xs, self.id = xs, tx_id

    async def read(self, path: str) -> str:
        return await self.xs.read(path, self.id)

    async def read_or(self, path: str, default: str | None = None) -> str | None:
        return await self.xs.read_or(path, default, self.id)

    async def write(self, path: str, value: str | bytes) -> None:
        await self.xs.write(path, value, self.id)

    async def mkdir(self, path: str) -> None:
        await self.xs.mkdir(path, self.id)

    async def rm(self, path: str) -> None:
        await self.xs.rm(path, self.id)

    async def directory(self, path: str) -> list[str]:
        return await self.xs.directory(path, self.id)

    async def exists(self, path: str) -> bool:
        return await self.xs.exists(path, self.id)


class XenStore:
    """One connection to xenstored. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, fd: int, where: str, *, device: bool = False) -> None:
        self._fd = fd
        self.where = where
        self.device = device  # the xenbus device (see the module's docstring), not a socket
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        # On the device: requests written whose answers have not been read, awaited or
        # not (a caller that gave up still has one on its way); set while there are none.
        self._unanswered: set[int] = set()
        self._answered = asyncio.Event()
        self._answered.set()
        self._ids = itertools.count(1)
        self._watches: dict[str, Watch] = {}
        self._tokens = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._broken: XenStoreError | None = None
        self.timeout = REQUEST_TIMEOUT
        self._loop.add_reader(fd, self._readable)

    @classmethod
    async def open(cls, path: str | None = None) -> XenStore:
        """Connect to xenstored's UNIX socket or open the xenbus device at ``path``
        (default: :func:`default_path`)."""
        where = path or default_path()
        try:
            st = os.stat(where)
        except OSError as exc:
            raise XenStoreError(f"{where}: {os.strerror(exc.errno or errno.EIO)} "
                                "(is xenstored running?)", exc.errno or errno.EIO) from None
        if stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, where)
            except OSError as exc:
                sock.close()
                raise XenStoreError(f"connecting to {where}: "
                                    f"{os.strerror(exc.errno or errno.EIO)}",
                                    exc.errno or errno.EIO) from None
            fd = sock.detach()
        else:
            try:
                fd = os.open(where, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise XenStoreError(f"opening {where}: {os.strerror(exc.errno or errno.EIO)}",
                                    exc.errno or errno.EIO) from None
        return cls(fd, where, device=not stat.S_ISSOCK(st.st_mode))

    async def __aenter__(self) -> XenStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._fd < 0:
            return
        self._fail(XenStoreError(f"{self.where}: connection closed", errno.EPIPE))
        os.close(self._fd)
        self._fd = -1

    # ------------------------------------------------------------------ transport
    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(XenStoreError(f"{self.where}: {os.strerror(exc.errno or errno.EIO)}",
                                     errno.EPIPE))
            return
        if not data:
            self._fail(XenStoreError(f"{self.where}: xenstored closed the connection",
                                     errno.EPIPE))
            return
        self._buf += data
        while len(self._buf) >= w.HEADER.size:
            op, req_id, _tx, length = w.HEADER.unpack_from(self._buf)
            if length > w.PAYLOAD_MAX:
                self._fail(XenStoreError(f"{self.where}: message of {length} bytes",
                                         errno.EPROTO))
                return
            end = w.HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[w.HEADER.size:end])
            del self._buf[:end]
            self._deliver(op, req_id, payload)

    def _deliver(self, op: int, req_id: int, payload: bytes) -> None:
        if op == Op.WATCH_EVENT:
            parts = w.split(payload)
            if len(parts) < 2:
                log.warning("%s: malformed watch event %r", self.where, payload[:80])
                return
            path, token = _decode(parts[0]), _decode(parts[1])
            watch = self._watches.get(token)
            if watch is not None:
                watch._fire(path)
            return
        if self._unanswered:
            self._unanswered.discard(req_id)
            if not self._unanswered:
                self._answered.set()
        fut = self._pending.pop(req_id, None)
        if fut is None:
            # The answer to a request its caller gave up on (cancelled): drop it.
            log.debug("%s: reply %d to no pending request", self.where, req_id)
        elif not fut.done():
            fut.set_result((op, payload))

    def _fail(self, exc: XenStoreError) -> None:
        if self._broken is None:
            self._broken = exc
            if self._fd >= 0:
                self._loop.remove_reader(self._fd)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for watch in self._watches.values():
            watch._end()
        self._watches.clear()
        self._unanswered.clear()
        self._answered.set()

    async def _answers_in(self) -> None:
        """Return once every request written has its answer read (or the connection
        broke); XenStoreError(ETIMEDOUT) when they take longer than the request timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._answered.wait()
        except TimeoutError:
            raise XenStoreError(f"{self.where}: {len(self._unanswered)} answers still "
                                f"outstanding after {self.timeout:g} s", errno.ETIMEDOUT) \
                from None

    async def _send(self, data: bytes, req_id: int, *, alone: bool = False) -> None:
        """Write one request. ``alone``: only once every earlier one is answered (a
        WATCH or UNWATCH through the xenbus device); later ones wait meanwhile."""
        async with self._write_lock:
            if alone:
                await self._answers_in()
            if self.device:
                self._unanswered.add(req_id)
                self._answered.clear()
            view = memoryview(data)
            while view:
                if self._broken is not None:
                    raise self._broken
                try:
                    sent = os.write(self._fd, view)
                except (BlockingIOError, InterruptedError):
                    ready = self._loop.create_future()
                    self._loop.add_writer(self._fd, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        self._loop.remove_writer(self._fd)
                    continue
                except OSError as exc:
                    err = XenStoreError(f"{self.where}: {os.strerror(exc.errno or errno.EIO)}",
                                        errno.EPIPE)
                    self._fail(err)
                    raise err from None
                view = view[sent:]

    async def request(self, op: Op, payload: bytes, tx: int = w.NO_TX) -> bytes:
        """Send one request and return its reply's payload; XS_ERROR raises."""
        if self._broken is not None:
            raise self._broken
        req_id = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            await self._send(w.pack(op, req_id, tx, payload), req_id,
                             alone=self.device and op in (Op.WATCH, Op.UNWATCH))
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives as the reply does, and tapback's stop then waits for ever.
            async with asyncio.timeout(self.timeout):
                rop, reply = await fut
        except TimeoutError:
            raise XenStoreError(f"XenStore {op.name.lower()}: no answer within "
                                f"{self.timeout:g} s", errno.ETIMEDOUT) from None
        finally:
            self._pending.pop(req_id, None)
        if rop == Op.ERROR:
            code = w.error_code(reply)
            raise XenStoreError(f"XenStore {op.name.lower()}: {os.strerror(code)}", code)
        if rop != op:
            raise XenStoreError(f"XenStore answered {op.name} with type {rop}", errno.EPROTO)
        return reply

    # ------------------------------------------------------------------ nodes
    async def read_bytes(self, path: str, tx: int = w.NO_TX) -> bytes:
        w.check_path(path)
        return await self.request(Op.READ, w.fields(path), tx)

    async def read(self, path: str, tx: int = w.NO_TX) -> str:
        return _decode(await self.read_bytes(path, tx))

    async def read_or(self, path: str, default: str | None = None,
                      tx: int = w.NO_TX) -> str | None:
        """The value, or ``default`` when the node does not exist."""
        try:
            return await self.read(path, tx)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return default
            raise

    async def exists(self, path: str, tx: int = w.NO_TX) -> bool:
        return await self.read_or(path, None, tx) is not None

    async def write(self, path: str, value: str | bytes, tx: int = w.NO_TX) -> None:
        """Write ``value``, creating the node (and missing parents)."""
        w.check_path(path)
        await self.request(Op.WRITE, w.fields(path, value, terminate_last=False), tx)

    async def mkdir(self, path: str, tx: int = w.NO_TX) -> None:
        w.check_path(path)
        await self.request(Op.MKDIR, w.fields(path), tx)

    async def rm(self, path: str, tx: int = w.NO_TX) -> None:
        """Remove a node and everything under it (a missing node raises ENOENT)."""
        w.check_path(path)
        await self.request(Op.RM, w.fields(path), tx)

    async def directory(self, path: str, tx: int = w.NO_TX) -> list[str]:
        """The names of a node's children."""
        w.check_path(path)
        return [_decode(p) for p in w.split(await self.request(Op.DIRECTORY, w.fields(path),
                                                               tx))]

    async def get_perms(self, path: str, tx: int = w.NO_TX) -> list[str]:
        """The permission entries (``n0``, ``r5``...: owner first)."""
        w.check_path(path)
        return [_decode(p) for p in w.split(await self.request(Op.GET_PERMS, w.fields(path),
                                                               tx))]

    async def set_perms(self, path: str, perms: list[str], tx: int = w.NO_TX) -> None:
        w.check_path(path)
        await self.request(Op.SET_PERMS, w.fields(path, *perms), tx)

    # ------------------------------------------------------------------ watches
    async def watch(self, path: str, token: str | None = None,
                    callback: WatchCallback | None = None) -> Watch:
        """Watch ``path`` and everything under it. xenstored fires the watch once at once
        (so that the watcher looks at the current state), then on every change."""
        w.check_path(path)
        token = token or f"blktap-{next(self._tokens)}"
        if token in self._watches:
            raise XenStoreError(f"watch token {token!r} already in use", errno.EEXIST)
        watch = Watch(self, path, token, callback)
        self._watches[token] = watch  # before the request: the first event may come first
        try:
            await self.request(Op.WATCH, w.fields(path, token))
        except BaseException:
            self._watches.pop(token, None)
            raise
        return watch

    def forget(self, watch: Watch) -> None:
        """Stop delivering a watch's events here without telling xenstored (the watch
        ends there with the connection)."""
        if self._watches.get(watch.token) is watch:
            del self._watches[watch.token]
        watch._end()

    async def unwatch(self, watch: Watch) -> None:
        if self._watches.get(watch.token) is not watch:
            return
        self.forget(watch)
        try:
            await self.request(Op.UNWATCH, w.fields(watch.path, watch.token))
        except XenStoreError as exc:
            if exc.errno not in (errno.ENOENT, errno.EPIPE):
                raise

    # ------------------------------------------------------------------ transactions
    async def transaction_start(self) -> int:
        reply = await self.request(Op.TRANSACTION_START, b"\0")
        try:
            return int(w.split(reply)[0])
        except (IndexError, ValueError):
            raise XenStoreError(f"bad transaction id {reply[:40]!r}", errno.EPROTO) from None

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def transact(self, body: Callable[[Tx], Awaitable[T]],
                       attempts: int = TRANSACTION_ATTEMPTS) -> T:
        """Run ``body`` in a transaction and commit; on EAGAIN (a conflicting writer)
        run it again in a new one. An exception from ``body`` aborts and propagates."""
        for attempt in range(attempts):
            tx = await self.transaction_start()
            try:
                result = await body(Tx(self, tx))
            except XenStoreError as exc:
                await self._abort(tx)
                if exc.errno == errno.EAGAIN:
                    await asyncio.sleep(min(0.001 * attempt, 0.05))
                    continue
                raise
            except BaseException:
                await self._abort(tx)
                raise
            try:
                await self.transaction_end(tx, True)
            except XenStoreError as exc:
                if exc.errno == errno.EAGAIN:
                    await asyncio.sleep(min(0.001 * attempt, 0.05))
                    continue
                raise
            return result
        raise XenStoreError(f"transaction still conflicting after {attempts} attempts",
                            errno.EAGAIN)

    async def _abort(self, tx: int) -> None:
        try:
            await self.transaction_end(tx, False)
        except XenStoreError:
            pass  # already gone (xenstored ends it on a conflict), or the connection is
