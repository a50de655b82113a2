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
