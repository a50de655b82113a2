"""``blktap copy SRC DST``: only the allocated extents move (block status), the
destination then reads as the source (qemu-img compare), and bad input fails clearly."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from conftest import need, run, tool

MiB = 1 << 20


def blktap(*args: str) -> tuple[int, str, str]:
    res = run([tool("blktap"), *args], text=True)
    return res.returncode, res.stdout, res.stderr


def qemu_io(fmt: str, path: Path, *cmds: str) -> None:
    argv = [need("qemu-io"), "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    res = run([*argv, str(path)], text=True)
    assert res.returncode == 0, res.stderr


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_chain_to_sparse_raw(tmp_path: Path) -> None:
    """A VHD chain (parent + child) onto an empty sparse raw file: the bytes read and
    written are the allocated ones, the raw file stays sparse, qemu-img says identical."""
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    assert blktap("create", str(parent), "64M")[0] == 0
    qemu_io("vpc", parent, "write -P 0x11 0 2M", "write -P 0x12 20M 2M")
    assert blktap("snapshot", str(child), str(parent))[0] == 0
    # The child's own data, through our chain (qemu's vpc has no parents).
    from blktap.image.chain import Chain

    with Chain.open(f"vhd:{child}", writable=True) as chain:
        chain.write(40 * MiB // 512, b"\x13" * (2 * MiB))
        chain.write(MiB // 512, b"\x14" * 4096)
    dst = tmp_path / "dst.raw"
    with open(dst, "wb") as f:
        f.truncate(64 * MiB)
    code, out, err = blktap("copy", f"vhd:{child}", f"aio:{dst}", "--json", "--progress")
    assert code == 0, err
    assert "copying [" in err and "100%" in err  # the bar, drawn although not a terminal
    res = json.loads(out)
    # Three VHD blocks of 2 MiB hold data; the rest was never read.
    assert res["copied"] == 6 * MiB and res["extents"] == 3, res
    assert res["skipped"] == 58 * MiB
    assert allocated(dst) <= 6 * MiB + 64 * 1024
    flat = tmp_path / "flat.raw"
    assert blktap("convert", f"vhd:{child}", str(flat))[0] == 0
    cmp = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(flat), str(dst)],
              text=True)
    assert cmp.returncode == 0, cmp.stdout


def test_zero_holes_over_old_content(tmp_path: Path) -> None:
    src, dst = tmp_path / "s.vhd", tmp_path / "d.raw"
    assert blktap("create", str(src), "16M")[0] == 0
    qemu_io("vpc", src, "write -P 0x21 4M 1M")
    dst.write_bytes(b"\xee" * (16 * MiB))
    # Without --zero-holes the old bytes stay where the source has nothing.
    assert blktap("copy", f"vhd:{src}", f"aio:{dst}")[0] == 0
    assert dst.read_bytes()[:MiB] == b"\xee" * MiB
    code, out, err = blktap("copy", f"vhd:{src}", f"aio:{dst}", "--zero-holes")
    assert code == 0, err
    assert "Copied 2 MiB in 1 extents" in out and "14 MiB of zeros zeroed" in out, out
    cmp = run([need("qemu-img"), "compare", "-f", "vpc", "-F", "raw", str(src), str(dst)],
              text=True)
    assert cmp.returncode == 0, cmp.stdout


def test_bad_input(tmp_path: Path) -> None:
    src, small = tmp_path / "s.vhd", tmp_path / "small.raw"
    assert blktap("create", str(src), "16M")[0] == 0
    with open(small, "wb") as f:
        f.truncate(8 * MiB)
    cases = [
        (("copy", f"vhd:{src}", f"aio:{small}"), errno.EINVAL, "smaller than the source"),
        (("copy", f"vhd:{src}", f"aio:{tmp_path}/none.raw"), errno.ENOENT, "none.raw"),
        (("copy", f"vhd:{tmp_path}/none.vhd", f"aio:{small}"), errno.ENOENT, "none.vhd"),
        (("copy", f"vhd:{src}", f"aio:{small}", "--chunk", "1000"), errno.EINVAL, "512"),
        (("copy", f"vhd:{src}", f"aio:{small}", "--check-mirror", "12"), errno.EINVAL,
         "PID:MINOR"),
        (("copy", f"nosuch:{src}", f"aio:{small}"), errno.ENOENT, "nosuch"),
    ]
    for argv, code, text in cases:
        got, out, err = blktap(*argv)
        assert got == code and text in err and err.count("\n") == 1, (argv, got, err)
        assert out == ""
