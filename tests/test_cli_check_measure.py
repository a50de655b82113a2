"""``blktap check`` and ``blktap measure`` against qemu-img on the same images: the same
verdicts, exit codes and figures (qcow2, raw); for VHD, which qemu-img cannot check or
measure, the verdicts of the vhd-util checker and the sizes ``blktap convert`` writes."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.image import Qcow2Image
from conftest import need, run, tool
from qcow2_helpers import qemu_img, qemu_io

MiB = 1 << 20


def blktap(*args: str | Path) -> tuple[int, str, str]:
    res = run([tool("blktap"), *map(str, args)], text=True)
    return res.returncode, res.stdout, res.stderr


def qemu(*args: str | Path) -> tuple[int, str, str]:
    res = run([need("qemu-img"), *map(str, args)], text=True)
    return res.returncode, res.stdout, res.stderr


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


# ------------------------------------------------------------------------------ qcow2
def refblock(img: Path) -> int:
    with Qcow2Image.open(str(img)) as q:
        rt = q.header.refcount_table_offset
    return struct.unpack(">Q", img.read_bytes()[rt : rt + 8])[0]


def make_qcow2(path: Path) -> Path:
    qemu_img("create", "-f", "qcow2", path, "64M")
    qemu_io(path, "write -P 1 0 3M", "write -P 2 40M 100k")
    return path


def leak(img: Path) -> None:
    """A count on a cluster past the end of the data: a leak only."""
    size = img.stat().st_size
    with img.open("r+b") as f:
        f.truncate(size + 65536)
    patch(img, refblock(img) + 2 * (size >> 16), struct.pack(">H", 1))


def corrupt(img: Path) -> None:
    """A data cluster counted 0 times: a corruption."""
    with Qcow2Image.open(str(img)) as q:
        l2 = q.l1[0] & s.L1_OFFSET_MASK
    entry = struct.unpack(">Q", img.read_bytes()[l2 : l2 + 8])[0]
    patch(img, refblock(img) + 2 * ((entry & s.L2_OFFSET_MASK) >> 16), struct.pack(">H", 0))


QCOW2_CASES = {"clean": (lambda p: None, 0), "leak": (leak, 3), "corrupt": (corrupt, 2)}
COMPARED = ("check-errors", "corruptions", "leaks", "image-end-offset", "total-clusters",
            "allocated-clusters")


@pytest.mark.parametrize("case", list(QCOW2_CASES))
def test_check_qcow2_as_qemu_img(tmp_path: Path, case: str) -> None:
    damage, code = QCOW2_CASES[case]
    img = make_qcow2(tmp_path / "a.qcow2")
    damage(img)
    ours = blktap("check", "--output=json", img)
    theirs = qemu("check", "--output=json", img)
    assert (ours[0], theirs[0]) == (code, code), ours[2] + theirs[2]
    mine, peer = json.loads(ours[1]), json.loads(theirs[1])
    assert {k: mine.get(k, 0) for k in COMPARED} == {k: peer.get(k, 0) for k in COMPARED}
    # --json is the same as --output=json; the human report ends as qemu-img's
    assert json.loads(blktap("check", "--json", img)[1]) == mine
    human = blktap("check", img)
    assert human[0] == code
    assert human[1].splitlines()[-1] == qemu("check", img)[1].splitlines()[-1]


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_check_repair_qcow2_then_qemu_img_agrees(tmp_path: Path, mode: str) -> None:
    img = make_qcow2(tmp_path / "a.qcow2")
    leak(img)
    code, out, _ = blktap("check", "-r", mode, "--output=json", img)
    assert code == 0 and json.loads(out)["leaks-fixed"] == 1
    assert qemu("check", img)[0] == 0


def test_check_missing_and_unreadable_is_check_not_completed(tmp_path: Path) -> None:
    for spec in (tmp_path / "none.qcow2", f"vhd:{tmp_path / 'none.vhd'}",
                 f"qcow2:{tmp_path / 'none.qcow2'}"):
        code, out, err = blktap("check", spec)
        assert code == 1 and out == "" and "No such file" in err
    assert qemu("check", tmp_path / "none.qcow2")[0] == 1
    # A file that is not of the format named cannot be checked either (both tools).
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(64 * 1024))
    for fmt in ("vhd", "qcow2"):
        code, out, err = blktap("check", f"{fmt}:{junk}")
        assert code == 1 and out == "" and len(err.splitlines()) == 1, (fmt, err)
    assert qemu("check", "-f", "vpc", junk)[0] == qemu("check", "-f", "qcow2", junk)[0] == 1


def test_check_raw_is_unsupported_as_in_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(MiB))
    assert blktap("check", img)[0] == qemu("check", "-f", "raw", img)[0] == 63


# ------------------------------------------------------------------------------ vhd
def make_vhd(path: Path, source: Path) -> Path:
    code, _, err = blktap("convert", source, path)
    assert code == 0, err
    return path


@pytest.fixture
def raw_source(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    with src.open("wb") as f:
        f.truncate(16 * MiB)
        f.write(os.urandom(MiB + 4096))
        f.seek(9 * MiB)
        f.write(os.urandom(3 * 4096))
    return src


def footer_at_end(path: Path) -> tuple[int, bytes]:
    size = path.stat().st_size
    return size, path.read_bytes()[size - 512 :]


def test_check_vhd_verdicts_and_repair(tmp_path: Path, raw_source: Path) -> None:
    img = make_vhd(tmp_path / "a.vhd", raw_source)
    assert blktap("check", img)[0] == 0
    assert run([tool("vhd-util"), "check", "-n", str(img)]).returncode == 0
    # Leaked space between the data and the footer (a writer killed mid-allocation):
    size, footer = footer_at_end(img)
    patch(img, size - 512, bytes(4 * 512) + footer)
    code, out, _ = blktap("check", "--output=json", img)
    verdict = json.loads(out)
    assert code == 3 and verdict["leaks"] == 4 and verdict["corruptions"] == 0
    assert verdict["image-end-offset"] == size
    code, out, _ = blktap("check", "-r", "leaks", "--output=json", img)
    assert code == 0 and json.loads(out)["leaks-fixed"] == 4
    assert img.stat().st_size == size
    assert run([tool("vhd-util"), "check", "-n", str(img)]).returncode == 0
    # A damaged header is a corruption (vhd-util check agrees the image is invalid).
    patch(img, 512 + 40, b"\xff\xff")
    code, out, _ = blktap("check", img)
    assert code == 2 and "header is invalid" in out
    assert run([tool("vhd-util"), "check", "-n", str(img)]).returncode != 0
    assert blktap("check", "-r", "leaks", img)[0] == 2  # leaks mode leaves corruption


def test_check_vhd_repair_all_puts_back_the_footer(tmp_path: Path, raw_source: Path) -> None:
    img = make_vhd(tmp_path / "a.vhd", raw_source)
    size = img.stat().st_size
    patch(img, size - 512, b"\xc7" * 512)  # the primary footer lost; its copy at 0 is good
    assert blktap("check", img)[0] == 2
    code, out, _ = blktap("check", "-r", "all", "--output=json", img)
    assert code == 0 and json.loads(out)["corruptions-fixed"] == 1
    assert run([tool("vhd-util"), "check", "-n", str(img)]).returncode == 0


def test_check_vhd_chain_checks_parents(tmp_path: Path, raw_source: Path) -> None:
    base = make_vhd(tmp_path / "base.vhd", raw_source)
    leaf = tmp_path / "leaf.vhd"
    assert blktap("snapshot", f"vhd:{leaf}", base)[0] == 0
    code, out, _ = blktap("check", "--output=json", f"vhd:{leaf}")
    verdict = json.loads(out)
    assert code == 0 and [p["filename"] for p in verdict["parents"]] == [str(base)]
    size, footer = footer_at_end(base)
    patch(base, size - 512, bytes(512) + footer)  # a leak in the parent only
    assert blktap("check", f"vhd:{leaf}")[0] == 3
    assert blktap("check", leaf)[0] == 0  # a plain path: the image alone
    # the parents checked stay within --parent-dir: one outside is not checked
    other = tmp_path / "elsewhere"
    other.mkdir()
    code, out, _ = blktap("check", "--parent-dir", other, f"vhd:{leaf}")
    assert code == 1 and "outside the allowed parent directories" in out
    patch(base, 512 + 40, b"\xff\xff")
    code, out, _ = blktap("check", f"vhd:{leaf}")
    assert code == 2 and "invalid parent" in out and str(base) in out


# ------------------------------------------------------------------------------ measure
def measure_json(tool_argv: list[str]) -> dict:
    res = run(tool_argv, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("size", ["1M", "100M", "10G", "2T", "12345678"])
@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=2M,refcount_bits=64",
                                  "extended_l2=on", "refcount_bits=1,preallocation=full"])
def test_measure_size_as_qemu_img(opts: str, size: str) -> None:
    argv = ["measure", "-O", "qcow2", "--size", size, "--output=json"]
    if opts:
        argv += ["-o", opts]
    ours = measure_json([tool("blktap"), *argv])
    assert ours == measure_json([need("qemu-img"), *argv])
    raw = ["measure", "-O", "raw", "--size", size, "--output=json"]
    assert measure_json([tool("blktap"), *raw]) == measure_json([need("qemu-img"), *raw])


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=1M"])
def test_measure_source_as_qemu_img(tmp_path: Path, raw_source: Path, opts: str) -> None:
    qcow = make_qcow2(tmp_path / "a.qcow2")
    qemu_img("bitmap", "--add", "-g", "4096", qcow, "dirty-since-backup")
    qemu_io(qcow, "write -z 40M 64k")  # a zero cluster: counts as no data
    for src, fmt in ((raw_source, "raw"), (qcow, "qcow2")):
        for target in ("qcow2", "raw"):
            argv = ["measure", "-O", target, "--output=json"]
            if opts and target == "qcow2":
                argv += ["-o", opts]
            ours = measure_json([tool("blktap"), *argv, f"{fmt}:{src}"])
            theirs = measure_json([need("qemu-img"), *argv, "-f", fmt, str(src)])
            assert ours == theirs, (src, target)
    # and the human form, line for line
    ours = run([tool("blktap"), "measure", "-O", "qcow2", str(qcow)], text=True).stdout
    assert ours == qemu_img("measure", "-O", "qcow2", qcow)


def test_measure_vhd_is_what_convert_writes(tmp_path: Path, raw_source: Path) -> None:
    fig = measure_json([tool("blktap"), "measure", "-O", "vhd", "--json", str(raw_source)])
    out = make_vhd(tmp_path / "out.vhd", raw_source)
    assert fig["required"] == out.stat().st_size
    assert fig["fully-allocated"] > fig["required"]
    fixed = measure_json([tool("blktap"), "measure", "-O", "vhd", "--fixed", "--json",
                          "--size", "16M"])
    assert fixed == {"required": 16 * MiB + 512, "fully-allocated": 16 * MiB + 512}
    assert blktap("convert", "--fixed", raw_source, tmp_path / "f.vhd")[0] == 0
    assert (tmp_path / "f.vhd").stat().st_size == fixed["required"]
    empty = measure_json([tool("blktap"), "measure", "-O", "vhd", "--json", "--size", "16M"])
    assert blktap("create", tmp_path / "e.vhd", "16M")[0] == 0
    assert (tmp_path / "e.vhd").stat().st_size == empty["required"]


def test_measure_bad_input(tmp_path: Path) -> None:
    for argv in (["measure"], ["measure", "--size", "1M", str(tmp_path)],
                 ["measure", "-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
                 ["measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"],
                 ["measure", "-O", "vmdk", "--size", "1M"]):
        code, out, err = blktap(*argv)
        assert code == 22 and out == "" and len(err.splitlines()) == 1, (argv, err)
    code, _, err = blktap("measure", tmp_path / "missing.img")
    assert code == 2 and "missing.img" in err


def test_convert_output_sizes_fit_qemu_measure(tmp_path: Path, raw_source: Path) -> None:
    """What we write as qcow2 fits in what qemu-img says it needs."""
    out = tmp_path / "o.qcow2"
    assert blktap("convert", raw_source, out)[0] == 0
    fig = measure_json([need("qemu-img"), "measure", "-O", "qcow2", "--output=json",
                        "-f", "raw", str(raw_source)])
    assert out.stat().st_size <= fig["required"]
    shutil.rmtree(tmp_path / "none", ignore_errors=True)
