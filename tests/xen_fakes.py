"""Test doubles for the Xen control path: a small xenstored and a tapdisk control socket.

``FakeXenstored`` speaks the XenStore wire protocol over a UNIX socket, written here from
xen's docs/misc/xenstore.txt with its own struct layout (not blktap.tapback.xs_wire): a
16-byte header of four little-endian u32 (type, req_id, tx_id, len) and NUL-separated
fields. It keeps one tree, fires watches as xenstored does (a change fires the watches on
the node and its ancestors; a removal also fires those below it, with their own path; a
new watch fires once at once), and runs transactions on a copy of the tree that commits
only if nothing was committed since it began (else EAGAIN). Tests drive the "toolstack"
and the "frontend" through its direct methods (write, rm, read), which fire watches too.

``FakeTapdisk`` answers DISK_INFO, XENBLKIF_CONNECT and XENBLKIF_DISCONNECT on
``<dir>/ctl<pid>`` and records what it was sent.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading

from blktap.control import message as cm

# ------------------------------------------------------------------ XenStore wire (ours)
HDR = struct.Struct("<4I")
(XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH, XS_TRANSACTION_START,
 XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE, XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM,
 XS_SET_PERMS, XS_WATCH_EVENT, XS_ERROR) = range(17)
HOME = "/local/domain/0"


class XsFail(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _norm(path: str) -> str:
    if not path.startswith("/") and not path.startswith("@"):
        path = f"{HOME}/{path}"
    if path != "/" and path.endswith("/"):
        raise XsFail("EINVAL")
    return path


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _is_under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


class _Conn:
    def __init__(self, server: FakeXenstored, writer: asyncio.StreamWriter) -> None:
        self.server, self.writer = server, writer
        self.watches: list[tuple[str, str]] = []  # (path as given, token)

    def send(self, op: int, req_id: int, tx: int, payload: bytes) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(HDR.pack(op, req_id, tx, len(payload)) + payload)


class FakeXenstored:
    def __init__(self, path: str) -> None:
        self.path = path
        self.tree: dict[str, bytes] = {"/": b"", "/local": b"", "/local/domain": b"",
                                       HOME: b""}
        self.perms: dict[str, list[str]] = {}
        self.generation = 0
        self.tx: dict[int, tuple[int, dict[str, bytes]]] = {}
        self.next_tx = 1
        self.conns: list[_Conn] = []
        self.fail_next: dict[int, list[str]] = {}  # op -> errors to answer, in order
        self.requests: list[tuple[int, str]] = []  # (op, first field) seen
        self._pendings: dict[int, list[tuple[str, bool]]] = {}  # tx -> changes to fire
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> FakeXenstored:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in self.conns:
                c.writer.close()
            await self.server.wait_closed()

    def drop_connections(self) -> None:
        for c in self.conns:
            c.writer.close()

    # ------------------------------------------------------------- the tree (direct use)
    def read(self, path: str) -> str | None:
        v = self.tree.get(_norm(path))
        return None if v is None else v.decode()

    def write(self, path: str, value: str | bytes) -> None:
        path = _norm(path)
        self._write(self.tree, path, value.encode() if isinstance(value, str) else value)
        self.generation += 1
        self._fire(path, False)

    def rm(self, path: str) -> None:
        path = _norm(path)
        if path in self.tree:
            self._rm(self.tree, path)
            self.generation += 1
            self._fire(path, True)

    def ls(self, path: str) -> list[str]:
        return self._children(self.tree, _norm(path))

    def dump(self, top: str) -> dict[str, str]:
        top = _norm(top)
        return {p: v.decode() for p, v in sorted(self.tree.items()) if _is_under(p, top)}

    @staticmethod
    def _write(tree: dict[str, bytes], path: str, value: bytes) -> None:
        p = _parent(path)
        missing = []
        while p not in tree:
            missing.append(p)
            p = _parent(p)
        for q in missing:
            tree[q] = b""
        tree[path] = value

    @staticmethod
    def _rm(tree: dict[str, bytes], path: str) -> None:
        for p in [p for p in tree if _is_under(p, path)]:
            del tree[p]

    @staticmethod
    def _children(tree: dict[str, bytes], path: str) -> list[str]:
        if path not in tree:
            raise XsFail("ENOENT")
        prefix = "/" if path == "/" else path + "/"
        return sorted({p[len(prefix):] for p in tree
                       if p.startswith(prefix) and "/" not in p[len(prefix):] and p != path})

    def _fire(self, path: str, removed: bool) -> None:
        for conn in self.conns:
            for wpath, token in conn.watches:
                full = _norm(wpath)
                if _is_under(path, full):
                    conn.send(XS_WATCH_EVENT, 0, 0, self._event(conn, path, wpath, token))
                elif removed and _is_under(full, path):
                    conn.send(XS_WATCH_EVENT, 0, 0, self._event(conn, full, wpath, token))

    @staticmethod
    def _event(conn: _Conn, path: str, wpath: str, token: str) -> bytes:
        if not wpath.startswith("/") and path.startswith(HOME + "/"):
            path = path[len(HOME) + 1:]
        return path.encode() + b"\0" + token.encode() + b"\0"

    # ------------------------------------------------------------- the protocol
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, writer)
        self.conns.append(conn)
        try:
            while True:
                head = await reader.readexactly(HDR.size)
                op, req_id, tx, length = HDR.unpack(head)
                if length > 4096:
                    return
                body = await reader.readexactly(length)
                self._handle(conn, op, req_id, tx, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test ended
        finally:
            self.conns.remove(conn)
            writer.close()

    def _handle(self, conn: _Conn, op: int, req_id: int, tx: int, body: bytes) -> None:
        fields = body.split(b"\0")
        self.requests.append((op, fields[0].decode(errors="replace")))
        try:
            queued = self.fail_next.get(op)
            if queued:
                raise XsFail(queued.pop(0))
            if op == XS_WATCH:
                if len(fields) < 2 or not fields[1]:
                    raise XsFail("EINVAL")
                wpath, token = fields[0].decode(), fields[1].decode()
                conn.watches.append((wpath, token))
                conn.send(XS_WATCH, req_id, 0, b"OK\0")
                # xenstored fires a new watch once, at once
                conn.send(XS_WATCH_EVENT, 0, 0, fields[0] + b"\0" + fields[1] + b"\0")
                return
            reply = self._do(conn, op, tx, body, fields)
        except XsFail as exc:
            conn.send(XS_ERROR, req_id, tx, exc.name.encode() + b"\0")
            return
        conn.send(op, req_id, tx, reply)

    def _tree_of(self, tx: int) -> dict[str, bytes]:
        if tx == 0:
            return self.tree
        if tx not in self.tx:
            raise XsFail("ENOENT")
        return self.tx[tx][1]

    def _do(self, conn: _Conn, op: int, tx: int, body: bytes, fields: list[bytes]) -> bytes:
        ok = b"OK\0"
        if op == XS_READ:
            tree = self._tree_of(tx)
            path = _norm(fields[0].decode())
            if path not in tree:
                raise XsFail("ENOENT")
            return tree[path]
        if op == XS_DIRECTORY:
            names = self._children(self._tree_of(tx), _norm(fields[0].decode()))
            return b"".join(n.encode() + b"\0" for n in names)
        if op in (XS_WRITE, XS_MKDIR):
            path_raw, _, value = body.partition(b"\0")
            path = _norm(path_raw.decode())
            if "//" in path:
                raise XsFail("EINVAL")
            tree = self._tree_of(tx)
            if op == XS_MKDIR and path in tree:
                return ok
            self._write(tree, path, value if op == XS_WRITE else b"")
            if tx == 0:
                self.generation += 1
                self._fire(path, False)
            else:
                self._pending(tx).append((path, False))
            return ok
        if op == XS_RM:
            path = _norm(fields[0].decode())
            tree = self._tree_of(tx)
            if path not in tree:
                raise XsFail("ENOENT")
            self._rm(tree, path)
            if tx == 0:
                self.generation += 1
                self._fire(path, True)
            else:
                self._pending(tx).append((path, True))
            return ok
        if op == XS_GET_PERMS:
            path = _norm(fields[0].decode())
            if path not in self._tree_of(tx):
                raise XsFail("ENOENT")
            return b"".join(p.encode() + b"\0" for p in self.perms.get(path, ["n0"]))
        if op == XS_SET_PERMS:
            path = _norm(fields[0].decode())
            if path not in self._tree_of(tx):
                raise XsFail("ENOENT")
            self.perms[path] = [f.decode() for f in fields[1:] if f]
            return ok
        if op == XS_UNWATCH:
            wpath, token = fields[0].decode(), fields[1].decode()
            if (wpath, token) not in conn.watches:
                raise XsFail("ENOENT")
            conn.watches.remove((wpath, token))
            return ok
        if op == XS_TRANSACTION_START:
            tid = self.next_tx
            self.next_tx += 1
            self.tx[tid] = (self.generation, dict(self.tree))
            self._pendings[tid] = []
            return f"{tid}\0".encode()
        if op == XS_TRANSACTION_END:
            if tx not in self.tx:
                raise XsFail("ENOENT")
            gen, tree = self.tx.pop(tx)
            pend = self._pendings.pop(tx, [])
            if fields[0] == b"T":
                if gen != self.generation:
                    raise XsFail("EAGAIN")
                if pend:
                    self.tree = tree
                    self.generation += 1
                    for path, removed in pend:
                        self._fire(path, removed)
            return ok
        raise XsFail("ENOSYS")

    def _pending(self, tx: int) -> list[tuple[str, bool]]:
        return self._pendings.setdefault(tx, [])


# ------------------------------------------------------------------ tapdisk control socket
class FakeTapdisk:
    """A tapdisk control socket serving minors with a given size; records the rings."""

    def __init__(self, rundir: str, pid: int, disks: dict[int, int]) -> None:
        self.rundir, self.pid, self.disks = rundir, pid, disks  # minor -> sectors
        self.path = os.path.join(rundir, f"ctl{pid}")
        self.rings: dict[tuple[int, int], cm.Blkif] = {}
        self.log: list[tuple[str, int, int]] = []  # (op, domid, devid)
        self.connect_error: int | None = None  # errno to answer CONNECT with
        # What DISK_INFO_RSP says of ring orders: None as the reference tapdisk (nothing),
        # 4 as ours (the extension tag).
        self.max_ring_order: int | None = None
        self.features = 0  # with max_ring_order: cm.FEATURE_* its ring implements
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def nbd_path(self, minor: int) -> str:
        return os.path.join(self.rundir, f"nbd{self.pid}.{minor}")

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    req = cm.read_message(conn)
                    conn.sendall(cm.encode(self._answer(req)))
                except Exception:  # a broken test client: drop it
                    pass

    def _error(self, code: int, cookie: int) -> cm.Message:
        return cm.Message(cm.MessageType.ERROR, cookie, cm.Response(code, ""))

    def _answer(self, req: cm.Message) -> cm.Message:
        T = cm.MessageType
        if req.type is T.DISK_INFO:
            if req.cookie not in self.disks:
                return self._error(errno.ENODEV, req.cookie)
            return cm.Message(T.DISK_INFO_RSP, req.cookie,
                              cm.Image(self.disks[req.cookie], 512, 0, self.max_ring_order,
                                       self.features))
        if req.type is T.XENBLKIF_CONNECT:
            b = req.payload
            assert isinstance(b, cm.Blkif)
            self.log.append(("connect", b.domid, b.devid))
            if self.connect_error:
                return self._error(self.connect_error, req.cookie)
            if (b.domid, b.devid) in self.rings:
                return self._error(errno.EALREADY, req.cookie)
            self.rings[(b.domid, b.devid)] = b
            return cm.Message(T.XENBLKIF_CONNECT_RSP, req.cookie)
        if req.type is T.XENBLKIF_DISCONNECT:
            b = req.payload
            assert isinstance(b, cm.Blkif)
            self.log.append(("disconnect", b.domid, b.devid))
            if self.rings.pop((b.domid, b.devid), None) is None:
                return self._error(errno.ENOENT, req.cookie)
            return cm.Message(T.XENBLKIF_DISCONNECT_RSP, req.cookie)
        return self._error(errno.EINVAL, req.cookie)
