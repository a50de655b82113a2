"""Damaged qcow2 images (random bytes over the metadata) raise BlktapError, never another
exception, when opened, read, written and checked."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.errors import BlktapError
from blktap.image.chain import Chain
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from qcow2_helpers import qemu_img, qemu_io

MiB = 1 << 20


def _template(folder: Path) -> bytes:
    img = folder / "t.qcow2"
    create(str(img), MiB, cluster_size=512, extended_l2=False)
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        for i in range(0, 2048, 97):
            chain.write(i, bytes([i % 251 + 1]) * 512)
        chain.leaf.write_zeroes(1000, 64)
    return img.read_bytes()


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), min_size=1,
                max_size=12))
def test_damaged_metadata_raises_only_blktap_errors(flips: list[tuple[int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = bytearray(_template(folder))
        for pos, value in flips:
            raw[pos % min(len(raw), 8192)] = value
        img = folder / "bad.qcow2"
        img.write_bytes(raw)
        try:
            with Chain.open(f"qcow2:{img}") as chain:
                chain.read(0, chain.sectors)
        except BlktapError:
            pass
        try:
            check(str(img))
        except BlktapError:
            pass
        try:
            with Chain.open(f"qcow2:{img}", writable=True) as chain:
                chain.write(5, b"\x01" * 1024)
                chain.leaf.discard(0, 64)
        except BlktapError:
            pass


def _qemu_template(folder: Path, options: list[str], extra: str) -> bytes:
    src = folder / "s.raw"
    src.write_bytes((b"abc" * 1000 + bytes(range(256)) * 12) * 100)
    out = folder / "q.qcow2"
    qemu_img("convert", *options, "-O", "qcow2", "-o", extra, src, out)
    qemu_img("snapshot", "-c", "s1", out)
    qemu_io(out, "write -z 0 64k", "write -P 3 100k 20k")
    return out.read_bytes()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(("-c",), "cluster_size=16384"),
                        ((), "cluster_size=16384,extended_l2=on")]),
       st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 255)), min_size=1,
                max_size=10))
def test_damaged_qemu_images_raise_only_blktap_errors(
        layout: tuple[tuple[str, ...], str], flips: list[tuple[int, int]]) -> None:
    """Compressed clusters, extended L2, a snapshot, zero clusters: damage anywhere, then
    read, check, repair and write."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = bytearray(_qemu_template(folder, list(layout[0]), layout[1]))
        for pos, value in flips:
            raw[pos % len(raw)] = value
        img = folder / "bad.qcow2"
        img.write_bytes(raw)
        for step in ("read", "check", "repair", "write"):
            try:
                if step == "read":
                    with Chain.open(f"qcow2:{img}") as chain:
                        chain.read(0, chain.sectors)
                elif step == "check":
                    check(str(img))
                elif step == "repair":
                    check(str(img), repair="all")
                else:
                    with Chain.open(f"qcow2:{img}", writable=True) as chain:
                        chain.write(5, b"\x01" * 1024)
                        chain.leaf.write_zeroes(200, 100)
            except BlktapError:
                pass
