"""The modern maintenance commands: blktap coalesce, resize, rebase."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from blktap.image import Chain
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from conftest import run, tool

MB = 1 << 20


def content(path: Path) -> bytes:
    with Chain.open(f"vhd:{path}") as chain:
        return bytes(chain.read(0, chain.sectors))


def blktap(*argv: str, cwd: Path | None = None):  # noqa: ANN201
    return run([tool("blktap"), *argv], text=True, cwd=cwd)


def three_levels(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    create(str(base), 32 * MB)
    with Chain.open(f"vhd:{base}", writable=True) as chain:
        chain.pwrite(0, b"\x01" * (4 * MB))
    snapshot(str(mid), str(base))
    with Chain.open(f"vhd:{mid}", writable=True) as chain:
        chain.pwrite(MB, b"\x02" * (3 * MB))
        chain.pwrite(20 * MB, b"\x03" * 4096)
    snapshot(str(top), str(mid))
    with Chain.open(f"vhd:{top}", writable=True) as chain:
        chain.pwrite(2 * MB, b"\x04" * 512)
    return base, mid, top


def test_coalesce_rebase_children_and_remove(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    other = tmp_path / "other.vhd"  # a sibling that must not be touched
    snapshot(str(other), str(base))
    before_top = content(top)
    before_other = other.read_bytes()
    proc = blktap("coalesce", f"vhd:{mid}", "--rebase-children", "--remove")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Coalesced {mid} into {base}: 3076 KiB (3149824 bytes) in 3 "
                               f"blocks (")
    assert lines[1:] == [f"Rebased {top} onto {base}", f"Removed {mid}"]
    assert not mid.exists()
    assert content(top) == before_top
    assert other.read_bytes() == before_other
    with VhdImage.open(str(top)) as img:
        assert os.path.samefile(img.parent_path(), base)
    for path in (base, top):
        assert vhd_check.check(str(path)).errno == 0


def test_coalesce_json(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    proc = blktap("coalesce", f"vhd:{top}", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["image"] == str(top)
    assert report["parent"] == str(mid)
    assert report["sectors"] == 1 and report["bytes"] == 512 and report["blocks"] == 1
    assert report["rebased"] == [] and report["removed"] is False
    assert top.exists()


def test_remove_refused_while_children_use_it(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    before = base.read_bytes()
    proc = blktap("coalesce", f"vhd:{mid}", "--remove")
    assert proc.returncode == 22
    assert proc.stdout == ""
    assert proc.stderr == (f"blktap: not removing {mid}: {top} still use it as their parent "
                           f"(add --rebase-children)\n")
    assert base.read_bytes() == before  # refused before anything was written
    assert mid.exists()


def test_coalesce_errors_are_one_line(tmp_path: Path) -> None:
    base, _, _ = three_levels(tmp_path)
    proc = blktap("coalesce", str(base))
    assert proc.returncode == 22
    assert proc.stderr == (f"blktap: {base}: coalescing of non-differencing disks is not "
                           f"supported\n")
    proc = blktap("coalesce", str(tmp_path / "missing.vhd"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    proc = blktap("coalesce", f"raw:{base}")
    assert proc.returncode == 22
    assert "works on VHD images" in proc.stderr


# ------------------------------------------------------------------ rebase
def test_rebase_keeps_content_and_copies_only_differences(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    before = content(top)
    proc = blktap("rebase", f"vhd:{top}", str(base), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # mid held 3 MiB + 4 KiB over base; top already held 512 bytes of it itself.
    assert report["copied_bytes"] <= 3 * MB + 4096
    assert report["copied_bytes"] >= 3 * MB - 64 * 1024
    assert report["parent"] == str(base)
    assert content(top) == before
    with VhdImage.open(str(top)) as img:
        assert os.path.samefile(img.parent_path(), base)
    assert vhd_check.check(str(top)).errno == 0


def test_rebase_onto_unrelated_disk_and_raw(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    before = content(top)
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(32 * MB))
    proc = blktap("rebase", f"vhd:{top}", str(other), "--raw-parent")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Rebased {top} onto {other} (")
    assert content(top) == before
    with VhdImage.open(str(top)) as img:
        assert img.parent_is_raw


def test_rebase_unsafe_only_switches_pointers(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    size_before = top.stat().st_size
    proc = blktap("rebase", f"vhd:{top}", str(base), "--unsafe")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Rebased {top} onto {base} (pointers only)\n"
    assert top.stat().st_size == size_before
    with Chain.open(f"vhd:{top}") as chain:
        assert chain.pread(MB, 512) == b"\x01" * 512  # mid's data is no longer seen


def test_rebase_killed_at_any_point_keeps_content(tmp_path: Path) -> None:
    import faults
    from blktap.image.vhd.rebase import rebase

    base, mid, top = three_levels(tmp_path)
    before = content(top)
    pristine = top.read_bytes()
    total = faults.count_mutations(lambda: rebase(str(top), str(base)))
    assert total > 5
    for n in faults.kill_points(total, 40):
        top.write_bytes(pristine)
        faults.crash_after(lambda: rebase(str(top), str(base)), n)
        assert content(top) == before, n
        assert vhd_check.check(str(top)).errno == 0, n


def test_rebase_refusals(tmp_path: Path) -> None:
    base, mid, top = three_levels(tmp_path)
    proc = blktap("rebase", str(base), f"vhd:{mid}")
    assert proc.returncode == 22 and "not a differencing disk" in proc.stderr
    # A plain path to a differencing parent is a probed one: refused before any change.
    proc = blktap("rebase", f"vhd:{top}", str(mid))
    assert proc.returncode == errno.EPERM and "vhd:" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = blktap("rebase", f"vhd:{mid}", f"vhd:{top}")  # top's parent is mid: a loop
    assert proc.returncode == 40, proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = blktap("rebase", f"vhd:{top}", str(tmp_path / "missing.vhd"))
    assert proc.returncode == 2


# ------------------------------------------------------------------ encrypted chains
def test_encrypted_chain_info_convert_rebase(tmp_path: Path) -> None:
    from blktap.image.vhd.copy import copy_chain

    key = os.urandom(64)
    key_file = tmp_path / "disk.key"
    key_file.write_bytes(key)
    clear = tmp_path / "clear.vhd"
    create(str(clear), 8 * MB)
    with Chain.open(f"vhd:{clear}", writable=True) as chain:
        chain.pwrite(0, os.urandom(3 * MB))
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    with Chain.open(f"vhd:{clear}") as chain:
        copy_chain(chain, str(base), key=key)
    snapshot(str(mid), str(base))
    with Chain.open(f"vhd:{mid}", writable=True, key=key) as chain:
        chain.pwrite(MB, b"\x05" * (2 * MB))
    snapshot(str(top), str(mid))
    with Chain.open(f"vhd:{top}", writable=True, key=key) as chain:
        chain.pwrite(0, b"\x06" * 4096)
        want = bytes(chain.read(0, chain.sectors))

    info = json.loads(blktap("info", f"vhd:{top}", "--json").stdout)
    assert info["encrypted"] is True
    assert all(layer["encrypted"] for layer in info["chain"])
    assert blktap("map", f"vhd:{top}").returncode == 0

    out = tmp_path / "out.raw"
    proc = blktap("convert", f"vhd:{top}", str(out))
    assert proc.returncode == 22 and "key is needed" in proc.stderr
    proc = blktap("convert", f"vhd:{top}", str(out), "--key-file", str(key_file))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == want
    proc = blktap("compare", f"vhd:{top}", str(out), "--key-file", str(key_file))
    assert proc.returncode == 0, proc.stderr

    proc = blktap("rebase", f"vhd:{top}", str(base), "--key-file", str(key_file))
    assert proc.returncode == 0, proc.stderr
    with Chain.open(f"vhd:{top}", key=key) as chain:
        assert bytes(chain.read(0, chain.sectors)) == want
        assert os.path.samefile(chain.layers[1].path, base)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(64))
    proc = blktap("convert", f"vhd:{top}", str(tmp_path / "x.raw"), "--key-file", str(wrong))
    assert proc.returncode == 126 and proc.stderr.count("\n") == 1


# ------------------------------------------------------------------ resize / revert
def test_resize_fast_then_journaled_keeps_content(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhd"
    create(str(disk), 10 * MB, prealloc_size=100 * MB)
    with Chain.open(f"vhd:{disk}", writable=True) as chain:
        chain.pwrite(0, os.urandom(4 * MB))
    before = content(disk)
    proc = blktap("resize", str(disk), "50M")
    assert proc.returncode == 0, proc.stderr
    assert "(fast: within the preallocated metadata)" in proc.stdout
    proc = blktap("resize", str(disk), "200M", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"image": str(disk), "format": "vhd",
                                       "old_size": 50 * MB, "new_size": 200 * MB,
                                       "method": "journaled"}
    after = content(disk)
    assert len(after) == 200 * MB  # not 250: the reference's bug
    assert after[: len(before)] == before
    assert after[len(before):] == bytes(190 * MB)
    assert vhd_check.check(str(disk)).errno == 0
    assert [p.name for p in tmp_path.iterdir()] == ["d.vhd"]  # the journal is gone


def test_resize_refusals_and_raw(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhd"
    create(str(disk), 10 * MB)
    proc = blktap("resize", str(disk), "4M")
    assert proc.returncode == 38 and proc.stderr.count("\n") == 1
    proc = blktap("resize", str(disk), "3000G")
    assert proc.returncode == 22 and proc.stderr.count("\n") == 1
    raw = tmp_path / "r.img"
    raw.write_bytes(b"\x01" * MB)
    proc = blktap("resize", str(raw), "3M")
    assert proc.returncode == 0, proc.stderr
    assert raw.read_bytes() == b"\x01" * MB + bytes(2 * MB)
    assert blktap("resize", str(raw), "1K").returncode == 38


def test_revert_an_interrupted_resize(tmp_path: Path) -> None:
    import faults
    from blktap.image.vhd.resize import resize

    disk = tmp_path / "d.vhd"
    journal = tmp_path / "j"
    create(str(disk), 20 * MB)
    with Chain.open(f"vhd:{disk}", writable=True) as chain:
        chain.pwrite(0, os.urandom(2 * MB))
    pristine = disk.read_bytes()
    total = faults.count_mutations(lambda: resize(str(disk), 4 * 1024 * MB,
                                                  journal=str(journal)))
    disk.write_bytes(pristine)
    # Killed half way through changing the image: it is disabled until reverted.
    assert not faults.crash_after(lambda: resize(str(disk), 4 * 1024 * MB,
                                                 journal=str(journal)), total - 2)
    proc = blktap("info", str(disk))
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    proc = blktap("revert", str(disk), str(journal))
    assert proc.returncode == 0, proc.stderr
    assert disk.read_bytes() == pristine
    assert not journal.exists()
