"""The ``blktap`` command, run as users run it: the installed console script."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pty
import shutil
import subprocess
from pathlib import Path

import pytest

from blktap.cli.common import Progress, describe_size, human_size, parse_size
from conftest import need, run, tool

MiB = 1 << 20


def blktap(*args: object, check: bool = False) -> subprocess.CompletedProcess:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"blktap {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def ok(*args: object) -> subprocess.CompletedProcess:
    return blktap(*args, check=True)


def as_json(*args: object) -> object:
    return json.loads(ok(*args, "--json").stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int | None = None) -> str:
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blktap: ")
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_sha(reference_dir: Path, name: str) -> str:
    return (reference_dir / "expect" / f"{name}.sha256").read_text().split()[0]


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("text, value", [
    ("512", 512), ("64M", 64 * MiB), ("10G", 10 << 30), ("4k", 4096), ("1.5GiB", 3 << 29),
    ("2MB", 2 * MiB), ("100b", 100), (" 1T ", 1 << 40),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "-1", "1.0001K", "M", "ib", "5ib", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    from blktap.errors import UsageError

    with pytest.raises(UsageError):
        parse_size(text)


def test_human_sizes() -> None:
    assert human_size(0) == "0 bytes"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(2040 << 30) == "2040 GiB"
    assert describe_size(64 * MiB) == "64 MiB (67108864 bytes)"


def test_progress_draws_only_when_enabled() -> None:
    quiet = io.StringIO()
    Progress("x", 100, stream=quiet).update(50)  # a StringIO is not a terminal
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    with Progress("copying", 4 * MiB, stream=shown, enabled=True) as bar:
        bar.update(MiB)
    assert "\rcopying [" in shown.getvalue() and " 25%" in shown.getvalue()
    assert shown.getvalue().endswith("\r\x1b[K")


# ------------------------------------------------------------------------------ basics
def test_no_arguments_prints_help() -> None:
    proc = blktap()
    assert proc.returncode == 0
    assert "usage: blktap" in proc.stdout
    for command in ("info", "create", "snapshot", "convert", "compare", "map"):
        assert command in proc.stdout


def test_version() -> None:
    proc = ok("--version")
    assert proc.stdout.startswith("blktap ")


def test_usage_mistakes_are_one_line() -> None:
    assert "create" in assert_one_line_error(blktap("create", "x.vhd"), errno.EINVAL)
    assert_one_line_error(blktap("frobnicate"), errno.EINVAL)


# ------------------------------------------------------------------------------ create, info
def test_create_dynamic_vhd_and_info(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    proc = ok("create", image, "64M")
    assert "64 MiB (67108864 bytes)" in proc.stdout
    assert "rounded" not in proc.stderr
    info = as_json("info", image)
    assert info["format"] == "vhd" and info["type"] == "dynamic"
    assert info["virtual_size"] == 64 * MiB
    assert info["allocated"] == 0 and info["leaf_allocated"] == 0
    assert info["chain_depth"] == 1 and len(info["chain"]) == 1
    assert info["hidden"] is False and info["marker"] is False
    assert len(info["uuid"]) == 36
    human = ok("info", image).stdout
    assert "virtual size:  64 MiB (67108864 bytes)" in human
    assert "vhd dynamic" in human


def test_create_rounds_vhd_size_and_says_so(tmp_path: Path) -> None:
    image = tmp_path / "odd.vhd"
    proc = ok("create", image, "3M")
    assert "rounded up" in proc.stderr and "4 MiB (4194304 bytes)" in proc.stderr
    assert as_json("info", image)["virtual_size"] == 4 * MiB


def test_create_fixed_and_prealloc(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.vhd"
    ok("create", fixed, "4M", "--fixed")
    info = as_json("info", fixed)
    assert info["type"] == "fixed" and info["marker"] is None
    assert fixed.stat().st_size == 4 * MiB + 512
    ok("create", tmp_path / "pre.vhd", "8M", "--prealloc", "1G")
    assert as_json("info", tmp_path / "pre.vhd")["virtual_size"] == 8 * MiB
    assert_one_line_error(blktap("create", tmp_path / "x.vhd", "8M", "--fixed",
                                 "--prealloc", "1G"), errno.EINVAL)


def test_create_raw(tmp_path: Path) -> None:
    sparse, full = tmp_path / "sparse.img", tmp_path / "full"
    ok("create", sparse, "3M")  # the .img name chooses raw; raw sizes are not rounded
    ok("create", "-f", "raw", full, "1M", "--fixed")
    assert sparse.stat().st_size == 3 * MiB
    assert sparse.stat().st_blocks * 512 < MiB
    assert full.stat().st_blocks * 512 >= MiB
    info = as_json("info", sparse)
    assert info["format"] == "raw" and info["type"] is None and info["uuid"] is None
    assert info["allocated"] == 0
    # (--fixed reserves blocks; SEEK_DATA may still call reserved, unwritten blocks holes.)
    assert as_json("info", full)["virtual_size"] == MiB


def test_create_errors(tmp_path: Path) -> None:
    image = tmp_path / "a.vhd"
    ok("create", image, "2M")
    assert "exists" in assert_one_line_error(blktap("create", image, "2M"), errno.EEXIST)
    line = assert_one_line_error(blktap("create", tmp_path / "b.vhd", "12Q"), errno.EINVAL)
    assert "12Q" in line
    assert_one_line_error(blktap("create", tmp_path / "c.vhd", "0"), errno.EINVAL)
    assert not (tmp_path / "b.vhd").exists() and not (tmp_path / "c.vhd").exists()


def test_info_reference_chain(reference_dir: Path) -> None:
    info = as_json("info", f"vhd:{reference_dir / 'snap2.vhd'}")
    assert info["type"] == "differencing" and info["virtual_size"] == 48 * MiB
    assert info["chain_depth"] == 3
    names = [Path(layer["path"]).name for layer in info["chain"]]
    assert names == ["snap2.vhd", "snap1.vhd", "base.vhd"]
    assert [layer["depth"] for layer in info["chain"]] == [0, 1, 2]
    assert info["leaf_allocated"] == info["chain"][0]["allocated"] > 0
    assert 0 < info["allocated"] <= sum(layer["allocated"] for layer in info["chain"])
    for layer in info["chain"]:
        assert {"format", "type", "virtual_size", "allocated", "uuid", "hidden"} <= set(layer)
    human = ok("info", f"vhd:{reference_dir / 'snap2.vhd'}").stdout
    assert "chain depth:   3" in human and "base.vhd" in human


def test_info_flags_and_raw_parent(reference_dir: Path) -> None:
    flags = as_json("info", reference_dir / "flags.vhd")
    assert flags["hidden"] is True and flags["marker"] is True
    child = as_json("info", f"vhd:{reference_dir / 'rawchild.vhd'}")
    assert [layer["format"] for layer in child["chain"]] == ["vhd", "raw"]
    assert child["allocated"] == 8 * MiB


# ------------------------------------------------------------------------------ snapshot
def test_snapshot_chain_and_skip_empty(tmp_path: Path) -> None:
    base, s1, s2, s3 = (tmp_path / n for n in ("base.vhd", "s1.vhd", "s2.vhd", "s3.vhd"))
    ok("create", base, "8M")
    proc = ok("snapshot", s1, base)
    assert str(base) in proc.stdout
    # s1 is empty: by default s2 links past it, and says which parent it used.
    proc = ok("snapshot", s2, f"vhd:{s1}")
    assert f"parent {base}" in proc.stdout and "empty" in proc.stderr
    assert as_json("info", f"vhd:{s2}")["chain_depth"] == 2
    ok("snapshot", s3, f"vhd:{s1}", "--no-skip-empty")
    assert as_json("info", f"vhd:{s3}")["chain_depth"] == 3
    line = assert_one_line_error(
        blktap("snapshot", tmp_path / "s4.vhd", f"vhd:{s3}", "--no-skip-empty",
               "--depth-limit", "3"))
    assert "depth" in line


def test_snapshot_raw_parent(tmp_path: Path) -> None:
    raw = tmp_path / "base.img"
    ok("create", raw, "3M")
    line = assert_one_line_error(blktap("snapshot", tmp_path / "c.vhd", raw), errno.EINVAL)
    assert "--raw-parent" in line
    ok("snapshot", tmp_path / "c.vhd", raw, "--raw-parent")
    ok("snapshot", tmp_path / "d.vhd", f"aio:{raw}")
    for child in ("c.vhd", "d.vhd"):
        info = as_json("info", f"vhd:{tmp_path / child}")
        assert [layer["format"] for layer in info["chain"]] == ["vhd", "raw"]
        assert info["virtual_size"] >= 3 * MiB


# ------------------------------------------------------------------------------ map
def test_map_reference_chain(reference_dir: Path) -> None:
    image = f"vhd:{reference_dir / 'snap2.vhd'}"
    extents = as_json("map", image)
    assert extents[0]["offset"] == 0
    end = 0
    for ext in extents:
        assert set(ext) == {"offset", "length", "depth", "status", "file"}
        assert ext["status"] == ("hole" if ext["depth"] is None else "data")
        assert ext["offset"] == end
        end += ext["length"]
        if ext["depth"] is None:
            assert ext["file"] is None
        else:
            assert Path(ext["file"]).name == ["snap2.vhd", "snap1.vhd", "base.vhd"][ext["depth"]]
    assert end == 48 * MiB
    assert {e["depth"] for e in extents} == {0, 1, 2, None}
    lines = ok("map", image).stdout.splitlines()
    assert lines[0].split() == ["offset", "length", "depth", "status", "path"]
    assert len(lines) == len(extents) + 1


def test_map_raw_of_odd_size(tmp_path: Path) -> None:
    image = tmp_path / "odd.raw"
    image.write_bytes(b"\x01" * 1000)
    assert as_json("map", image) == [
        {"offset": 0, "length": 1000, "depth": 0, "status": "data", "file": str(image)}]


# ------------------------------------------------------------------------------ convert
def test_convert_chain_to_raw_matches_reference(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "snap2.raw"
    proc = ok("convert", f"vhd:{reference_dir / 'snap2.vhd'}", out)
    assert "3 layers" in proc.stdout
    assert out.stat().st_size == 48 * MiB
    assert sha256(out) == expected_sha(reference_dir, "snap2")
    # Sparse: the unallocated space (well over half the disk) was never written.
    assert out.stat().st_blocks * 512 < 24 * MiB
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_raw_parent_chain(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rawchild.raw"
    ok("convert", "-O", "raw", f"vhd:{reference_dir / 'rawchild.vhd'}", out)
    assert sha256(out) == expected_sha(reference_dir, "rawchild")


@pytest.mark.interop
@pytest.mark.parametrize("name", ["data", "fixed"])
def test_convert_vhd_to_raw_like_qemu(reference_dir: Path, tmp_path: Path, name: str) -> None:
    qemu_img = need("qemu-img")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    ok("convert", reference_dir / f"{name}.vhd", ours)
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw",
                    str(reference_dir / f"{name}.vhd"), str(theirs)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert sha256(ours) == expected_sha(reference_dir, name)


@pytest.mark.interop
@pytest.mark.parametrize("fixed", [False, True])
def test_convert_raw_to_vhd_qemu_compare(tmp_path: Path, fixed: bool) -> None:
    qemu_img = need("qemu-img")
    src, dst = tmp_path / "src.raw", tmp_path / "dst.vhd"
    with open(src, "wb") as f:
        f.truncate(6 * MiB)
        f.seek(MiB + 3)
        f.write(os.urandom(70000))
        f.seek(5 * MiB)
        f.write(b"\xaa" * 4096)
    ok("convert", "-O", "vhd", src, dst, *(["--fixed"] if fixed else []))
    proc = run([qemu_img, "compare", "-f", "raw", "-F", "vpc", str(src), str(dst)], text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = as_json("info", dst)
    assert info["type"] == ("fixed" if fixed else "dynamic")
    if not fixed:  # only the data was written: 2 of the 3 blocks, and few sectors of each
        assert info["allocated"] < 256 * 1024
        assert dst.stat().st_size < 5 * MiB
    ok("compare", src, dst)


def test_convert_odd_size_raw_to_vhd_and_back(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(3000))
    proc = ok("convert", src, tmp_path / "odd.vhd")
    assert "rounded up" in proc.stderr
    assert as_json("info", tmp_path / "odd.vhd")["virtual_size"] == 2 * MiB
    ok("compare", src, tmp_path / "odd.vhd")
    ok("convert", src, tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == src.read_bytes()


def test_convert_no_sparse_allocates(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.raw"
    ok("convert", "--no-sparse", reference_dir / "data.vhd", out)
    assert out.stat().st_blocks * 512 >= 64 * MiB
    assert sha256(out) == expected_sha(reference_dir, "data")


def test_convert_destination_rules(reference_dir: Path, ref_copy: Path, tmp_path: Path) -> None:
    src, dst = reference_dir / "data.vhd", tmp_path / "out.raw"
    dst.write_bytes(b"keep me")
    line = assert_one_line_error(blktap("convert", src, dst), errno.EEXIST)
    assert "exists" in line and "--force" in line
    assert dst.read_bytes() == b"keep me"
    ok("convert", src, dst, "--force")
    assert sha256(dst) == expected_sha(reference_dir, "data")
    # Never over a layer of the source, even with --force.
    line = assert_one_line_error(
        blktap("convert", f"vhd:{ref_copy / 'snap2.vhd'}", ref_copy / "base.vhd", "--force"))
    assert "source chain" in line
    assert sha256(ref_copy / "base.vhd") == sha256(reference_dir / "base.vhd")
    assert_one_line_error(blktap("convert", src, tmp_path / "none" / "x.raw"), errno.ENOENT)
    assert_one_line_error(blktap("convert", src, tmp_path / "x.raw", "--fixed"), errno.EINVAL)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_convert_progress_on_a_terminal(reference_dir: Path, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([tool("blktap"), "convert", str(reference_dir / "data.vhd"),
                               str(tmp_path / "out.raw")], stderr=slave,
                              stdout=subprocess.PIPE, timeout=60)
        os.close(slave)
        slave = -1
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    assert b"\rconverting to raw [" in output and b"100%" in output
    assert b"\r" not in proc.stdout  # the bar never goes to stdout


def test_no_progress_when_not_a_terminal(reference_dir: Path, tmp_path: Path) -> None:
    proc = ok("convert", reference_dir / "data.vhd", tmp_path / "out.raw")
    assert "\r" not in proc.stderr and "\r" not in proc.stdout


# ------------------------------------------------------------------------------ compare
def test_compare_identical_across_formats(reference_dir: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat.raw"
    snap2 = f"vhd:{reference_dir / 'snap2.vhd'}"
    ok("convert", snap2, flat)
    proc = ok("compare", snap2, f"raw:{flat}")
    assert "identical" in proc.stdout
    result = as_json("compare", flat, snap2)
    assert result["identical"] is True and result["offset"] is None
    assert result["a"]["size"] == result["b"]["size"] == 48 * MiB


def test_compare_finds_one_byte(reference_dir: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat.raw"
    ok("convert", reference_dir / "data.vhd", flat)
    offset = 30 * MiB + 12345  # inside a run that is unallocated in data.vhd
    poke(flat, offset, b"\x01")
    proc = blktap("compare", reference_dir / "data.vhd", flat)
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"Content mismatch at offset {offset}"
    shutil.copy(reference_dir / "data.vhd", tmp_path / "data.vhd")
    ok("convert", reference_dir / "data.vhd", tmp_path / "again.raw")
    poke(tmp_path / "again.raw", 3 * MiB + 7, b"\xfe")  # inside allocated data
    proc = blktap("compare", "--json", tmp_path / "data.vhd", tmp_path / "again.raw")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["identical"] is False and result["reason"] == "content"
    assert result["offset"] == 3 * MiB + 7


def test_compare_sizes(tmp_path: Path) -> None:
    small, big = tmp_path / "small.raw", tmp_path / "big.raw"
    small.write_bytes(b"abc" * 1000)
    big.write_bytes(b"abc" * 1000 + bytes(5000))
    proc = ok("compare", small, big)
    assert "identical" in proc.stdout and "sizes differ" in proc.stderr
    proc = blktap("compare", "--strict", small, big)
    assert proc.returncode == 1 and "size mismatch" in proc.stdout.lower()
    strict = json.loads(blktap("compare", "--strict", "--json", small, big).stdout)
    assert strict["identical"] is False and strict["reason"] == "size"
    poke(big, 3000 + 4321, b"z")
    proc = blktap("compare", big, small)
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"Content mismatch at offset {3000 + 4321}"


def test_compare_errors_are_two_or_more(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(bytes(512))
    proc = blktap("compare", tmp_path / "a.raw", tmp_path / "missing.raw")
    assert_one_line_error(proc, errno.ENOENT)
    proc = blktap("compare", tmp_path / "a.raw")
    assert proc.returncode >= 2


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("argv", [
    ["info", "{d}/missing.vhd"],
    ["map", "{d}/missing.vhd"],
    ["convert", "{d}/missing.vhd", "{d}/out.raw"],
    ["snapshot", "{d}/child.vhd", "{d}/missing.vhd"],
    ["info", "--json", "vhd:{d}/missing.vhd"],
])
def test_missing_file(tmp_path: Path, argv: list[str]) -> None:
    proc = blktap(*[a.format(d=tmp_path) for a in argv])
    line = assert_one_line_error(proc, errno.ENOENT)
    assert "missing.vhd" in line
    assert proc.stdout == ""


def test_bad_images(reference_dir: Path, tmp_path: Path) -> None:
    not_vhd = tmp_path / "plain.img"
    not_vhd.write_bytes(b"hello" * 200)
    assert "not a valid VHD" in assert_one_line_error(blktap("info", f"vhd:{not_vhd}"))
    assert_one_line_error(blktap("info", tmp_path), errno.EISDIR)
    orphan = tmp_path / "orphan.vhd"
    shutil.copy(reference_dir / "snap2.vhd", orphan)
    assert "not found" in assert_one_line_error(blktap("info", f"vhd:{orphan}"), errno.ENOENT)
