"""Helpers for the NBD tests: run ``blktap serve`` as a real process, and a minimal raw
NBD client for the protocol corners that real clients never exercise."""

from __future__ import annotations

import asyncio
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import tool

START_TIMEOUT = 20.0


class Served:
    def __init__(self, spec: str, sock: Path, args: list[str],
                 fd_limit: int | None = None) -> None:
        self.socket = sock

        def limit() -> None:
            assert fd_limit is not None
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        self.proc = subprocess.Popen(
            [tool("blktap"), "serve", spec, "--socket", str(sock), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=limit if fd_limit is not None else None)
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                break
            if self.proc.poll() is not None:
                break
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"blktap serve did not start: {err}")
        self.uri = line.strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@contextmanager
def serve(spec: str | Path, workdir: Path, *args: str, name: str = "nbd.sock",
          fd_limit: int | None = None) -> Iterator[Served]:
    """``blktap serve`` (with ``fd_limit``: allowed that many open files)."""
    server = Served(str(spec), workdir / name, list(args), fd_limit)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


# ------------------------------------------------------------------------- raw client
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF


class Wire:
    """A blocking NBD client speaking just enough of the protocol to break its rules."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.structured = False
        self.size = 0
        self.flags = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return out

    def greet(self, cflags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", cflags))
        return hflags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
        assert magic == 0x3E889045565A9
        return opt, kind, self.recv(length)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, kind, data = self.option_reply()
            out.append((kind, data))
            if kind != 2 and kind != 3 and kind != 4:  # not SERVER/INFO/META_CONTEXT
                return out

    def go(self, name: str = "", structured: bool = True, meta: bool = True) -> None:
        """A full negotiation ending in NBD_OPT_GO."""
        self.greet()
        if structured:
            self.option(8)
            assert self.option_reply()[1] == 1
            self.structured = True
            if meta:
                q = b"base:allocation"
                n = name.encode()
                self.option(10, struct.pack(">I", len(n)) + n + struct.pack(">II", 1, len(q))
                            + q)
                assert self.replies_until_final()[-1][0] == 1
        n = name.encode()
        self.option(7, struct.pack(">I", len(n)) + n + struct.pack(">HH", 1, 3))
        for kind, data in self.replies_until_final():
            if kind == 3 and struct.unpack(">H", data[:2])[0] == 0:
                _, self.size, self.flags = struct.unpack(">HQH", data)
            elif kind != 3:
                assert kind == 1, f"GO failed: reply {kind:#x} {data!r}"

    def request(self, cmd: int, offset: int = 0, length: int = 0, handle: int = 1,
                flags: int = 0, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset,
                                      length) + data)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(handle, error, data) of one complete reply (simple, or structured chunks)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE:
            error, handle = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_length) if (read_length and not error) else b""
            return handle, error, data
        assert magic == STRUCTURED, hex(magic)
        data, error = b"", 0
        while True:
            flags, kind, handle, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            if kind == 1:
                data += payload[8:]
            elif kind == 2:  # a hole: zeros, filled in here
                data += bytes(struct.unpack(">QI", payload)[1])
            elif kind == 5:
                data += payload
            elif kind & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                return handle, error, data
            (magic,) = struct.unpack(">I", self.recv(4))
            assert magic == STRUCTURED

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def read_until_end(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything a non-blocking socket receives on the running loop until its peer
    ends the stream (or resets it)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
    return bytes(got)
