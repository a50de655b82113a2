"""vhd-util snapshot killed at every file change: the parent never changes, and the child
is either absent or complete and valid; trying again then succeeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import faults
from blktap.image import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import create, snapshot
from conftest import named

MB = 1 << 20


def content(path: Path) -> bytes:
    with Chain.open(named(path)) as chain:
        return bytes(chain.read(0, chain.sectors))


@pytest.mark.parametrize("kind", ["vhd", "raw", "prealloc"])
def test_kill_at_every_change(tmp_path: Path, kind: str) -> None:
    if kind == "raw":
        parent = tmp_path / "parent.raw"
        parent.write_bytes(os.urandom(4 * MB))
    else:
        parent = tmp_path / "parent.vhd"
        create(str(parent), 8 * MB)
        with Chain.open(named(parent), writable=True) as chain:
            chain.pwrite(MB, os.urandom(3 * MB))
    child = tmp_path / "child.vhd"
    pristine = parent.read_bytes()
    view = content(parent)

    def make() -> None:
        snapshot(str(child), str(parent), raw_parent=kind == "raw",
                 prealloc_size=64 * MB if kind == "prealloc" else None)

    total = faults.count_mutations(make)
    child.unlink()
    assert total >= 2
    for n in range(total + 1):
        finished = faults.crash_after(make, n)
        assert parent.read_bytes() == pristine, n
        if child.exists():
            result = vhd_check.check(str(child))
            assert result.errno == 0, (n, result.results[0].messages)
            assert content(child) == view, n
        else:
            assert not finished
            make()  # the next attempt is not blocked by what the dead one left
            assert content(child) == view
        child.unlink()
    # Nothing but the images and the dead attempts' private folders remain.
    leftovers = {p.name for p in tmp_path.iterdir()} - {parent.name}
    assert all(name.startswith(".blktap-") for name in leftovers), leftovers
