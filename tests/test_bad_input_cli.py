"""Bad images through the command-line tools: one clear line, a nonzero exit code (the
reference's errno), no traceback, and the file left byte for byte as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import corrupt as C
from blktap.image import Chain
from blktap.image.vhd import create, snapshot
from conftest import named, run, tool

MB = 1 << 20


def _dynamic(tmp: Path) -> str:
    path = str(tmp / "d.vhd")
    create(path, 16 * MB)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(0, b"a" * 8192)
        chain.pwrite(5 * MB, b"b" * 4096)
    return path


def _child(tmp: Path) -> str:
    base = _dynamic(tmp)
    child = str(tmp / "c.vhd")
    snapshot(child, base)
    with Chain.open(named(child), writable=True) as chain:
        chain.pwrite(MB, b"c" * 4096)
    return child


def _loop(tmp: Path) -> str:
    a = _child(tmp)
    b = str(tmp / "b.vhd")
    snapshot(b, a)
    C.make_parent_loop(a, b)
    return b


def _missing(tmp: Path) -> str:
    child = _child(tmp)
    C.make_missing_parent(child)
    return child


# name -> (builder, damage); damage None means the builder already made it bad.
CASES: dict[str, tuple[Callable[[Path], str], Callable[[str], None] | None]] = {
    "truncated": (_dynamic, lambda p: C.truncate(p, 2000)),
    "footer-cookie": (_dynamic, C.damage_footer_cookie),
    "footer-checksum": (_dynamic, C.damage_footer_checksum),
    "header-cookie": (_dynamic, C.damage_header_cookie),
    "header-checksum": (_dynamic, C.damage_header_checksum),
    "bat-past-eof": (_dynamic, C.damage_bat_entry_past_eof),
    "bat-into-metadata": (_dynamic, C.damage_bat_entry_into_metadata),
    "bat-overlap": (_dynamic, C.damage_bat_overlap),
    "block-size": (_dynamic, C.damage_block_size),
    "curr-size": (_dynamic, C.damage_curr_size),
    "max-bat-size": (_dynamic, C.damage_max_bat_size),
    "locator-length": (_child, C.damage_locator_length),
    "locator-offset": (_child, C.damage_locator_offset),
    "parent-loop": (_loop, None),
    "missing-parent": (_missing, None),
}


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(params=sorted(CASES))
def bad_image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    build, damage = CASES[request.param]
    path = build(tmp_path)
    if damage is not None:
        damage(path)
    return request.param, path


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_blktap_info_one_line(bad_image: tuple[str, str]) -> None:
    case, path = bad_image
    before = digest(path)
    proc = run([tool("blktap"), "info", path], text=True)
    assert proc.returncode != 0, case
    _no_traceback(proc)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("blktap: ")
    assert digest(path) == before


def test_vhd_util_check_rejects(bad_image: tuple[str, str]) -> None:
    case, path = bad_image
    before = digest(path)
    proc = run([tool("vhd-util"), "check", "-p", "-n", path], text=True)
    _no_traceback(proc)
    assert proc.returncode in (2, 22, 40), (case, proc.returncode, proc.stdout)
    lines = proc.stdout.splitlines()
    assert not all(line.endswith(" is valid") for line in lines)
    if case == "parent-loop":  # each image is fine alone; the walk up the chain is not
        assert lines[-1] == "error checking parents: -40"
    assert digest(path) == before


def test_vhd_util_query_and_read_do_not_crash(bad_image: tuple[str, str]) -> None:
    _, path = bad_image
    before = digest(path)
    for argv in (["query", "-n", path, "-v", "-s", "-p", "-f", "-m", "-d", "-a", "-S"],
                 ["read", "-p", "-n", path],
                 ["read", "-e", "0", "-c", "32768", "-n", path],
                 ["scan", path],
                 ["scan", "-f", path]):
        proc = run([tool("vhd-util"), *argv], text=True)
        _no_traceback(proc)
        assert proc.returncode >= 0
    assert digest(path) == before


def test_parent_loop_is_named(tmp_path: Path) -> None:
    path = _loop(tmp_path)
    proc = run([tool("vhd-util"), "query", "-n", path, "-d"], text=True)
    assert proc.returncode == 40  # ELOOP: the reference would spin forever
    assert proc.stdout == "error checking chain depth: -40\n"
    proc = run([tool("blktap"), "info", path], text=True)
    assert "loop" in proc.stderr


def test_missing_parent_is_named(tmp_path: Path) -> None:
    path = _missing(tmp_path)
    proc = run([tool("blktap"), "info", f"vhd:{path}"], text=True)
    assert proc.returncode == 2
    assert "parent 'missing-parent.vhd' not found" in proc.stderr


def test_check_names_the_bad_block(tmp_path: Path) -> None:
    path = _dynamic(tmp_path)
    C.damage_bat_entry_into_metadata(path)
    proc = run([tool("vhd-util"), "check", "-n", path], text=True)
    assert proc.returncode == 22
    assert "clobbers headers" in proc.stdout.splitlines()[0]
    assert f"{path} appears invalid; dumping metadata" in proc.stdout


def test_random_bytes_and_directories(tmp_path: Path) -> None:
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(1 << 16))
    for argv in (["vhd-util", "query", "-n", str(junk), "-v"],
                 ["vhd-util", "check", "-n", str(junk)],
                 ["vhd-util", "read", "-p", "-n", str(tmp_path)],
                 ["blktap", "info", str(tmp_path)],
                 ["blktap", "map", f"vhd:{junk}"]):
        proc = run([tool(argv[0]), *argv[1:]], text=True)
        _no_traceback(proc)
        assert proc.returncode != 0, argv
