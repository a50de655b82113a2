"""The ``tapdisk`` daemon entry: control socket path first on stdout, an NBD export per
VBD, an answer (EOPNOTSUPP for now) to control messages, exit once the last VBD closes."""

from __future__ import annotations

import asyncio
import errno
import select
import signal
import socket
import struct
import subprocess
from pathlib import Path

from blktap.tapdisk.daemon import MESSAGE_SIZE, Tapdisk
from conftest import need, run, tool

MiB = 1 << 20


def readline(proc: subprocess.Popen, timeout: float = 20) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "tapdisk printed nothing"
    return proc.stdout.readline().strip()  # type: ignore[union-attr]


def test_tapdisk_process(tmp_path: Path) -> None:
    nbdinfo = need("nbdinfo")
    img = tmp_path / "d.img"
    img.write_bytes(b"z" * MiB)
    rundir = tmp_path / "run"
    proc = subprocess.Popen([tool("tapdisk"), "-D", "--run-dir", str(rundir), "--open",
                             f"aio:{img}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        ctl = readline(proc)
        assert ctl == str(rundir / f"ctl{proc.pid}")
        minor, nbd = readline(proc).split()
        assert minor == "0" and nbd == str(rundir / f"nbd{proc.pid}.0")
        res = run([nbdinfo, "--size", f"nbd+unix:///?socket={nbd}"], text=True)
        assert res.returncode == 0 and int(res.stdout) == MiB
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(ctl)
        s.sendall(struct.pack("=HH", 19, 0).ljust(MESSAGE_SIZE, b"\0"))  # LIST
        reply = b""
        while len(reply) < MESSAGE_SIZE:
            chunk = s.recv(MESSAGE_SIZE)
            assert chunk
            reply += chunk
        s.close()
        kind, _, err = struct.unpack_from("=HH4xi", reply)
        assert (kind, err) == (1, errno.EOPNOTSUPP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not Path(ctl).exists() and not Path(nbd).exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exits_when_last_vbd_closes(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))

    async def body() -> None:
        td = Tapdisk(str(tmp_path / "run"), threads=2)
        td.start_control()
        await td.open_vbd(0, f"aio:{img}")
        await td.open_vbd(1, f"aio:{img}", read_only=True)
        await td.close_vbd(0)
        assert not td.done.is_set()
        await td.close_vbd(1)
        assert td.done.is_set()
        await asyncio.wait_for(td.run(), 5)
        await td.shutdown()

    asyncio.run(body())
    assert list((tmp_path / "run").iterdir()) == []
