"""Coalesce: the reference fixtures, random chains, sparse mode, crashes, bad input."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faults
from blktap.errors import ChainError, OutOfRange, ParentNotFound, UnsupportedImage
from blktap.image import Chain
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.coalesce import coalesce
from conftest import expected, named, need, run, tool

MB = 1 << 20


def content(path: str | Path) -> bytes:
    with Chain.open(named(path)) as chain:
        return bytes(chain.read(0, chain.sectors))


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(content(path)).hexdigest()


def assert_valid(path: str | Path) -> None:
    result = vhd_check.check(str(path))
    assert result.errno == 0, result.results[0].messages


def write(path: str | Path, offset: int, data: bytes) -> None:
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(offset, data)


# ------------------------------------------------------------------ reference fixtures
def test_fixture_cchild_into_copy_of_base(reference_dir: Path, tmp_path: Path) -> None:
    """cbase.vhd was a copy of base.vhd into which the reference coalesced cchild.vhd."""
    shutil.copy(reference_dir / "base.vhd", tmp_path / "cbase.vhd")
    shutil.copy(reference_dir / "cchild.vhd", tmp_path / "cchild.vhd")
    child_before = content(tmp_path / "cchild.vhd")
    proc = run([tool("vhd-util"), "coalesce", "-n", "cchild.vhd"], cwd=tmp_path, text=True)
    assert proc.returncode == 0, proc.stderr
    # The reference prints no newline; the fixture file has one added.
    assert proc.stdout == expected(reference_dir, "cchild.coalesce").rstrip("\n")
    want = (reference_dir / "expect" / "cbase.sha256").read_text().split()[0]
    assert sha256_of(tmp_path / "cbase.vhd") == want
    assert content(tmp_path / "cchild.vhd") == child_before
    query = run([tool("vhd-util"), "query", "-n", "cbase.vhd", "-v", "-s", "-p", "-f", "-m",
                 "-d", "-S", "-a"], cwd=tmp_path, text=True)
    assert query.stdout == expected(reference_dir, "cbase.query")
    bitmap = run([tool("vhd-util"), "read", "-B", "-n", "cbase.vhd"], cwd=tmp_path)
    assert bitmap.stdout.hex() == expected(reference_dir, "cbase.bitmap").strip()
    check = run([tool("vhd-util"), "check", "-n", "cbase.vhd"], cwd=tmp_path, text=True)
    assert check.stdout == "cbase.vhd is valid\n"


def test_fixture_raw_parent(reference_dir: Path, tmp_path: Path) -> None:
    shutil.copy(reference_dir / "raw-parent.img", tmp_path / "raw-parent.img")
    shutil.copy(reference_dir / "rawchild.vhd", tmp_path / "rawchild.vhd")
    proc = run([tool("vhd-util"), "coalesce", "-n", "rawchild.vhd"], cwd=tmp_path, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Coalesced ") and not proc.stdout.endswith("\n")
    raw = (tmp_path / "raw-parent.img").read_bytes()
    want = (reference_dir / "expect" / "rawchild.sha256").read_text().split()[0]
    assert hashlib.sha256(raw).hexdigest() == want
    assert os.path.getsize(tmp_path / "raw-parent.img") == \
        os.path.getsize(reference_dir / "raw-parent.img")


def test_fixture_snap2_into_snap1_then_chain_reads_the_same(reference_dir: Path,
                                                            tmp_path: Path) -> None:
    for name in ("base.vhd", "snap1.vhd", "snap2.vhd"):
        shutil.copy(reference_dir / name, tmp_path / name)
    want = (reference_dir / "expect" / "snap2.sha256").read_text().split()[0]
    proc = run([tool("vhd-util"), "coalesce", "-n", "snap2.vhd"], cwd=tmp_path, text=True)
    assert proc.returncode == 0, proc.stderr
    # snap1 now reads as snap2 did; our check and the reference-format check agree.
    assert sha256_of(tmp_path / "snap1.vhd") == want
    assert sha256_of(tmp_path / "snap2.vhd") == want
    assert_valid(tmp_path / "snap1.vhd")
    assert run([tool("vhd-util"), "check", "-n", "snap1.vhd", "-p"],
               cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------ behaviour
def make_pair(tmp_path: Path, size: int = 16 * MB) -> tuple[Path, Path]:
    parent, child = tmp_path / "parent.vhd", tmp_path / "child.vhd"
    create(str(parent), size)
    write(parent, 0, b"\x01" * (3 * MB))  # blocks 0 and 1 (1 partly)
    write(parent, 9 * MB, b"\x02" * 4096)  # block 4, partly
    snapshot(str(child), str(parent))
    write(child, 512, b"\x03" * 1024)  # inside an allocated parent block
    write(child, 2 * MB + 3 * 512, b"\x04" * 2048)  # block 1, merges bitmaps
    write(child, 6 * MB, b"\x05" * (2 * MB))  # block 3, a full block, new in the parent
    write(child, 12 * MB - 512, b"\x06" * 1024)  # straddles blocks 5 and 6
    return parent, child


def test_parent_reads_as_child_did(tmp_path: Path) -> None:
    parent, child = make_pair(tmp_path)
    child_view = content(child)
    result = coalesce(str(child))
    assert result.sectors == (1024 + 2048 + 2 * MB + 1024) // 512
    assert result.blocks == 5
    assert content(parent) == child_view
    assert content(child) == child_view
    assert_valid(parent)
    assert vhd_check.check(str(parent), vhd_check.CheckOptions(check_bitmaps=True)).errno == 0
    with VhdImage.open(str(parent)) as img:
        assert img.block_full(3)  # the batmap learnt that block 3 is full
        assert img.footer_source == "primary"


@pytest.mark.interop
def test_qemu_reads_the_coalesced_parent(tmp_path: Path) -> None:
    qemu_img = need("qemu-img")
    parent, child = make_pair(tmp_path)
    child_view = content(child)
    coalesce(str(child))
    out = tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(parent), str(out)],
                   check=True)
    assert out.read_bytes()[: len(child_view)] == child_view


@pytest.mark.interop
def test_fixed_parent(tmp_path: Path) -> None:
    """A fixed parent takes the child's runs in place; qemu reads the result."""
    qemu_img = need("qemu-img")
    parent, child = tmp_path / "fixed.vhd", tmp_path / "c.vhd"
    create(str(parent), 8 * MB, fixed=True)
    write(parent, 0, b"\x01" * (3 * MB))
    snapshot(str(child), str(parent))
    write(child, MB + 512, b"\x02" * 1536)
    write(child, 4 * MB, b"\x03" * (2 * MB))
    child_view = content(child)
    size = parent.stat().st_size
    result = coalesce(str(child))
    assert result.sectors == (1536 + 2 * MB) // 512
    assert content(parent) == child_view
    assert parent.stat().st_size == size
    assert_valid(parent)
    out = tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(parent), str(out)],
                   check=True)
    assert out.read_bytes()[: len(child_view)] == child_view


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    parent, child = make_pair(tmp_path)
    coalesce(str(child))
    first = content(parent)
    size = os.path.getsize(parent)
    again = coalesce(str(child))
    assert again.sectors > 0
    assert content(parent) == first
    assert os.path.getsize(parent) == size


def test_sparse_skips_zero_blocks_of_a_dynamic_parent(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(str(parent), 16 * MB)
    snapshot(str(child), str(parent))
    write(child, 0, bytes(2 * MB))  # a written block of zeros
    write(child, 4 * MB, bytes(4096))  # zeros inside a block
    write(child, 8 * MB, b"\x07" * 512)
    before = content(child)
    proc = run([tool("vhd-util"), "coalesce", "-n", str(child), "-s"], text=True)
    assert proc.returncode == 0, proc.stderr
    sectors = (2 * MB + 4096 + 512) // 512
    assert proc.stdout == f"opening for sparse writes\nCoalesced {sectors} sectors"
    with VhdImage.open(str(parent)) as img:
        assert img.allocated_block_numbers() == [4]
    assert content(parent) == before


def test_sparse_still_copies_zeros_over_a_differencing_parent(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "b.vhd", tmp_path / "m.vhd", tmp_path / "t.vhd"
    create(str(base), 8 * MB)
    write(base, 0, b"\x09" * (2 * MB))
    snapshot(str(mid), str(base))
    snapshot(str(top), str(mid))
    write(top, 0, bytes(2 * MB))  # zeros that hide the base's data
    before = content(top)
    coalesce(str(top), sparse=True)
    assert content(mid) == before


def test_progress_lines(tmp_path: Path) -> None:
    parent, child = make_pair(tmp_path)
    proc = run([tool("vhd-util"), "coalesce", "-n", str(child), "-p"])  # bytes: keep \r
    assert proc.returncode == 0
    shown = proc.stdout.decode().split("\r")
    assert shown[0] == ""
    assert shown[1:9] == [f"{i * 12.5:6.2f}%" for i in range(8)]
    assert shown[9] == "100.00%\nCoalesced 4104 sectors"


# ------------------------------------------------------------------ random chains
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 30), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_random_chains(tmp_path_factory: pytest.TempPathFactory, depth: int, seed: int,
                       data: st.DataObject) -> None:
    """Coalescing any level into its parent makes the parent read as that level did, and
    leaves every descendant's content identical."""
    tmp = tmp_path_factory.mktemp("chain")
    rng = random.Random(seed)
    size = 8 * MB
    paths = [tmp / "l0.vhd"]
    create(str(paths[0]), size)
    for level in range(depth + 1):
        if level:
            paths.append(tmp / f"l{level}.vhd")
            snapshot(str(paths[-1]), str(paths[-2]), skip_empty=False)
        with Chain.open(named(paths[-1]), writable=True) as chain:
            for _ in range(rng.randrange(0, 4)):
                off = rng.randrange(0, size // 512 - 1) * 512
                n = rng.randrange(1, min(4096, size // 512 - off // 512)) * 512
                chain.pwrite(off, bytes([rng.randrange(1, 256)]) * n)
    level = data.draw(st.integers(1, depth), label="level")
    views = [content(p) for p in paths]
    coalesce(str(paths[level]))
    assert content(paths[level - 1]) == views[level]
    for deeper in range(level, depth + 1):
        assert content(paths[deeper]) == views[deeper]
    assert_valid(paths[level - 1])
    if level == 1:  # the base is a plain dynamic disk: qemu reads it too
        qemu_img = shutil.which("qemu-img")
        if qemu_img:
            out = tmp / "base.raw"
            subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(paths[0]),
                            str(out)], check=True)
            assert out.read_bytes()[:size] == views[1]


# ------------------------------------------------------------------ crash safety
def test_kill_at_every_write_into_a_vhd_parent(tmp_path: Path) -> None:
    parent, child = make_pair(tmp_path, 32 * MB)
    write(child, 14 * MB, os.urandom(MB))  # one more new block, partly written
    rng = random.Random(7)
    for _ in range(12):  # scattered writes: new blocks, existing ones, several runs each
        write(child, rng.randrange(16 * MB, 32 * MB - 65536, 512),
              bytes([rng.randrange(1, 256)]) * rng.randrange(512, 65536, 512))
    parent_before = content(parent)
    child_view = content(child)
    pristine_parent = parent.read_bytes()
    pristine_child = child.read_bytes()

    def restore() -> None:
        parent.write_bytes(pristine_parent)
        child.write_bytes(pristine_child)

    total = faults.count_mutations(lambda: coalesce(str(child)))
    assert total >= 40
    points = faults.kill_points(total, 120)
    for n in points:
        restore()
        finished = faults.crash_after(lambda: coalesce(str(child)), n)
        assert child.read_bytes() == pristine_child, n  # coalesce never writes the child
        assert_valid(parent)
        assert content(child) == child_view, n
        got = content(parent)
        # Every sector of the parent holds its old data or the child's.
        for i in range(0, len(got), 64 * 1024):
            a, b, c = got[i : i + 65536], parent_before[i : i + 65536], child_view[i : i + 65536]
            if a not in (b, c):
                for j in range(0, 65536, 512):
                    assert a[j : j + 512] in (b[j : j + 512], c[j : j + 512]), (n, i + j)
        if finished:
            assert got == child_view
        # Running it again finishes the job.
        coalesce(str(child))
        assert content(parent) == child_view, n
        assert_valid(parent)
    assert len(points) >= 40


def test_kill_at_every_write_into_a_raw_parent(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.raw", tmp_path / "c.vhd"
    parent.write_bytes(os.urandom(8 * MB))
    snapshot(str(child), str(parent), raw_parent=True)
    write(child, 0, b"\x11" * 4096)
    write(child, 3 * MB, b"\x12" * (2 * MB))
    child_view = content(child)
    pristine = parent.read_bytes()
    total = faults.count_mutations(lambda: coalesce(str(child)))
    for n in range(total + 1):
        parent.write_bytes(pristine)
        faults.crash_after(lambda: coalesce(str(child)), n)
        assert content(child) == child_view
        coalesce(str(child))
        assert parent.read_bytes() == child_view


# ------------------------------------------------------------------ bad input
def test_library_errors(tmp_path: Path) -> None:
    dyn = tmp_path / "d.vhd"
    create(str(dyn), 4 * MB)
    with pytest.raises(UnsupportedImage):
        coalesce(str(dyn))
    child = tmp_path / "c.vhd"
    snapshot(str(child), str(dyn))
    other = tmp_path / "other.vhd"
    create(str(other), 4 * MB)
    os.replace(other, dyn)  # same name, another disk
    with pytest.raises(ChainError, match="not the parent"):
        coalesce(str(child))
    os.unlink(dyn)
    with pytest.raises(ParentNotFound):
        coalesce(str(child))


def test_child_larger_than_parent_is_refused_before_any_write(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(str(parent), 4 * MB)
    snapshot(str(child), str(parent), prealloc_size=8 * MB)
    # Grow the child's virtual size by hand (as a fast resize of the child alone would).
    with VhdImage.open(str(child), writable=True) as img:
        from dataclasses import replace
        img.write_footers(replace(img.footer, curr_size=8 * MB))
    write(child, 6 * MB, b"\x01" * 512)
    before = parent.read_bytes()
    with pytest.raises(OutOfRange):
        coalesce(str(child))
    assert parent.read_bytes() == before


@pytest.mark.parametrize("case, rc, lines", [
    ("missing", 2, ["error opening {p}: -2", "error coalescing: -2"]),
    ("empty", 32, ["error opening {p}: -32", "error coalescing: -32"]),
    ("garbage", 22, ["error opening {p}: -22", "error coalescing: -22"]),
    ("dynamic", 22, ["coalescing of non-differencing disks is not supported",
                     "error coalescing: -22"]),
    ("fixed", 22, ["coalescing of non-differencing disks is not supported",
                   "error coalescing: -22"]),
    ("orphan", 2, ["error finding {p} parent: -2", "error coalescing: -2"]),
])
def test_cli_bad_input(tmp_path: Path, case: str, rc: int, lines: list[str]) -> None:
    path = tmp_path / "x.vhd"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(64 * 1024))
    elif case == "dynamic":
        create(str(path), 4 * MB)
    elif case == "fixed":
        create(str(path), 4 * MB, fixed=True)
    elif case == "orphan":
        create(str(tmp_path / "gone.vhd"), 4 * MB)
        snapshot(str(path), str(tmp_path / "gone.vhd"))
        os.unlink(tmp_path / "gone.vhd")
    before = path.read_bytes() if path.exists() else None
    proc = run([tool("vhd-util"), "coalesce", "-n", str(path)], text=True)
    assert proc.returncode == rc
    assert proc.stdout == "".join(line.format(p=path) + "\n" for line in lines)
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.parametrize("argv", [[], ["-n"], ["-h"], ["-n", "x", "extra"], ["-o", "x"],
                                  ["-n", "x", "-a", "y"], ["-x", "1", "-n", "x"]])
def test_cli_usage(argv: list[str]) -> None:
    proc = run([tool("vhd-util"), "coalesce", *argv], text=True)
    assert proc.returncode == 22
    assert proc.stdout == "options: <-n name> [-s sparse] [-p progress] [-h help]\n"


def test_cli_unwritable_parent(tmp_path: Path) -> None:
    """A parent the caller may not write: one line, the errno, nothing changed."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run as another user")
    import tempfile
    shared = Path(tempfile.mkdtemp(prefix="blktap-test-", dir="/tmp"))
    try:
        _unwritable_parent(shared, setpriv)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _unwritable_parent(folder: Path, setpriv: str) -> None:
    parent, child = make_pair(folder)
    os.chmod(folder, 0o755)  # the unprivileged user may enter, not write
    os.chmod(parent, 0o444)
    os.chmod(child, 0o444)
    before = parent.read_bytes()
    proc = run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                tool("vhd-util"), "coalesce", "-n", str(child)], text=True)
    if "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
        pytest.skip("the venv is not readable by the unprivileged user")
    assert proc.returncode == 13, (proc.stdout, proc.stderr)
    assert proc.stdout == f"error opening {parent}: -13\nerror coalescing: -13\n"
    assert parent.read_bytes() == before


def test_real_sigkill_during_vhd_util_coalesce(tmp_path: Path) -> None:
    """The fault hook simulates a kill between system calls; this one is a real SIGKILL
    at whatever moment the process has reached."""
    import signal
    import time

    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(str(parent), 128 * MB)
    snapshot(str(child), str(parent))
    rng = random.Random(3)
    with Chain.open(named(child), writable=True) as chain:
        for blk in rng.sample(range(64), 40):
            chain.pwrite(blk * 2 * MB + rng.randrange(0, 8) * 65536,
                         os.urandom(rng.choice([65536, 2 * MB - 8 * 65536])))
    child_view = content(child)
    pristine = parent.read_bytes()
    for delay in (0.05, 0.1, 0.15, 0.2, 0.3):
        parent.write_bytes(pristine)
        proc = subprocess.Popen([tool("vhd-util"), "coalesce", "-n", str(child)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert_valid(parent)
        assert content(child) == child_view
        coalesce(str(child))
        assert content(parent) == child_view
