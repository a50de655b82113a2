"""Servers of vhost-user-blk for the tests: qemu-storage-daemon (the reference) and ours
(``blktap serve TYPE:PATH --vhost-user SOCK``), started and stopped the same way."""

from __future__ import annotations

import functools
import select
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import need, run, tool
from vhost_user_frontend import SECTOR, BlkClient

MiB = 1 << 20
DISK = 64 * MiB


@dataclass
class Server:
    kind: str
    image: Path             # the file that holds the data (the leaf for a chain)
    sock: Path
    proc: subprocess.Popen
    log: Path
    args: dict = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.kind} did not exit on SIGTERM") from None
        return self.proc.returncode

    def client(self, **kw: object) -> BlkClient:
        kw.setdefault("num_queues", self.args.get("num_queues", 1))
        return BlkClient(self.sock, **kw).connect()  # type: ignore[arg-type]


@functools.cache
def ours_supported() -> bool:
    res = run([tool("blktap"), "serve", "--help"], text=True, timeout=60)
    return "--vhost-user" in res.stdout


def start_server(kind: str, spec: str, workdir: Path, num_queues: int = 1,
                 read_only: bool = False, serial: str | None = None) -> Server:
    """Start qsd or ours on ``spec`` (TYPE:PATH) and wait until it listens."""
    kind_, path = spec.split(":", 1)
    sock = workdir / f"{kind}.sock"
    log = workdir / f"{kind}.log"
    if kind == "qsd":
        if kind_ != "aio":
            pytest.skip("qsd: QEMU's vpc driver does not open VHD differencing chains")
        need("qemu-storage-daemon")
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={path}"
                + (",read-only=on" if read_only else ""),
                "--blockdev", "driver=raw,node-name=d,file=f"
                + (",read-only=on" if read_only else ""),
                "--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                f"addr.path={sock},writable={'off' if read_only else 'on'},"
                f"num-queues={num_queues}"]
    else:
        if not ours_supported():
            pytest.skip("blktap serve has no --vhost-user yet (the back-end branch has not "
                        "landed)")
        argv = [tool("blktap"), "serve", spec, "--vhost-user", str(sock),
                "--num-queues", str(num_queues)]
        if read_only:
            argv.append("--read-only")
        if serial is not None:
            argv += ["--serial", serial]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    server = Server(kind, Path(path), sock, proc, log,
                    {"num_queues": num_queues, "read_only": read_only, "serial": serial})
    deadline = time.monotonic() + 30
    if kind == "ours":
        # the documented handshake: one line "vhost-user:ABSOLUTE_SOCKET_PATH" once listening
        assert proc.stdout is not None
        r, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if r else ""
        if line.strip() != f"vhost-user:{sock.resolve()}":
            server.stop()
            raise AssertionError(f"ours printed {line!r}; stderr: {server.log_text()}")
    while not listening(sock):      # (a socket file may be left by a killed server)
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"{kind} did not listen: {server.log_text()}")
        time.sleep(0.05)
    return server


def listening(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def make_raw(path: Path, size: int = DISK, seed: int = 1) -> bytes:
    """A sparse raw image with a recognisable first MiB; returns that MiB."""
    head = pattern(MiB, seed)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return head


def pattern(n: int, seed: int) -> bytes:
    """Bytes that differ from sector to sector and from seed to seed."""
    out = bytearray()
    for s in range(-(-n // SECTOR)):
        out += struct.pack("<QQ", seed, s) * (SECTOR // 16)
    return bytes(out[:n])
