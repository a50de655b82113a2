"""The README's tour runs verbatim: its shell blocks, in order, in a scratch folder, with
the venv's commands on PATH (the tour's first line activates it). The block of ``blktap
serve`` lines is left out: those serve until interrupted (their own tests cover them)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from conftest import ROOT, need, tool

TOUR_SECTIONS = ("## A quick tour", "### A running disk")


def tour_blocks() -> list[str]:
    text = (Path(ROOT) / "README.md").read_text()
    start = text.index(TOUR_SECTIONS[0])
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```sh\n(.*?)^```$", text[start:end], re.S | re.M)
    return [b for b in blocks if not b.lstrip().startswith("blktap serve")]


def test_the_tour_has_its_blocks() -> None:
    blocks = tour_blocks()
    assert len(blocks) == 2
    assert "other-base.vhd" in blocks[0] and "tap-ctl create" in blocks[1]


def test_the_readme_tour_runs_verbatim(tmp_path: Path) -> None:
    need("qemu-io")
    bin_dir = str(Path(tool("blktap")).parent)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("BLKTAP_CONTROL_DIR", None)
    env.pop("BLKTAP_LOG_DIR", None)
    script = "set -e\n" + "\n".join(
        line for block in tour_blocks() for line in block.splitlines()
        if line.strip() != ". .venv/bin/activate")
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    # what the comments promise
    assert "leaf.vhd is valid" in out
    assert re.search(r"/run/tapdisk/tapdisk-0$", out, re.M), out
    assert re.search(r"^pid=\d+ minor=0 state=0x2a ", out, re.M), out
    assert '"images": [ { "name": ' in out
    # destroy stopped the tapdisk and freed the minor
    assert list((tmp_path / "run" / "tapdisk").iterdir()) == []
    assert not any(p.name.startswith(("ctl", "nbd")) for p in (tmp_path / "run").iterdir())
