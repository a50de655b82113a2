"""The options every ``blktap`` command shares, as an operator who knows qemu-img expects
them: ``--output=json`` (alias ``--json``), ``-p`` progress with rate and ETA, ``-q``,
``-v``/``--debug``, usage errors that point at the subcommand's help, ``--version`` on
every console script, and write errors that name the file and the offset."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.cli.common import Progress, format_duration
from conftest import run, tool

MiB = 1 << 20


def blktap(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return run([tool("blktap"), *map(str, args)], text=True, **kwargs)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    with src.open("wb") as f:
        f.truncate(32 * MiB)
        f.write(os.urandom(20 * MiB))
    return src


# ------------------------------------------------------------------------------ output
def test_output_json_on_every_reporting_command(tmp_path: Path, source: Path) -> None:
    vhd = tmp_path / "a.vhd"
    created = blktap("create", vhd, "33M", "--output=json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout) == {"image": str(vhd), "format": "vhd",
                                          "type": "dynamic", "virtual_size": 34 * MiB}
    assert "rounded" not in created.stderr  # the JSON says the size made
    raw = json.loads(blktap("create", tmp_path / "r.img", "1M", "--json").stdout)
    assert raw["format"] == "raw" and raw["type"] == "sparse"
    snap = json.loads(blktap("snapshot", tmp_path / "s.vhd", vhd, "--output=json").stdout)
    assert snap["type"] == "differencing" and snap["parent"] == str(vhd)
    conv = blktap("convert", source, tmp_path / "c.qcow2", "--output=json")
    assert conv.returncode == 0, conv.stderr
    report = json.loads(conv.stdout)
    assert report["format"] == "qcow2" and report["written"] == 20 * MiB
    assert report["virtual_size"] == 32 * MiB
    for argv in (["info", source], ["map", source], ["compare", source, tmp_path / "c.qcow2"],
                 ["check", tmp_path / "c.qcow2"]):
        one = blktap(*argv, "--output=json")
        other = blktap(*argv, "--json")
        assert one.returncode == other.returncode == 0, one.stderr
        assert json.loads(one.stdout) == json.loads(other.stdout)
    bad = blktap("info", source, "--output=yaml")
    assert bad.returncode == errno.EINVAL and "info" in bad.stderr


# ------------------------------------------------------------------------------ progress
def test_progress_line_has_rate_and_eta() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = Progress("copying", 100 * MiB, out, enabled=True, redraw=False,
                   clock=lambda: now[0])
    now[0] += 2.0
    bar.update(25 * MiB)
    line = out.getvalue().splitlines()[-1]
    assert " 25%" in line and "12.5 MiB/s" in line and "ETA 0:06" in line
    now[0] += 0.5
    bar.update(30 * MiB)  # within a second of the last line: nothing new
    assert len(out.getvalue().splitlines()) == 1
    now[0] += 6.0
    bar.update(100 * MiB)
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert "100%" in last and "ETA" not in last
    assert len(out.getvalue().splitlines()) == 2  # the end is said once
    assert format_duration(3723) == "1:02:03" and format_duration(59.6) == "1:00"


def test_p_shows_progress_into_a_pipe_and_q_hides_it(tmp_path: Path, source: Path) -> None:
    shown = blktap("convert", "-p", source, tmp_path / "a.raw")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith("converting")]
    assert lines and "100%" in lines[-1] and "/s" in lines[-1]
    assert "\r" not in shown.stderr  # lines of their own, not a redrawn bar, in a log
    plain = blktap("convert", source, tmp_path / "b.raw")
    assert plain.stderr == ""  # not a terminal, no -p: silent, as before
    quiet = blktap("convert", "-p", "-q", source, tmp_path / "c.raw")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_q_prints_nothing_but_errors(tmp_path: Path) -> None:
    """As qemu-img's -q: the exit code tells; JSON asked for is still printed."""
    noted = blktap("create", tmp_path / "a.vhd", "33M")
    assert "note: size rounded up" in noted.stderr and noted.stdout.startswith("Created")
    quiet = blktap("create", "-q", tmp_path / "b.vhd", "33M")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    failed = blktap("create", "-q", tmp_path / "b.vhd", "33M")
    assert failed.returncode == errno.EEXIST and failed.stderr.startswith("blktap: ")
    differ = blktap("compare", "-q", tmp_path / "a.vhd", tmp_path / "nope.vhd")
    assert differ.returncode == errno.ENOENT and differ.stdout == ""
    asked = blktap("info", "-q", "--output=json", tmp_path / "b.vhd")
    assert json.loads(asked.stdout)["virtual_size"] == 34 * MiB


def test_v_and_debug_log_on_stderr(tmp_path: Path, source: Path) -> None:
    verbose = blktap("convert", "-v", source, tmp_path / "a.vhd")
    assert verbose.returncode == 0
    assert "blktap: INFO: converting" in verbose.stderr
    assert "DEBUG" not in verbose.stderr
    debug = blktap("--debug", "convert", source, tmp_path / "b.vhd")
    assert "blktap: DEBUG: building" in debug.stderr
    assert blktap("convert", source, tmp_path / "c.vhd").stderr == ""


# ------------------------------------------------------------------------------ usage
@pytest.mark.parametrize("argv,command", [
    (["convert", "--frobnicate", "a", "b"], "convert"),
    (["info", "x", "y"], "info"),
    (["check", "-r", "some", "x"], "check"),
    (["measure", "--size"], "measure"),
])
def test_usage_error_names_the_subcommand_help(argv: list[str], command: str) -> None:
    proc = blktap(*argv)
    assert proc.returncode == errno.EINVAL
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"blktap: {command}: ")
    assert line.endswith(f"(see 'blktap {command} --help')")


@pytest.mark.parametrize("script", ["blktap", "vhd-util", "tap-ctl", "tapdisk", "tapback",
                                    "blktap-xen-hotplug"])
def test_version_on_every_console_script(script: str) -> None:
    proc = run([tool(script), "--version"], text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(script) and proc.stdout.count("\n") == 1


def test_legacy_tools_keep_their_usage() -> None:
    """Only a lone --version is new: anything else is the reference's behaviour."""
    proc = run([tool("vhd-util"), "--version", "x"], text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vhd-util COMMAND")
    proc = run([tool("tap-ctl")], text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tap-ctl COMMAND")


# ------------------------------------------------------------------------------ ENOSPC
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    proc = run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
@pytest.mark.parametrize("mode", ["tmpfile", "folder"])
def test_disk_full_names_file_and_offset_and_leaves_nothing(
        small_fs: Path, source: Path, fmt: str, mode: str) -> None:
    dst = small_fs / f"out.{fmt}"
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1" if mode == "folder" else "")
    proc = blktap("convert", source, dst, env=env)
    assert proc.returncode == errno.ENOSPC
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"blktap: {dst}: No space left on device at offset ")
    offset = int(line.rsplit(" ", 1)[1])
    assert 0 < offset < 32 * MiB
    assert list(small_fs.iterdir()) == []
