"""``blktap serve`` as a command: bad input (one line, the errno as exit code, files
unchanged) and clean exits on SIGINT/SIGTERM with the images closed consistently."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.create import create as create_vhd
from conftest import need, run, tool
from nbd_helpers import serve

MiB = 1 << 20


def serve_cmd(*args: str) -> subprocess.CompletedProcess:
    return run([tool("blktap"), "serve", *args], text=True, timeout=60)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["missing", "directory", "not-vhd", "unknown-type",
                                  "not-built", "bad-tcp", "tls-half", "socket-is-file",
                                  "socket-dir-missing", "corrupt-vhd"])
def test_bad_input(tmp_path: Path, case: str) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(b"x" * MiB)
    vhd = tmp_path / "d.vhd"
    create_vhd(str(vhd), 4 * MiB)
    sock = tmp_path / "s.sock"
    args, code, words = {
        "missing": ([str(tmp_path / "nope.vhd")], 2, "No such file"),
        "directory": ([f"aio:{tmp_path}"], 21, "Is a directory"),
        "not-vhd": ([f"vhd:{raw}"], 22, "d.img"),
        "unknown-type": ([f"bogus:{raw}"], 2, "unknown driver type"),
        "not-built": ([f"vmdk:{raw}"], 38, "not implemented"),
        "bad-tcp": ([str(raw), "--tcp", "localhost"], 22, "invalid address"),
        "tls-half": ([str(raw), "--tls-cert", str(raw)], 22, "--tls-key"),
        "socket-is-file": ([str(raw), "--socket", str(raw)], 17, "not a socket"),
        "socket-dir-missing": ([str(raw), "--socket", str(tmp_path / "no" / "s.sock")], 2,
                               "No such file"),
        "corrupt-vhd": ([f"vhd:{vhd}"], 22, "d.vhd"),
    }[case]
    if case == "corrupt-vhd":
        with open(vhd, "r+b") as f:  # break both footers' cookies
            f.seek(0)
            f.write(b"garbage!")
            f.seek(-512, 2)
            f.write(b"garbage!")
            f.seek(512)
            f.write(b"garbage!")
    before = {p: digest(p) for p in (raw, vhd)}
    if case != "socket-is-file":
        args = [*args, "--socket", str(sock)] if "--socket" not in args else args
    res = serve_cmd(*args)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blktap: ") and words in lines[0], lines
    assert {p: digest(p) for p in (raw, vhd)} == before
    assert not sock.exists()


def test_socket_in_use_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(bytes(MiB))
    with serve(f"aio:{raw}", tmp_path) as srv:
        res = serve_cmd(str(raw), "--socket", str(srv.socket))
        assert res.returncode == 98 and "another server" in res.stderr
        assert srv.proc.poll() is None


def test_tcp_port_in_use(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(bytes(MiB))
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        res = serve_cmd(str(raw), "--tcp", f"127.0.0.1:{port}")
        assert res.returncode == 98 and res.stderr.startswith("blktap: ")
    finally:
        holder.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_images_closed(tmp_path: Path, sig: int) -> None:
    qemu_io = need("qemu-io")
    vhd = tmp_path / "d.vhd"
    create_vhd(str(vhd), 16 * MiB)
    with serve(f"vhd:{vhd}", tmp_path) as srv:
        res = run([qemu_io, "-f", "raw", "-c", "write -P 0x42 3M 1M", srv.uri], text=True)
        assert res.returncode == 0, res.stderr
        assert srv.stop(sig) == 0
        assert srv.stderr == ""
    assert not (tmp_path / "nbd.sock").exists()
    assert vhd_check.check(str(vhd)).errno == 0
    res = run([tool("vhd-util"), "check", "-n", str(vhd)], text=True)
    assert res.returncode == 0 and "is valid" in res.stdout
    res = run([tool("vhd-util"), "query", "-n", str(vhd), "-s"], text=True)
    assert int(res.stdout) == vhd.stat().st_size  # the footer is where it belongs


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(bytes(MiB))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "nbd.sock"))
    stale.close()  # a socket file nobody listens on, as a killed server leaves
    with serve(f"aio:{raw}", tmp_path) as srv:
        assert srv.uri.endswith("nbd.sock")
