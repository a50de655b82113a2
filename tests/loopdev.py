"""A pytest fixture attaching files to loop devices, for the block-device paths (images and
journals on logical volumes, as XenServer's storage manager keeps them). Skips cleanly
where loop devices cannot be had (not root, no losetup, no free device)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import run


@pytest.fixture
def loop_device() -> Iterator[Callable[[Path], str]]:
    """Attach files to loop devices (root and losetup needed), detached afterwards."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    attached: list[str] = []

    def attach(backing: Path) -> str:
        proc = run(["losetup", "-f", "--show", str(backing)], text=True)
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return attached[-1]

    yield attach
    for dev in attached:
        run(["losetup", "-d", dev])
