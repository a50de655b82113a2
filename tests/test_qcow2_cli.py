"""The blktap command with qcow2 images: create, info, map, convert in every direction,
check with qemu-img check's exit codes and repair."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from blktap.image.chain import Chain
from blktap.image.qcow2.image import Qcow2Image
from conftest import run, tool
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io, qemu_raw


def blktap(*args: object) -> tuple[int, str, str]:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_create_with_options(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    code, out, err = blktap("create", img, "10M", "-o",
                            "cluster_size=4k,compat=1.1,lazy_refcounts=on,extended_l2=off")
    assert code == 0, err
    info = json.loads(qemu_img("info", "--output=json", img))
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert qemu_check(img)[0] == 0
    code, _, err = blktap("create", tmp_path / "x.qcow2", "1M", "-o", "bogus=1")
    assert code != 0 and "bogus" in err
    code, _, err = blktap("create", tmp_path / "x.vhd", "1M", "-o", "compat=1.1")
    assert code != 0 and "qcow2" in err


def test_create_with_backing_and_info(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\1" * MiB)
    top = tmp_path / "top.qcow2"
    code, _, err = blktap("create", top, "1M", "-o", "backing_file=base.raw,backing_fmt=raw")
    assert code == 0, err
    code, out, _ = blktap("info", "--json", f"qcow2:{top}")
    info = json.loads(out)
    assert info["format"] == "qcow2" and info["chain_depth"] == 2
    assert info["chain"][0]["backing_file"] == "base.raw"
    assert info["chain"][1]["format"] == "raw"
    assert qemu_raw(top, tmp_path) == b"\1" * MiB


def test_map_reports_data_zero_hole(tmp_path: Path) -> None:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 64k", "write -z 1M 128k")
    code, out, err = blktap("map", "--json", img)
    assert code == 0, err
    rows = [(r["offset"], r["length"], r["status"]) for r in json.loads(out)]
    assert rows == [(0, 65536, "data"), (65536, MiB - 65536, "hole"),
                    (MiB, 131072, "zero"), (MiB + 131072, 3 * MiB - 131072, "hole")]


def test_convert_every_direction(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "3M")
    qemu_io(src, "write -P 7 100k 300k", "write -P 8 2M 4k")
    expect = qemu_raw(src, tmp_path)
    for fmt, name in (("raw", "o.raw"), ("vhd", "o.vhd"), ("qcow2", "o.qcow2")):
        code, _, err = blktap("convert", "-O", fmt, src, tmp_path / name)
        assert code == 0, err
        with Chain.open(str(tmp_path / name)) as chain:
            assert chain.read(0, 3 * MiB // 512)[: len(expect)] == expect
    code, _, err = blktap("convert", tmp_path / "o.vhd", tmp_path / "back.qcow2",
                          "-o", "cluster_size=512,compat=0.10")
    assert code == 0, err
    assert qemu_check(tmp_path / "back.qcow2")[0] == 0
    qemu_img("compare", "-q", tmp_path / "back.qcow2", src)


def test_check_exit_codes_and_repair(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 1M")
    code, out, _ = blktap("check", img)
    assert code == 0 and "No errors were found" in out
    # A leak: the header cluster counted twice.
    with Qcow2Image.open(str(img)) as q:
        rt = q.header.refcount_table_offset
    block = struct.unpack(">Q", img.read_bytes()[rt : rt + 8])[0]
    with img.open("r+b") as f:
        f.seek(block)
        f.write(struct.pack(">H", 2))
    assert qemu_check(img)[0] == 3
    code, out, _ = blktap("check", img)
    assert code == 3 and "Leaked cluster 0 refcount=2 reference=1" in out
    code, out, _ = blktap("check", "-r", "leaks", img)
    assert code == 0, out
    assert qemu_check(img)[0] == 0
    # A corruption: the L2 table's count dropped.
    with img.open("r+b") as f:
        f.seek(block + 2 * 4)
        f.write(struct.pack(">H", 0))
    code, out, _ = blktap("check", "--json", img)
    assert code == 2 and json.loads(out)["corruptions"] >= 1
    assert qemu_check(img)[0] == 2
    code, out, _ = blktap("check", "-r", "all", img)
    assert code == 0, out
    assert qemu_check(img)[0] == 0
    code, _, err = blktap("check", tmp_path / "missing.qcow2")
    assert code == 1 and err.count("\n") == 1
