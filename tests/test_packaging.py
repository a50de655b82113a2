"""The wheel: built offline from this tree, installed into a fresh venv, every console
script it declares runs (--help) from there; its metadata says Linux, the licence, and
ships the LICENSE file and the systemd units."""

from __future__ import annotations

import configparser
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", str(out), str(ROOT)], text=True, timeout=600)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build offline here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("blktap-*.whl")
    return whl


def test_wheel_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "License: LGPL-2.1-or-later" in meta
    assert any(n.endswith("/LICENSE") for n in names)
    for unit in ("blktap-serve@.service", "tapback.service", "blktap-exporter.service"):
        assert f"blktap/data/systemd/{unit}" in names


def test_fresh_venv_runs_every_console_script(wheel: Path, tmp_path: Path) -> None:
    """The venv gets the wheel only; its dependencies come from the venv running the
    tests (a .pth naming that site-packages, after the venv's own, so that the blktap
    imported is the wheel's and not this tree's)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    own_site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], text=True, check=True).stdout.strip())
    (own_site / "zz-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
               "--no-index", "-q", str(wheel)], text=True, timeout=600)
    if res.returncode != 0 and "no such option: --python" in res.stderr:
        res = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                   "--target", str(own_site), str(wheel)], text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    where = run([str(py), "-c", "import blktap, cryptography; print(blktap.__file__)"],
                text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(own_site)), where.stdout
    with zipfile.ZipFile(wheel) as z:
        ep = z.read(next(n for n in z.namelist()
                         if n.endswith(".dist-info/entry_points.txt"))).decode()
    cp = configparser.ConfigParser()
    cp.read_string(ep)
    scripts = list(cp["console_scripts"])
    assert {"blktap", "vhd-util", "tap-ctl", "tapdisk", "tapback"} <= set(scripts)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    for name in scripts:
        res = subprocess.run([str(venv / "bin" / name), "--help"], capture_output=True,
                             text=True, timeout=120, env=env, cwd=tmp_path)
        # The legacy tools answer --help as the reference does (usage, exit 0; the hotplug
        # script's usage error is EINVAL, as libxl expects of it).
        assert res.returncode in (0, 22), (name, res.returncode, res.stderr)
        assert "usage" in (res.stdout + res.stderr).lower(), name
        assert "Traceback" not in res.stderr, (name, res.stderr)


def test_the_wheel_carries_the_compiled_inline_path(wheel: Path) -> None:
    """Where the tests run, a compiler is present (scripts/install-deps.sh): the wheel
    holds the NBD transport's compiled inline path."""
    from blktap.transport.nbd import inline
    if not inline.available():
        pytest.skip("the extension is not built in this tree (no C compiler)")
    with zipfile.ZipFile(wheel) as z:
        assert any(n.startswith("blktap/transport/nbd/_inline.") and n.endswith(".so")
                   for n in z.namelist())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_a_machine_without_a_compiler_still_builds_a_pure_python_wheel(tmp_path: Path) -> None:
    """The extension is optional: with a compiler that fails (CC=false) the wheel is
    still built, pure Python, and the NBD transport finds no compiled path in it (the
    Python path then serves: tests/test_fast_path.py runs it so)."""
    # A copy of the sources alone: no build/ folder, no extension built in place.
    src = tmp_path / "src-tree"
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name if src.exists() else _mkdir(src) / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    env = {**os.environ, "CC": "false", "LDSHARED": "false"}
    res = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", str(out), str(src)], text=True, timeout=600,
              env=env)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build offline here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("blktap-*.whl")
    with zipfile.ZipFile(whl) as z:
        assert not any(n.endswith(".so") for n in z.namelist())
        z.extractall(tmp_path / "tree")
    probe = run([sys.executable, "-c",
                 "from blktap.transport.nbd import inline; "
                 "print(inline.available(), inline.compiled())"],
                text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "tree")})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "None"]
