"""Hole replies: a structured READ over ranges the image's metadata says read as zeros is
answered with NBD_REPLY_TYPE_OFFSET_HOLE chunks for those and data chunks for the rest
(qcow2 unallocated and zero clusters, VHD blocks and sectors not held, sparse raw files on
tmpfs). Seen by libnbd's pread_structured callbacks; the content checked with qemu-img
compare, qemu-img convert and nbdcopy through the server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blktap.image.chain import Chain
from blktap.image.vhd.create import create as create_vhd
from conftest import need, run
from nbd_helpers import serve
from qcow2_helpers import qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
DATA, HOLE = 1, 2  # libnbd's LIBNBD_READ_DATA, LIBNBD_READ_HOLE

CHUNKS = r"""
import json, sys, nbd
uri, reads, structured = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
out = []
for offset, length, df in reads:
    seen = []
    def cb(buf, off, status, err):
        seen.append((off, len(buf), status, len(buf) - bytes(buf).count(0)))
        return 0
    data = h.pread_structured(length, offset, cb, flags=nbd.CMD_FLAG_DF if df else 0)
    out.append({"chunks": sorted(seen), "nonzero": len(data) - data.count(0),
                "sum": sum(data)})
h.shutdown()
print(json.dumps(out))
"""


def chunks(uri: str, reads: list[tuple[int, int, bool]], *, structured: bool = True
           ) -> list[dict]:
    res = run(["/usr/bin/python3", "-c", CHUNKS, uri, json.dumps(reads),
               "1" if structured else "0"], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def kinds(reply: dict) -> list[tuple[int, int, int]]:
    return [(off, n, status) for off, n, status, _ in reply["chunks"]]


def test_qcow2_holes_zero_clusters_and_data(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 7 1M 64k", "write -z 2M 64k", "write -P 9 3M 4k")
    with serve(f"qcow2:{img}", tmp_path, "--read-only") as srv:
        # The first read loads what it needs of the metadata; after it, it is cached.
        chunks(srv.uri, [(0, 16 * MiB, False)])
        got = chunks(srv.uri, [
            (0, 64 * KiB, False),  # unallocated: one hole chunk, nothing read
            (MiB, 64 * KiB, False),  # data
            (MiB - 8 * KiB, 80 * KiB, False),  # hole, data, hole
            (2 * MiB, 64 * KiB, False),  # a zero cluster
            (0, 4 * MiB, False),
            (MiB - 8 * KiB, 80 * KiB, True),  # don't fragment: one data chunk
        ])
        assert kinds(got[0]) == [(0, 64 * KiB, HOLE)]
        assert kinds(got[1]) == [(MiB, 64 * KiB, DATA)]
        assert got[1]["sum"] == 7 * 64 * KiB
        assert kinds(got[2]) == [(MiB - 8 * KiB, 8 * KiB, HOLE), (MiB, 64 * KiB, DATA),
                                 (MiB + 64 * KiB, 8 * KiB, HOLE)]
        assert got[2]["sum"] == 7 * 64 * KiB
        assert kinds(got[3]) == [(2 * MiB, 64 * KiB, HOLE)]
        # A data cluster is sent whole (64 KiB), even where qemu wrote 4 KiB of it.
        assert kinds(got[4]) == [(0, MiB, HOLE), (MiB, 64 * KiB, DATA),
                                 (MiB + 64 * KiB, 2 * MiB - 64 * KiB, HOLE),
                                 (3 * MiB, 64 * KiB, DATA),
                                 (3 * MiB + 64 * KiB, MiB - 64 * KiB, HOLE)]
        assert got[4]["sum"] == 7 * 64 * KiB + 9 * 4 * KiB
        assert kinds(got[5]) == [(MiB - 8 * KiB, 80 * KiB, DATA)]
        assert got[5]["sum"] == 7 * 64 * KiB
        # A client without structured replies gets the zeros as they are.
        plain = chunks(srv.uri, [(MiB - 8 * KiB, 80 * KiB, False)], structured=False)
        assert kinds(plain[0]) == [(MiB - 8 * KiB, 80 * KiB, DATA)]
        assert plain[0]["sum"] == 7 * 64 * KiB
        # Real clients reading through the server see the image as qemu does.
        res = run(["qemu-img", "compare", "-f", "qcow2", str(img), srv.uri], text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        out = tmp_path / "copy.qcow2"
        qemu_img("convert", "-O", "qcow2", srv.uri, out)
        res = run(["qemu-img", "compare", str(img), str(out)], text=True)
        assert res.returncode == 0, res.stdout
        raw = tmp_path / "copy.raw"
        res = run([need("nbdcopy"), srv.uri, str(raw)], text=True)
        assert res.returncode == 0, res.stderr
        res = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(raw)],
                  text=True)
        assert res.returncode == 0, res.stdout


def test_vhd_small_holes_go_as_data(tmp_path: Path) -> None:
    """A VHD holds sectors: holes under 4 KiB inside a read are sent as data; a block not
    allocated is a hole; a read of many small runs is one data chunk."""
    img = tmp_path / "d.vhd"
    create_vhd(str(img), 16 * MiB)
    # Our writes set the bitmap bit of each sector written (qemu's mark whole blocks).
    with Chain.open(f"vhd:{img}", writable=True) as chain:
        chain.pwrite(0, b"\1" * 512)
        chain.pwrite(2560, b"\2" * 512)
        chain.pwrite(2 * MiB, b"\3" * (64 * KiB))
        for i in range(20):
            chain.pwrite(4 * MiB + i * 16 * KiB, b"\4" * (4 * KiB))
    with serve(f"vhd:{img}", tmp_path, "--read-only") as srv:
        chunks(srv.uri, [(0, 16 * MiB, False)])
        got = chunks(srv.uri, [(0, 8 * KiB, False), (2 * MiB, 128 * KiB, False),
                               (6 * MiB, 64 * KiB, False), (4 * MiB, 320 * KiB, False)])
        # [0, 512) data, 2 KiB hole, [2560, 3072) data, then 5 KiB of hole.
        assert kinds(got[0]) == [(0, 3 * KiB, DATA), (3 * KiB, 5 * KiB, HOLE)]
        assert got[0]["sum"] == 1 * 512 + 2 * 512
        assert kinds(got[1]) == [(2 * MiB, 64 * KiB, DATA), (2 * MiB + 64 * KiB, 64 * KiB,
                                                              HOLE)]
        assert kinds(got[2]) == [(6 * MiB, 64 * KiB, HOLE)]  # a block never allocated
        # 20 data runs and 20 holes: more runs than a reply is split into.
        assert kinds(got[3]) == [(4 * MiB, 320 * KiB, DATA)]
        assert got[3]["sum"] == 4 * 4 * KiB * 20
        res = run(["qemu-img", "compare", "-f", "vpc", str(img), srv.uri], text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_raw_on_tmpfs_and_fully_allocated(tmp_path: Path) -> None:
    """A sparse raw file on tmpfs: SEEK_DATA answers at once; a fully allocated one is
    data without asking; a hole punched by the client's trim is a hole after."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    folder = shm / f"blktap-holes-{os.getpid()}"
    folder.mkdir()
    try:
        sparse, full = folder / "sparse.img", folder / "full.img"
        with open(sparse, "wb") as f:
            f.truncate(8 * MiB)
            f.seek(MiB)
            f.write(b"\x05" * (128 * KiB))
        full.write_bytes(b"\x01" * (4 * MiB))
        with serve(f"aio:{sparse}", tmp_path, name="s.sock") as srv:
            got = chunks(srv.uri, [(MiB - 64 * KiB, 256 * KiB, False), (0, 64 * KiB, False)])
            assert kinds(got[0]) == [(MiB - 64 * KiB, 64 * KiB, HOLE), (MiB, 128 * KiB, DATA),
                                     (MiB + 128 * KiB, 64 * KiB, HOLE)]
            assert kinds(got[1]) == [(0, 64 * KiB, HOLE)]
            res = run(["qemu-img", "compare", "-f", "raw", str(sparse), srv.uri], text=True)
            assert res.returncode == 0, res.stdout + res.stderr
        with serve(f"aio:{full}", tmp_path, name="f.sock") as srv:
            got = chunks(srv.uri, [(0, 64 * KiB, False)])
            assert kinds(got[0]) == [(0, 64 * KiB, DATA)]
            res = run(["/usr/bin/python3", "-c",
                       "import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                       "h.trim(1 << 20, 1 << 20)\nh.flush()\nh.shutdown()", srv.uri],
                      text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            got = chunks(srv.uri, [(MiB, MiB, False), (0, 64 * KiB, False)])
            assert kinds(got[0]) == [(MiB, MiB, HOLE)]
            assert kinds(got[1]) == [(0, 64 * KiB, DATA)]
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
