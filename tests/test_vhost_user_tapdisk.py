"""The tapdisk daemon's vhost-user export (BLKTAP_VHOST_USER=1): tap-ctl create, live
snapshot with pause/unpause while the test front-end's requests wait, stats, destroy."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run, tool
from test_tap_ctl_daemon import Host, wait_gone
from vhost_front import F_WRITE, S_IOERR, S_OK, T_IN, T_OUT, Front, Guest, Ring, request


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    h.env["BLKTAP_VHOST_USER"] = "1"
    yield h
    for entry in h.listing():
        if entry.get("pid"):
            h.tap_ctl("destroy", "-p", entry["pid"], "-m", entry["minor"], ok=False)


def test_live_snapshot_of_a_kvm_guests_disk(host: Host, tmp_path: Path) -> None:
    base = tmp_path / "disk.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(base), "-s", "64"]).returncode == 0
    pid, minor = host.create(f"vhd:{base}")
    sock = host.run_dir / f"vhost{pid}.{minor}"
    assert sock.is_socket()
    g = Guest()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    f = Front(s)
    f.negotiate()
    f.mem_table(g)
    ring = Ring(g, 0)
    f.ring(ring)

    def io(kind: int, sector: int, buf: int, n: int, wait: bool = True) -> int:
        chain, status = request(g, kind, sector, [(buf, n, F_WRITE if kind == T_IN else 0)])
        ring.publish(ring.chain(chain))
        if wait:
            ring.wait_used(1)
            assert g.mem[status] == S_OK
        return status

    a = g.alloc(65536)
    g.write(a, b"A" * 65536)
    io(T_OUT, 0, a, 65536)
    host.tap_ctl("pause", "-p", str(pid), "-m", str(minor))
    # a request made while paused waits (it does not fail)
    b = g.alloc(65536)
    g.write(b, b"B" * 65536)
    status = io(T_OUT, 128, b, 65536, wait=False)
    time.sleep(0.3)
    assert ring.used_idx == 1
    snap = tmp_path / "snap.vhd"
    assert run([tool("vhd-util"), "snapshot", "-n", str(snap), "-p", str(base)]).returncode == 0
    host.tap_ctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"vhd:{snap}")
    ring.wait_used(1)
    assert g.mem[status] == S_OK
    out = g.alloc(131072)
    io(T_IN, 0, out, 131072)
    assert g.read(out, 131072) == b"A" * 65536 + b"B" * 65536
    stats = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["secs"] == [256, 256]
    assert stats["images"][0]["name"].endswith("snap.vhd")
    host.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
    assert f.closed_by_peer()
    wait_gone(pid)
    assert not sock.exists()
    # the write after the snapshot went to the snapshot, the one before to its parent
    flat = tmp_path / "flat.raw"
    assert run([tool("blktap"), "convert", "-O", "raw", str(base), str(flat)]).returncode == 0
    assert flat.read_bytes()[:131072] == b"A" * 65536 + bytes(65536)
    s.close()
    ring.close()
    g.close()


def test_destroy_while_paused_fails_the_held_request(host: Host, tmp_path: Path) -> None:
    """A request held by a pause can never complete: destroy fails it (IOERR) instead of
    waiting for it forever, and the tapdisk exits."""
    base = tmp_path / "d.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(base), "-s", "16"]).returncode == 0
    pid, minor = host.create(f"vhd:{base}")
    g = Guest()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(host.run_dir / f"vhost{pid}.{minor}"))
    f = Front(s)
    f.negotiate()
    f.mem_table(g)
    ring = Ring(g, 0)
    f.ring(ring)
    host.tap_ctl("pause", "-p", str(pid), "-m", str(minor))
    out = g.alloc(4096)
    chain, status = request(g, T_IN, 0, [(out, 4096, F_WRITE)])
    ring.publish(ring.chain(chain))
    time.sleep(0.3)
    assert ring.used_idx == 0
    host.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
    assert ring.wait_used(1)[0][1] == 1 and g.mem[status] == S_IOERR
    assert f.closed_by_peer()
    wait_gone(pid)
    s.close()
    ring.close()
    g.close()
