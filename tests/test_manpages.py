"""The man pages generated from the commands (make man) render without a warning."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from blktap.cli.manpage import pages, roff
from conftest import run


def test_roff_escapes() -> None:
    assert roff(".start\n'quote\na\\b -x") == "\\&.start\n\\&'quote\na\\eb \\-x"


def test_every_tool_has_a_page_that_renders(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed")
    res = run([sys.executable, "-m", "blktap.cli.manpage", "--out", str(tmp_path)], text=True)
    assert res.returncode == 0, res.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.[18]"))
    assert written == ["man1/blktap.1", "man8/tap-ctl.8", "man8/tapback.8",
                       "man8/tapdisk.8", "man8/vhd-util.8"]
    env = dict(os.environ, LC_ALL="C.UTF-8")
    for rel in written:
        res = run([groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / rel)], env=env,
                  text=True)
        assert res.returncode == 0 and res.stderr == "", (rel, res.stderr)
    text = run([groff, "-man", "-Tascii", str(tmp_path / "man1/blktap.1")], env=env,
               text=True).stdout
    for word in ("exporter", "serve", "--metrics", "--run", "convert"):
        assert word in text.replace("\b", "").replace("_", ""), word
    man = shutil.which("man")
    if man is not None:  # man -l as a person would read it
        res = run([man, "-P", "cat", "-l", str(tmp_path / "man8/tap-ctl.8")], env=env,
                  text=True)
        assert res.returncode == 0 and "unpause" in res.stdout


def test_pages_cover_every_command() -> None:
    from blktap.cli import tap_ctl, vhd_util

    text = pages()
    for cmd in vhd_util.COMMANDS:
        if vhd_util.handler_of(cmd) is not None:
            assert f".SS {cmd}\n" in text["man8/vhd-util.8"], cmd
    for cmd in tap_ctl.COMMANDS:
        assert f".SS {cmd}\n" in text["man8/tap-ctl.8"], cmd
