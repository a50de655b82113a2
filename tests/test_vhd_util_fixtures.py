"""Our vhd-util prints, byte for byte, what the reference C vhd-util printed about the
images it made (../shared/fixtures/vhd-reference.tar.gz)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from blktap.image import Chain
from conftest import expected, named, run, tool

IMAGES = ["base", "big", "cbase", "cchild", "data", "empty", "fixed", "flags", "prealloc",
          "rawchild", "resized", "snap1", "snap2"]
HASHED = [n for n in IMAGES if n != "big"]


def vhd_util(ref: Path, *args: str) -> tuple[bytes, int]:
    """Run our vhd-util in the fixture folder; stdout+stderr together, as recorded."""
    proc = run([tool("vhd-util"), *args], cwd=ref, capture_output=False,
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc.stdout, proc.returncode


@pytest.mark.parametrize("name", IMAGES)
def test_query(reference_dir: Path, name: str) -> None:
    out, rc = vhd_util(reference_dir, "query", "-n", f"{name}.vhd", "-v", "-s", "-p", "-f",
                       "-m", "-d", "-S", "-a")
    text = out.decode()
    if rc:
        text += f"rc={rc}\n"
    assert text == expected(reference_dir, f"{name}.query")


@pytest.mark.parametrize("name", IMAGES)
def test_read_headers(reference_dir: Path, name: str) -> None:
    out, rc = vhd_util(reference_dir, "read", "-p", "-n", f"{name}.vhd")
    assert out.decode() == expected(reference_dir, f"{name}.read")
    assert rc == (22 if name == "fixed" else 0)


@pytest.mark.parametrize("name", IMAGES)
def test_read_bat_bitmap(reference_dir: Path, name: str) -> None:
    out, _ = vhd_util(reference_dir, "read", "-B", "-n", f"{name}.vhd")
    assert out.hex() + "\n" == expected(reference_dir, f"{name}.bitmap")


@pytest.mark.parametrize("name", IMAGES)
def test_check(reference_dir: Path, name: str) -> None:
    out, rc = vhd_util(reference_dir, "check", "-n", f"{name}.vhd")
    assert out.decode() == expected(reference_dir, f"{name}.check")
    assert rc == 0


def test_check_stats(reference_dir: Path) -> None:
    out, rc = vhd_util(reference_dir, "check", "-s", "-n", "snap2.vhd")
    assert out.decode() == expected(reference_dir, "snap2.check-stats")
    assert rc == 0


def test_scan(reference_dir: Path) -> None:
    out, rc = vhd_util(reference_dir, "scan", "-m", "*.vhd")
    assert out.decode() == expected(reference_dir, "scan")
    assert rc == 0


def test_scan_fast(reference_dir: Path) -> None:
    """Fast scan visits images in directory order (glob without sorting) and stops at the
    first failure: the fixed disk, whose offset 0 holds data rather than a footer copy.
    Directory order depends on the file system, so the expected lines are rebuilt in this
    folder's order from what the reference printed for each image."""
    out, rc = vhd_util(reference_dir, "scan", "-f", "-m", "*.vhd")
    lines = {}
    for line in (expected(reference_dir, "scan") + expected(reference_dir, "scan-fast"))\
            .splitlines():
        name = line.split()[0][len("vhd="):]
        lines[name] = line
    want = []
    for entry in os.scandir(reference_dir):
        if not entry.name.endswith(".vhd"):
            continue
        if entry.name == "fixed.vhd":
            want.append("vhd=fixed.vhd scan-error=-22 error-message='opening file'")
            break
        want.append(lines[entry.name])
    assert out.decode().splitlines() == want
    assert rc == 22
    # The reference's own run, in its folder's order, is one of the possible outputs.
    assert expected(reference_dir, "scan-fast").splitlines()[-1] == want[-1]


def test_scan_pretty_tree(reference_dir: Path) -> None:
    out, rc = vhd_util(reference_dir, "scan", "-p", "-m", "*.vhd")
    text = out.decode().splitlines()
    assert rc == 0
    assert text[0].startswith("vhd=flags.vhd ")  # hidden roots first
    assert text[1].startswith("vhd=base.vhd ")
    assert text[2].startswith("   vhd=snap1.vhd ")
    assert text[3].startswith("      vhd=snap2.vhd ")
    assert any(t.endswith("parent=raw-parent.img (not found in scan)") for t in text)
    flat = sorted(line.strip() for line in expected(reference_dir, "scan").splitlines())
    ours = sorted(t.strip().replace(" (not found in scan)", "") for t in text)
    assert ours == flat


@pytest.mark.parametrize("name", HASHED)
def test_content_hash(reference_dir: Path, name: str) -> None:
    """The virtual disk we read through the chain is what the reference tapdisk served."""
    digest = hashlib.sha256()
    with Chain.open(named(reference_dir / f"{name}.vhd")) as chain:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        sector = 0
        while sector < chain.sectors:
            n = min(len(buf) // 512, chain.sectors - sector)
            chain.readinto(sector, view[: n * 512])
            digest.update(view[: n * 512])
            sector += n
    want = (reference_dir / "expect" / f"{name}.sha256").read_text().split()[0]
    assert digest.hexdigest() == want


def test_raw_parent_hash(reference_dir: Path) -> None:
    data = (reference_dir / "raw-parent.img").read_bytes()
    want = (reference_dir / "expect" / "raw-parent.sha256").read_text().split()[0]
    assert hashlib.sha256(data).hexdigest() == want


def test_read_virtual_data_matches_chain(reference_dir: Path) -> None:
    """read -r follows the chain like the library does."""
    out, rc = vhd_util(reference_dir, "read", "-r", "0", "-c", "8192", "-n", "snap2.vhd")
    assert rc == 0
    with Chain.open(named(reference_dir / "snap2.vhd")) as chain:
        assert out == bytes(chain.read(0, 8192))
