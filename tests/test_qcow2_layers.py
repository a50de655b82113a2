"""qcow2 layers of a chain: blktap snapshot, commit, rebase and resize, over qcow2, VHD
and raw parents, each proved with qemu-img (check clean, compare equal, info
--backing-chain agreeing) and, for the file-changing steps, killed at every system call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from blktap.image.qcow2.layers import commit, rebase, resize
from conftest import run, tool
from faults import count_mutations, crash_after, kill_points
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io, qemu_raw

QEMU_FMT = {"qcow2": "qcow2", "vhd": "vpc", "raw": "raw"}


def blktap(*args: object) -> tuple[int, str, str]:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def make_base(tmp: Path, fmt: str, size: int = 8 * MiB) -> Path:
    """A base image of ``fmt`` written by qemu: 0x11 over the first half."""
    path = tmp / f"base.{fmt}"
    opts = ["-o", "subformat=dynamic"] if fmt == "vhd" else []
    qemu_img("create", "-q", "-f", QEMU_FMT[fmt], *opts, path, str(size))
    qemu_io(path, f"write -P 0x11 0 {size // 2}", fmt=QEMU_FMT[fmt])
    return path


def chain_names(path: Path) -> list[tuple[str, str]]:
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", path))
    return [(Path(x["filename"]).name, x["format"]) for x in info]


@pytest.mark.parametrize("fmt", ["qcow2", "vhd", "raw"])
def test_snapshot_then_commit(tmp_path: Path, fmt: str) -> None:
    base = make_base(tmp_path, fmt)
    top = tmp_path / "top.qcow2"
    parent = f"raw:{base}" if fmt == "raw" else f"{fmt}:{base}"
    code, out, err = blktap("snapshot", top, parent)
    assert code == 0, err
    assert chain_names(top) == [("top.qcow2", "qcow2"), (base.name, QEMU_FMT[fmt])]
    assert qemu_check(top)[0] == 0
    # qemu writes into our leaf; the result is what the commit must carry down.
    qemu_io(top, "write -P 0x22 1M 2M", "write -z 3M 64k", "write -P 0x33 6M 512k")
    assert qemu_check(top)[0] == 0
    expect = qemu_raw(top, tmp_path)
    before = top.read_bytes()
    code, out, err = blktap("commit", f"qcow2:{top}")
    assert code == 0, err
    assert top.read_bytes() == before  # the top is left as it was
    assert qemu_raw(base, tmp_path) == expect
    if fmt == "qcow2":
        assert qemu_check(base)[0] == 0
    qemu_img("compare", "-f", "qcow2", "-F", QEMU_FMT[fmt], top, base)


def test_snapshot_refuses_probed_parents(tmp_path: Path) -> None:
    make_base(tmp_path, "qcow2")
    mid = tmp_path / "mid.qcow2"
    create(str(mid), 8 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    code, _, err = blktap("snapshot", tmp_path / "t.qcow2", mid)
    assert code != 0 and "probed" in err
    assert not (tmp_path / "t.qcow2").exists()
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    code, _, err = blktap("snapshot", tmp_path / "t.qcow2", raw)
    assert code != 0 and "--raw-parent" in err
    code, _, err = blktap("snapshot", tmp_path / "t.qcow2", raw, "--raw-parent")
    assert code == 0, err
    assert chain_names(tmp_path / "t.qcow2")[1] == ("disk.raw", "raw")


def test_commit_grows_a_smaller_base_and_refuses_without_one(tmp_path: Path) -> None:
    base = make_base(tmp_path, "qcow2", 4 * MiB)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x44 7M 1M")
    expect = qemu_raw(top, tmp_path)
    code, _, err = blktap("commit", f"qcow2:{top}")
    assert code == 0, err
    assert qemu_raw(base, tmp_path) == expect
    assert qemu_check(base)[0] == 0
    code, _, err = blktap("commit", f"qcow2:{base}")
    assert code != 0 and "no backing file" in err


@pytest.mark.parametrize("new_fmt", ["qcow2", "vhd", "raw", "none"])
def test_rebase_keeps_content(tmp_path: Path, new_fmt: str) -> None:
    # base <- mid <- top; top is rebased past mid onto another image (or onto nothing).
    base = make_base(tmp_path, "qcow2")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid, "8M")
    qemu_io(mid, "write -P 0x55 2M 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", mid.name,
             "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x66 2560k 4k", "write -z 100k 8k")
    expect = qemu_raw(top, tmp_path)
    if new_fmt == "none":
        code, out, err = blktap("rebase", "--json", f"qcow2:{top}", "")
        assert code == 0, err
        assert chain_names(top) == [("top.qcow2", "qcow2")]
    else:
        (tmp_path / "o").mkdir()
        other = make_base(tmp_path / "o", new_fmt)
        prefix = "raw" if new_fmt == "raw" else new_fmt
        code, out, err = blktap("rebase", "--json", f"qcow2:{top}", f"{prefix}:{other}")
        assert code == 0, err
        assert chain_names(top) == [("top.qcow2", "qcow2"), (other.name, QEMU_FMT[new_fmt])]
    report = json.loads(out)
    assert report["copied_bytes"] > 0
    assert qemu_check(top)[0] == 0
    assert qemu_raw(top, tmp_path) == expect


def test_rebase_unsafe_only_rewrites_the_name(tmp_path: Path) -> None:
    base = make_base(tmp_path, "qcow2")
    copy = tmp_path / "copy.qcow2"
    shutil.copy(base, copy)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x77 0 64k")
    expect = qemu_raw(top, tmp_path)
    size = top.stat().st_size
    code, _, err = blktap("rebase", "--unsafe", f"qcow2:{top}", f"qcow2:{copy}")
    assert code == 0, err
    assert top.stat().st_size == size
    assert chain_names(top)[1] == ("copy.qcow2", "qcow2")
    assert qemu_raw(top, tmp_path) == expect
    assert qemu_check(top)[0] == 0


def test_rebase_refuses_a_loop(tmp_path: Path) -> None:
    base = make_base(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
    before = top.read_bytes()
    code, _, err = blktap("rebase", f"qcow2:{top}", f"qcow2:{top}")
    assert code != 0 and "itself" in err
    assert top.read_bytes() == before


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_resize_grow_and_shrink(tmp_path: Path, cluster_size: int) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, "1M")
    qemu_io(img, "write -P 0x21 0 64k", "write -P 0x22 960k 64k")
    # 512-byte clusters map 32 KiB per L1 entry: 64 MiB needs a 4-cluster L1 table.
    code, _, err = blktap("resize", f"qcow2:{img}", "64M")
    assert code == 0, err
    info = json.loads(qemu_img("info", "--output=json", img))
    assert info["virtual-size"] == 64 * MiB
    assert qemu_check(img)[0] == 0
    qemu_io(img, "write -P 0x23 63M 1M", "read -P 0x21 0 64k", "read -P 0x22 960k 64k",
            "read -P 0 1M 62M")
    assert qemu_check(img)[0] == 0
    code, _, err = blktap("resize", f"qcow2:{img}", "32M")
    assert code != 0 and "cannot shrink" in err
    assert json.loads(qemu_img("info", "--output=json", img))["virtual-size"] == 64 * MiB
    qemu_io(img, "discard 63M 1M")
    code, _, err = blktap("resize", f"qcow2:{img}", "2M")
    assert code == 0, err
    assert json.loads(qemu_img("info", "--output=json", img))["virtual-size"] == 2 * MiB
    assert qemu_check(img)[0] == 0
    qemu_io(img, "read -P 0x21 0 64k", "read -P 0x22 960k 64k")
    code, _, err = blktap("resize", f"qcow2:{img}", "1000")
    assert code != 0 and "512" in err


def test_killed_resize_leaves_old_or_new(tmp_path: Path) -> None:
    template = tmp_path / "t.qcow2"
    create(str(template), MiB, cluster_size=512)
    qemu_io(template, "write -P 0x31 0 1M")
    img = tmp_path / "img.qcow2"
    shutil.copy(template, img)
    total = count_mutations(lambda: resize(str(img), 64 * MiB))
    assert total >= 3
    for n in kill_points(total, 40):
        shutil.copy(template, img)
        crash_after(lambda: resize(str(img), 64 * MiB), n)
        code, info = qemu_check(img)
        assert code in (0, 3), (n, info)
        assert check(str(img)).exit_code == code, n
        size = json.loads(qemu_img("info", "--output=json", img))["virtual-size"]
        assert size in (MiB, 64 * MiB), n
        qemu_io(img, "read -P 0x31 0 1M")


def test_killed_rebase_keeps_content(tmp_path: Path) -> None:
    make_base(tmp_path, "qcow2")
    template = tmp_path / "t.qcow2"
    create(str(template), 8 * MiB, cluster_size=65536, backing_file="base.qcow2",
           backing_fmt="qcow2")
    qemu_io(template, "write -P 0x41 1M 64k")
    expect = qemu_raw(template, tmp_path)
    img = tmp_path / "img.qcow2"
    shutil.copy(template, img)

    def op() -> None:
        rebase(str(img), None, None)

    total = count_mutations(op)
    for n in kill_points(total, 40):
        shutil.copy(template, img)
        crash_after(op, n)
        code, info = qemu_check(img)
        assert code in (0, 3), (n, info)
        assert qemu_raw(img, tmp_path) == expect, n


def test_killed_commit_keeps_the_chain_reading_the_same(tmp_path: Path) -> None:
    base_t = make_base(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base_t.name, "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x51 1M 256k", "write -z 2M 128k", "write -P 0x52 5M 64k")
    expect = qemu_raw(top, tmp_path)
    template = tmp_path / "base.template"
    shutil.copy(base_t, template)

    def op() -> None:
        commit(str(top))

    total = count_mutations(op)
    assert total > 3
    for n in kill_points(total, 30):
        shutil.copy(template, base_t)
        crash_after(op, n)
        code, info = qemu_check(base_t)
        assert code in (0, 3), (n, info)
        assert qemu_raw(top, tmp_path) == expect, n


def test_rebase_compares_only_where_a_chain_holds_data(tmp_path: Path) -> None:
    # A 1 TiB image over an 8 MiB base: only the base's data is read and compared.
    make_base(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1T")
    qemu_io(top, "write -P 0x61 0 1M", "write -P 0x62 900G 1M")
    result = rebase(str(top), None, None)
    assert result.compared_bytes == 3 * MiB  # the base's 4 MiB of data, less the 1 MiB
    assert result.copied_bytes == 3 * MiB
    assert qemu_check(top)[0] == 0
    qemu_io(top, "read -P 0x61 0 1M", "read -P 0x11 1M 3M", "read -P 0 4M 4M",
            "read -P 0x62 900G 1M")


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    base = make_base(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
    garbage = tmp_path / "g.qcow2"
    garbage.write_bytes(b"QFI\xfb" + bytes(60))
    files = {p: p.read_bytes() for p in (base, top, garbage)}
    cases = [
        (("rebase", f"qcow2:{top}", f"qcow2:{tmp_path / 'nope.qcow2'}"), "nope.qcow2"),
        (("snapshot", tmp_path / "n.qcow2", f"qcow2:{tmp_path / 'nope.qcow2'}"), "nope"),
        (("snapshot", tmp_path / "n.qcow2", f"qcow2:{garbage}"), "g.qcow2"),
        (("resize", f"qcow2:{garbage}", "1G"), "g.qcow2"),
        (("commit", f"qcow2:{garbage}"), "g.qcow2"),
        (("resize", f"qcow2:{top}", "0"), "size"),
        (("rebase", top, f"qcow2:{base}"), "probed"),  # a plain path is not followed
        (("commit", top), "probed"),
    ]
    for argv, words in cases:
        code, _, err = blktap(*argv)
        assert code != 0 and words in err, (argv, err)
        assert err.count("\n") == 1, err  # one line
    for path, data in files.items():
        assert path.read_bytes() == data, path
    assert not (tmp_path / "n.qcow2").exists()
