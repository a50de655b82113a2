"""blktap convert --keep-chain (every layer of a chain into a layer of its own, VHD or
qcow2, linked to its converted parent) and convert -B BASE (one layer over an existing
base). Proved with real peers: qemu-img compare of the source and the converted chain
(a VHD chain through our NBD server, qemu having no differencing VHD), qemu-img info
--backing-chain, qemu-img check, our vhd-util check; each layer holds only what its
source layer holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blktap.errors import FormatError
from blktap.image import chain_convert
from blktap.image.chain import Chain
from conftest import run, tool
from nbd_helpers import serve
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io

KiB = 1 << 10


def blktap(*args: object) -> tuple[int, str, str]:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def vhd_util(*args: object) -> tuple[int, str]:
    proc = run([tool("vhd-util"), *map(str, args)], text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def qcow2_chain(tmp: Path) -> Path:
    """base <- mid <- top, written by qemu: partial clusters, a zero cluster over data,
    data past the base's data."""
    base, mid, top = tmp / "base.qcow2", tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "32M")
    qemu_io(base, "write -P 1 0 6M", "write -P 2 20M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 3 4M 100k", "write -z 20M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 4 5M 3k", "write -P 5 30M 2M")
    return top


def own_sectors(spec: str, depth: int) -> set[int]:
    with Chain.open(spec) as chain:
        return {s for first, n, _ in chain.own_runs(depth) for s in range(first, first + n)}


def served_compare(qcow2: Path, vhd_leaf: Path, tmp: Path) -> None:
    """qemu-img compare of a qcow2 chain and a VHD chain served by blktap serve."""
    with serve(f"vhd:{vhd_leaf}", tmp, "--read-only") as srv:
        res = run(["qemu-img", "compare", "-f", "qcow2", str(qcow2), srv.uri], text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_qcow2_chain_to_vhd_and_back(tmp_path: Path) -> None:
    top = qcow2_chain(tmp_path)
    out = tmp_path / "vhd"
    out.mkdir()
    code, text, err = blktap("convert", "--keep-chain", "-O", "vhd", f"qcow2:{top}",
                             out / "top.vhd", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert [Path(x["target"]).name for x in report["layers"]] == \
        ["top.vhd", "mid.vhd", "base.vhd"]
    for name in ("top.vhd", "mid.vhd", "base.vhd"):
        assert vhd_util("check", "-n", out / name) == (0, f"{out / name} is valid\n")
    code, text, _ = blktap("info", f"vhd:{out / 'top.vhd'}", "--json")
    info = json.loads(text)
    assert [(Path(x["path"]).name, x["type"]) for x in info["chain"]] == [
        ("top.vhd", "differencing"), ("mid.vhd", "differencing"), ("base.vhd", "dynamic")]
    served_compare(top, out / "top.vhd", tmp_path)
    # Each VHD layer holds exactly the sectors its qcow2 layer holds (VHD bitmaps are
    # per sector, qcow2 allocates clusters: the clusters' sectors).
    for depth in range(3):
        assert own_sectors(f"vhd:{out / 'top.vhd'}", depth) == \
            own_sectors(f"qcow2:{top}", depth)
    # The top layer holds its 64 KiB cluster and its 2 MiB, not the disk below it.
    assert report["layers"][0]["written"] == 64 * KiB + 2 * MiB

    back = tmp_path / "back"
    back.mkdir()
    code, text, err = blktap("convert", "--keep-chain", f"vhd:{out / 'top.vhd'}",
                             back / "top.qcow2")
    assert code == 0, err
    res = run(["qemu-img", "compare", str(top), str(back / "top.qcow2")], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json",
                                back / "top.qcow2"))
    assert [(Path(x["filename"]).name, x.get("backing-filename")) for x in chain] == [
        ("top.qcow2", "mid.qcow2"), ("mid.qcow2", "base.qcow2"), ("base.qcow2", None)]
    for name in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        assert qemu_check(back / name)[0] == 0
    for depth in range(3):  # cluster for cluster, as the source had it
        assert own_sectors(f"qcow2:{back / 'top.qcow2'}", depth) == \
            own_sectors(f"qcow2:{top}", depth)


def test_vhd_chain_over_raw_base_to_qcow2(tmp_path: Path) -> None:
    """A VHD chain whose base is raw: the raw base becomes the qcow2 base."""
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x11" * (2 * MiB))
    snap = tmp_path / "snap.vhd"
    code, _, err = blktap("snapshot", snap, f"raw:{base}")
    assert code == 0, err
    with serve(f"vhd:{snap}", tmp_path) as srv:
        res = run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 1536k 4k", srv.uri],
                  text=True)
        assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = blktap("convert", "--keep-chain", "-O", "qcow2", "--layer-name",
                          "L{depth}-{name}.{ext}", f"vhd:{snap}", out / "snap.qcow2")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["L1-base.qcow2", "snap.qcow2"]
    assert qemu_check(out / "snap.qcow2")[0] == 0
    assert qemu_check(out / "L1-base.qcow2")[0] == 0
    served_compare(out / "snap.qcow2", snap, tmp_path)


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_onto_base(tmp_path: Path, fmt: str) -> None:
    """-B: DST over an existing base holds where the source differs from it."""
    top = qcow2_chain(tmp_path)
    base = tmp_path / "base.qcow2"
    if fmt == "vhd":
        code, _, err = blktap("convert", "-O", "vhd", f"qcow2:{base}", tmp_path / "b.vhd")
        assert code == 0, err
        base = tmp_path / "b.vhd"
    dst = tmp_path / f"onto.{fmt}"
    code, text, err = blktap("convert", "-B", base, "-F", "vpc" if fmt == "vhd" else fmt,
                             f"qcow2:{top}", dst, "--json")
    assert code == 0, err
    # mid's 2 clusters and its zero cluster, top's cluster and 2 MiB
    assert json.loads(text)["layers"][0]["written"] == 3 * 64 * KiB + 64 * KiB + 2 * MiB
    if fmt == "qcow2":
        assert qemu_check(dst)[0] == 0
        assert json.loads(qemu_img("info", "--output=json", dst))["backing-filename"] == \
            "base.qcow2"
        res = run(["qemu-img", "compare", str(top), str(dst)], text=True)
        assert res.returncode == 0, res.stdout
    else:
        assert vhd_util("check", "-n", dst)[0] == 0
        served_compare(top, dst, tmp_path)
    # A VHD cannot have a qcow2 parent.
    code, _, err = blktap("convert", "-B", f"qcow2:{tmp_path / 'base.qcow2'}", "-O", "vhd",
                          f"qcow2:{top}", tmp_path / "bad.vhd")
    assert code == 22 and "a VHD's parent is a VHD or a raw image" in err
    assert not (tmp_path / "bad.vhd").exists()


def test_bad_input(tmp_path: Path) -> None:
    top = qcow2_chain(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # A name a converted parent would take exists: nothing is written, it is untouched.
    (out / "mid.vhd").write_bytes(b"mine")
    code, _, err = blktap("convert", "--keep-chain", "-O", "vhd", f"qcow2:{top}",
                          out / "top.vhd")
    assert code == 17, err
    assert "out/mid.vhd: already exists (a layer of the converted chain" in err
    assert sorted(os.listdir(out)) == ["mid.vhd"]
    assert (out / "mid.vhd").read_bytes() == b"mine"
    # Two layers that would take one name.
    code, _, err = blktap("convert", "--keep-chain", "--layer-name", "p.{ext}",
                          f"qcow2:{top}", out / "top.qcow2")
    assert code == 22 and "would both be named" in err
    # raw has no parent link; --keep-chain and -B exclude each other.
    code, _, err = blktap("convert", "--keep-chain", f"qcow2:{top}", out / "x.raw")
    assert code == 22 and "a raw image has no parent link" in err
    code, _, err = blktap("convert", "--keep-chain", "-B", top, f"qcow2:{top}",
                          out / "x.qcow2")
    assert code == 22 and "exclude each other" in err
    # A loop in the chain.
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", a.name, "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", b.name, "-F", "qcow2", a)
    code, _, err = blktap("convert", "--keep-chain", f"qcow2:{b}", out / "b.qcow2")
    assert code == 40 and "loops back" in err  # ELOOP
    # A missing parent.
    (tmp_path / "mid.qcow2").rename(tmp_path / "gone.qcow2")
    code, _, err = blktap("convert", "--keep-chain", f"qcow2:{top}", out / "t.qcow2")
    assert code == 2 and "mid.qcow2 not found" in err
    assert sorted(os.listdir(out)) == ["mid.vhd"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer that fails after the ones below it were built, and a name taken between
    the check and the linking: no new layer is left under any name."""
    top = qcow2_chain(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    names = [str(out / n) for n in ("top.vhd", "mid.vhd", "base.vhd")]
    real_copy = chain_convert._copy_layer

    def failing(chain, depth, image, sparse, progress):  # noqa: ANN001, ANN202
        if depth == 0:
            raise OSError(28, "No space left on device")
        return real_copy(chain, depth, image, sparse, progress)

    with Chain.open(f"qcow2:{top}") as chain:
        monkeypatch.setattr(chain_convert, "_copy_layer", failing)
        with pytest.raises(OSError):
            chain_convert.convert_chain(chain, names, "vhd")
        assert os.listdir(out) == []
        monkeypatch.setattr(chain_convert, "_copy_layer", real_copy)
        # The leaf's name appears after the check: base and mid are linked first, then
        # the leaf's link fails; base and mid are removed again, the stranger stays.
        (out / "top.vhd").write_bytes(b"stranger")
        with pytest.raises(FormatError):
            chain_convert.convert_chain(chain, names, "vhd")
        assert os.listdir(out) == ["top.vhd"]
        assert (out / "top.vhd").read_bytes() == b"stranger"


def test_same_format_chains(tmp_path: Path) -> None:
    """qcow2 to qcow2 and VHD to VHD keep their chains too (a copy layer by layer)."""
    top = qcow2_chain(tmp_path)
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = blktap("convert", "--keep-chain", f"qcow2:{top}", out / "top.qcow2")
    assert code == 0, err
    res = run(["qemu-img", "compare", str(top), str(out / "top.qcow2")], text=True)
    assert res.returncode == 0, res.stdout
    assert [Path(x["filename"]).name for x in json.loads(qemu_img(
        "info", "--backing-chain", "--output=json", out / "top.qcow2"))] == \
        ["top.qcow2", "mid.qcow2", "base.qcow2"]
    for depth in range(3):
        assert own_sectors(f"qcow2:{out / 'top.qcow2'}", depth) == \
            own_sectors(f"qcow2:{top}", depth)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    code, _, err = blktap("convert", "--keep-chain", f"qcow2:{top}", v1 / "top.vhd")
    assert code == 0, err
    code, _, err = blktap("convert", "--keep-chain", f"vhd:{v1 / 'top.vhd'}",
                          v2 / "top.vhd")
    assert code == 0, err
    for name in ("top.vhd", "mid.vhd", "base.vhd"):
        assert vhd_util("check", "-n", v2 / name)[0] == 0
    for depth in range(3):
        assert own_sectors(f"vhd:{v2 / 'top.vhd'}", depth) == \
            own_sectors(f"vhd:{v1 / 'top.vhd'}", depth)
    served_compare(top, v2 / "top.vhd", tmp_path)
