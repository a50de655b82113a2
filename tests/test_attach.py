"""`blktap attach` on this machine: the generic netlink client against the kernel, the
NBD handshake the kernel's client needs against our server, and, where the kernel has
no nbd module, the clear error (nothing left behind). The kernel NBD data path itself
runs in the Xen testbed's dom0 (test_xen_attach.py)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from blktap.hostdev import genl, handshake
from blktap.hostdev import wire as w
from blktap.transport.nbd import proto as p
from conftest import run, tool
from nbd_helpers import serve


def kernel_has_nbd() -> bool:
    with genl.GenlSocket() as nl:
        return nl.family_id(w.NBD_FAMILY) is not None or os.path.exists("/sys/module/nbd")


def test_genl_resolves_the_controller_itself() -> None:
    with genl.GenlSocket() as nl:
        assert nl.family_id("nlctrl") == w.GENL_ID_CTRL
        assert nl.family_id("nosuchfamily") is None


def test_genl_attributes_round_trip() -> None:
    data = (genl.u32(1, 7) + genl.string(2, "abc")
            + genl.nested(3, genl.nested(1, genl.u32(1, 42))) + genl.u64(4, 1 << 40))
    attrs = list(genl.parse_attrs(data))
    assert [k for k, _ in attrs] == [1, 2, 3, 4]
    assert attrs[1][1] == b"abc\0"
    (item_kind, item), = genl.parse_attrs(attrs[2][1])
    assert item_kind == 1 and dict(genl.parse_attrs(item)) == {1: w.U32.pack(42)}
    with pytest.raises(Exception) as exc:
        list(genl.parse_attrs(w.NLA_HDR.pack(64, 1) + b"\0" * 4))
    assert getattr(exc.value, "errno", None) == errno.EPROTO


@pytest.mark.parametrize("read_only", [False, True])
def test_handshake_for_the_kernel_client(tmp_path: Path, read_only: bool) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(b"\x11" * (3 << 20))
    args = ["--read-only"] if read_only else []
    with serve(f"aio:{image}", tmp_path, *args) as served:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(served.socket))
            size, flags = handshake.negotiate(s)
            assert size == 3 << 20
            assert flags & p.FLAG_HAS_FLAGS and flags & p.FLAG_SEND_FLUSH
            assert bool(flags & p.FLAG_READ_ONLY) == read_only
            # Transmission phase with simple replies, as the kernel speaks it.
            s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 9, 4096, 512))
            got = b""
            while len(got) < p.SIMPLE_REPLY.size + 512:
                got += s.recv(8192)
            magic, error, handle = p.SIMPLE_REPLY.unpack_from(got)
            assert (magic, error, handle) == (p.SIMPLE_REPLY_MAGIC, 0, 9)
            assert got[p.SIMPLE_REPLY.size:] == b"\x11" * 512
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(served.socket))
            with pytest.raises(Exception) as exc:
                handshake.negotiate(s, export="nonesuch")
            assert getattr(exc.value, "errno", None) == errno.ENOENT


def test_attach_without_kernel_nbd_points_at_fuse(tmp_path: Path) -> None:
    if kernel_has_nbd():
        pytest.skip("this kernel has an NBD client (the Xen dom0 test covers attach)")
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"))
    r = run([tool("blktap"), "attach", f"aio:{image}"], env=env, text=True)
    assert r.returncode == errno.ENODEV, r.stderr
    assert f"blktap serve aio:{image} --fuse FILE" in r.stderr
    assert "losetup" in r.stderr and r.stdout == ""
    # Nothing was created: no tapdisk, no minor.
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*"))
    r = run([tool("blktap"), "attached"], env=env, text=True)
    assert r.returncode == 0 and r.stdout == ""


def test_detach_names_what_it_does_not_know(tmp_path: Path) -> None:
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"))
    r = run([tool("blktap"), "detach", "/dev/nbd7"], env=env, text=True)
    assert r.returncode == errno.ENOENT and "not attached" in r.stderr
    r = run([tool("blktap"), "detach", "sda"], env=env, text=True)
    assert r.returncode == errno.EINVAL and "expected /dev/nbdN" in r.stderr
    r = run([tool("blktap"), "attach", "/no/type"], env=env, text=True)
    assert r.returncode == errno.EINVAL and "TYPE:PATH" in r.stderr
