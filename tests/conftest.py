"""Shared test fixtures: the reference images, temporary folders, real peers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BLKTAP_SHARED", ROOT.parent / "shared"))
FIXTURE_TARBALL = SHARED / "fixtures" / "vhd-reference.tar.gz"
VENV_BIN = Path(sys.executable).parent
# The guest stand-ins (torture/vhost_user_frontend.py, torture/xen_guest.py) live with the
# torture harness, which uses them too and must not import from tests/.
if str(ROOT / "torture") not in sys.path:
    sys.path.append(str(ROOT / "torture"))


def _hup_ignored_here(signum: int, frame: object) -> None:
    """SIGHUP stays ignored in pytest itself (it was started under nohup)."""


def pytest_configure(config: pytest.Config) -> None:
    """The tools the tests start must meet the signal dispositions an operator's shell
    gives them. Started in the background of a non-interactive shell, or under nohup,
    pytest has SIGINT or SIGHUP ignored, and an ignored signal stays ignored across exec:
    the tests of Ctrl-C and hangups would then test nohup's behaviour instead. A handler
    is reset to the default at exec, so one is installed for each ignored signal."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _hup_ignored_here)


def tool(name: str) -> str:
    """Path of one of our console scripts (in the venv running the tests)."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def named(path: str | os.PathLike[str]) -> str:
    """``FORMAT:PATH`` for an image the test made itself: the format probed, then named.
    The library opens the parents of a named image only (a probed one may have been
    written by a guest, docs/security.md); a test about something else names it."""
    from blktap.image.chain import probe

    kind = "vhd" if probe(os.fspath(path)) == "vhd" else "aio"  # aio: both Chain and tapdisk
    return f"{kind}:{os.fspath(path)}"


def need(program: str) -> str:
    """Path of a real peer program, or skip the test saying what is missing."""
    found = shutil.which(program)
    if found is None:
        pytest.skip(f"{program} not installed (make test installs it)")
    return found


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("timeout", 300)
    return subprocess.run(argv, **kwargs)


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference fixtures unpacked once per session (treat as read-only; copy before
    changing anything)."""
    if not FIXTURE_TARBALL.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURE_TARBALL} (../shared is absent)")
    dest = tmp_path_factory.mktemp("ref")
    with tarfile.open(FIXTURE_TARBALL) as tar:
        tar.extractall(dest, filter="data")
    return dest / "vhd-reference"


@pytest.fixture
def ref_copy(reference_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the reference fixtures."""
    dest = tmp_path / "ref"
    shutil.copytree(reference_dir, dest)
    return dest


def expected(reference_dir: Path, name: str) -> str:
    """An expected output with @DIR@ replaced by where the images are."""
    text = (reference_dir / "expect" / name).read_text()
    return text.replace("@DIR@", str(reference_dir))


def with_engine(body: Callable[[Any], Awaitable[Any]], engine_class: type | None = None,
                *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
                **kwargs: Any) -> Any:
    """Run ``body(engine)`` on a fresh event loop (asyncio's, or ``loop_factory``'s)
    with a fresh I/O engine (a ThreadEngine of 4 threads unless told otherwise), closed
    after."""
    from blktap.io import ThreadEngine

    async def main() -> Any:
        engine = (engine_class or ThreadEngine)(**{"threads": 4, **kwargs})
        try:
            return await body(engine)
        finally:
            engine.close()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())



# ----------------------------------------------------------------------------- Xen testbed
XEN_TESTBED = SHARED / "xen-testbed"
XEN_BUILD_TIMEOUT = 1800


def apt_mirror() -> str | None:
    """The first Debian mirror this machine's apt uses (deb822 ``.sources`` or one-line
    ``.list`` files). The testbed's build.sh looks for it too, but stops under ``set -o
    pipefail`` when /etc/apt/sources.list is absent (as on Debian 12 images that only have
    sources.list.d/debian.sources): we hand it over as MIRROR."""
    import glob

    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if not uri.rstrip("/").endswith("-security"):
                        return uri
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if len(words) >= 3 and words[0] == "deb":
                uri = next((w for w in words[1:] if not w.startswith("[")), "")
                if uri and not uri.rstrip("/").endswith("-security"):
                    return uri
    return None


# The CPU the testbed's QEMU emulates. Its default, `-cpu max,-smap,-smep`, offers AVX2 and
# friends, which QEMU 7.2 had only just learnt to emulate under TCG; with it, dom0's user
# space crashed now and then under host load (xl, xenstore-read and python3 segfaulting in
# libc, a `sleep` spinning at full CPU so that the rig's script never went on: issue 12's
# "dom0 fell silent"). Xen's own CI runs `qemu64,+svm`; here, under the same load, it gave
# no segfault in the runs we made.
XEN_RIG_CPU = "qemu64,+svm"


def xen_rig_env(work: Path) -> dict[str, str]:
    """The environment of a testbed run: its build, and our CPU unless one was chosen."""
    env = dict(os.environ, XEN_TESTBED_DIR=str(work))
    env.setdefault("QEMU_CPU", XEN_RIG_CPU)
    return env


@pytest.fixture(scope="session")
def xen_testbed() -> Path:
    """The Xen testbed built once (``XEN_TESTBED_DIR``, default /var/tmp/xen-testbed).
    Building needs root and the Debian mirror; where it cannot be built the Xen guest
    tests skip with the reason, except in CI (``CI`` set), where that is a failure: CI
    must prove the Xen path, not skip it."""
    if not (XEN_TESTBED / "run.sh").exists():
        pytest.skip(f"no xen testbed at {XEN_TESTBED} (../shared is absent)")
    work = Path(os.environ.get("XEN_TESTBED_DIR", "/var/tmp/xen-testbed"))

    def cannot(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(f"the Xen testbed could not be built in CI: {reason}")
        pytest.skip(reason)

    if not (work / ".built").exists():
        if os.geteuid() != 0:
            cannot(f"the xen testbed is not built in {work} and building needs root")
        env = dict(os.environ, XEN_TESTBED_DIR=str(work))
        if "MIRROR" not in env and (mirror := apt_mirror()):
            env["MIRROR"] = mirror
        try:
            r = subprocess.run(["bash", str(XEN_TESTBED / "build.sh")], env=env,
                               capture_output=True, text=True, timeout=XEN_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            cannot(f"building the xen testbed took over {XEN_BUILD_TIMEOUT} s")
        else:
            if r.returncode != 0:
                cannot("the xen testbed did not build: " + (r.stdout + r.stderr)[-1500:])
    if shutil.which("qemu-system-x86_64") is None:
        cannot("qemu-system-x86_64 is missing (the testbed's build.sh installs it)")
    return work


# ----------------------------------------------------------------------------- Ceph
@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway single-node Ceph (tests/ceph_cluster.py) for the session: one
    monitor, one memstore OSD, auth none, on loopback. Skips when Debian's ceph packages
    are not installed (scripts/install-deps.sh installs them), except in CI (``CI``
    set), where that is a failure."""
    from blktap.errors import BlktapError
    from blktap.image.rbd import bindings
    from ceph_cluster import CephCluster, missing_programs

    missing = missing_programs()
    reason = ""
    if missing:
        reason = f"ceph is not installed ({', '.join(missing)} missing; make test installs it)"
    else:
        try:
            bindings()
        except BlktapError as exc:
            reason = str(exc)
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = CephCluster.start(tmp_path_factory.mktemp("ceph"))
    try:
        yield cluster
    finally:
        cluster.stop()
