"""Docs that run: every shell block of README's tour and of docs/cli.md is executed in a
scratch folder (tests/docblocks.py says how blocks are found and marked), so that the
docs cannot drift from the commands."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from docblocks import Block, blocks, setup

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLKTAP_")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp)
    return env


def _run(script: str, cwd: Path, what: str, *, clean: bool = True) -> None:
    (cwd / ".venv").exists() or (cwd / ".venv").symlink_to(VENV_BIN.parent)
    res = subprocess.run(["bash", "-c", "set -eo pipefail\n"
                          "trap 'echo \"doc-test: failed: $BASH_COMMAND\" >&2' ERR\n" + script],
                         cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{what}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    for path in cwd.iterdir() if clean else ():  # examples make GiB-sized files: keep none
        if path.is_file() and not path.is_symlink():
            path.unlink()


def test_block_finder() -> None:
    md = ("```\nblktap info IMAGE\n```\n<!-- doc-test: skip: needs Xen -->\n```sh\nxl list\n"
          "```\n```\n$ true\nout\n$ false  # exit 1\n```\n```json\n{}\n```\n")
    found = blocks(md)
    assert [(b.lang, b.skip, b.transcript) for b in found] == [
        ("sh", "needs Xen", False), ("", None, True)]
    script = found[1].script()
    assert "( true\n)" in script and "-ne 0" in script and "-ne 1" in script
    assert "out" not in script.replace("stdout", "")


@pytest.mark.slow
def test_readme_tour(tmp_path: Path) -> None:
    """The tour's blocks in order, in one folder, as a reader pastes them."""
    text = (ROOT / "README.md").read_text()
    tour = blocks(text, "A quick tour")
    assert len(tour) >= 2
    try:
        for block in tour:
            if block.skip:
                continue
            _run(block.script(), tmp_path, f"README.md:{block.line}")
    finally:  # a tour that failed half-way may leave its tapdisk (run/ctl<pid>) running
        for ctl in (tmp_path / "run").glob("ctl[0-9]*"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(ctl.name[3:]), signal.SIGTERM)


CLI = (ROOT / "docs" / "cli.md").read_text()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files docs/cli.md's setup mark makes, made once and copied for each block."""
    made = tmp_path_factory.mktemp("cli-setup")
    _run(setup(CLI), made, "docs/cli.md setup", clean=False)
    return made


@pytest.mark.parametrize("block", blocks(CLI), ids=lambda b: f"cli.md:{b.line}")
def test_cli_doc_block(block: Block, cli_files: Path, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    for f in cli_files.iterdir():
        if f.is_file() and not f.is_symlink():
            subprocess.run(["cp", "--sparse=always", str(f), str(tmp_path)], check=True)
    _run(block.script(), tmp_path, f"docs/cli.md:{block.line}")


OPS = (ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("block", blocks(OPS), ids=lambda b: f"operations.md:{b.line}")
def test_operations_doc_block(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    _run(block.script(), tmp_path, f"docs/operations.md:{block.line}")
