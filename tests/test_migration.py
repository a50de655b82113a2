"""The live storage migration of docs/migration.md, run as printed there, while a
libnbd client writes a known pattern throughout and moves to the destination at the
switch: the destination then reads exactly the source's old data plus every write the
client saw acknowledged (qemu-img compare), and the mirror never failed."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need, run, tool
from test_tapdisk_live import BLOCK, SYSTEM_PYTHON, replay

MiB = 1 << 20
SIZE = 32 * MiB
BLOCKS = 64  # the writer cycles over the first 4 MiB
HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "migration.md"


def migration_script() -> str:
    """The script exactly as docs/migration.md prints it."""
    text = DOC.read_text()
    m = re.search(r"<!-- migrate\.sh begins -->\n```bash\n(.*?)```\n<!-- migrate\.sh ends -->",
                  text, re.S)
    assert m, "docs/migration.md lost its script markers"
    return m[1]


class Writer:
    def __init__(self, sock: Path, tmp: Path) -> None:
        self.log = tmp / "writes.log"
        self.stop_file = tmp / "stop"
        self.switch_file = tmp / "switch"
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(HERE / "migrating_writer.py"), str(sock), str(self.log),
             str(self.stop_file), str(self.switch_file), str(BLOCKS)],
            stderr=subprocess.PIPE, text=True, cwd=HERE)

    def count(self) -> int:
        try:
            return len(self.log.read_text().split())
        except FileNotFoundError:
            return 0

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"the writer is stuck at {self.count()}"
            time.sleep(0.01)

    def finish(self) -> tuple[int, str]:
        self.stop_file.touch()
        rc = self.proc.wait(60)
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert rc == 0, err
        return self.count(), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop_tapdisks(env: dict[str, str], control: Path) -> None:
    """Whatever is left serving (after a failure) is destroyed."""
    if not control.exists():
        return
    listing = run([tool("tap-ctl"), "list"], env=dict(env, BLKTAP_CONTROL_DIR=str(control)),
                  text=True).stdout
    for pid, minor in re.findall(r"pid=(\d+) minor=(\d+)", listing):
        run([tool("tap-ctl"), "destroy", "-p", pid, "-m", minor],
            env=dict(env, BLKTAP_CONTROL_DIR=str(control)))


def common_env(tmp_path: Path, bin_dir: Path) -> dict[str, str]:
    need("qemu-io")
    need("qemu-img")
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no system python3 with libnbd")
    return dict(os.environ, BLKTAP_LOG_DIR=str(tmp_path / "log"), TAPDISK=tool("tapdisk"),
                PATH=f"{bin_dir}:{os.environ['PATH']}")


def source_disk(tmp_path: Path, env: dict[str, str], src_control: Path,
                *open_args: str) -> tuple[Path, bytearray, str, str]:
    """The source VHD with data only the copy moves, served: (leaf, its content outside
    the writer's range, pid, minor)."""
    leaf = tmp_path / "src.vhd"
    assert run([tool("blktap"), "create", str(leaf), "32M"]).returncode == 0
    # 1M-2M is also in the writer's range: the copy writes its old bytes into the
    # destination's base, under the mirrored new ones in its leaf.
    res = run([need("qemu-io"), "-f", "vpc", "-c", "write -P 0x77 8M 4M",
               "-c", "write -P 0x78 20M 1M", "-c", "write -P 0x79 1M 1M", str(leaf)],
              text=True)
    assert res.returncode == 0, res.stderr
    expected = bytearray(SIZE)
    expected[8 * MiB:12 * MiB] = b"\x77" * 4 * MiB
    expected[20 * MiB:21 * MiB] = b"\x78" * MiB
    src_env = dict(env, BLKTAP_CONTROL_DIR=str(src_control))
    out = run([tool("tap-ctl"), "create", "-a", f"vhd:{leaf}", *open_args], env=src_env,
              text=True)
    assert out.returncode == 0, out.stderr
    minor = out.stdout.strip().rsplit("-", 1)[1]
    listing = run([tool("tap-ctl"), "list", "-m", minor], env=src_env, text=True).stdout
    pid = re.match(r"pid=(\d+) ", listing)[1]  # type: ignore[index]
    return leaf, expected, pid, minor


def switch_hook(tmp_path: Path) -> Path:
    """SWITCH for the script: tell the writer the destination's socket, wait until it
    has moved."""
    switch = tmp_path / "switch.sh"
    switch.write_text(f"""#!/bin/bash
# Move the NBD client: tell it the destination's socket, wait until it has moved.
set -e
echo "$3" > {tmp_path}/switch.tmp && mv {tmp_path}/switch.tmp {tmp_path}/switch
for _ in $(seq 1200); do [ -e {tmp_path}/switch.done ] && exit 0; sleep 0.05; done
exit 1
""")
    switch.chmod(0o755)
    return switch


@pytest.mark.slow
def test_live_migration_script(tmp_path: Path) -> None:
    src_control, dst_control = tmp_path / "src-run", tmp_path / "dst-run"
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    env = common_env(tmp_path, Path(tool("tap-ctl")).parent)
    leaf, expected, pid, minor = source_disk(tmp_path, env, src_control)
    switch = switch_hook(tmp_path)
    script = tmp_path / "migrate.sh"
    script.write_text(migration_script())

    writer = Writer(src_control / f"nbd{pid}.{minor}", tmp_path)
    try:
        migrate_and_check(env, tmp_path, writer, pid, minor, src_control, dst_control,
                          dst_dir, leaf, switch, script, expected)
    finally:
        writer.kill()
        stop_tapdisks(env, src_control)
        stop_tapdisks(env, dst_control)


def migrate_and_check(env: dict[str, str], tmp_path: Path, writer: Writer, pid: str,
                      minor: str, src_control: Path, dst_control: Path, dst_dir: Path,
                      leaf: Path, switch: Path, script: Path, expected: bytearray) -> None:
    src_env = dict(env, BLKTAP_CONTROL_DIR=str(src_control))
    try:
        writer.wait_for(BLOCKS + 10)
        mig = run(["bash", str(script)], text=True, timeout=600,
                  env=dict(env, SRC_CONTROL=str(src_control), DST_CONTROL=str(dst_control),
                           SRC_PID=pid, SRC_MINOR=minor, SRC_LEAF=str(leaf),
                           DST_DIR=str(dst_dir), SWITCH=str(switch)))
        assert mig.returncode == 0, mig.stdout + mig.stderr
        dest = re.fullmatch(r"pid=(\d+) minor=(\d+)\n", mig.stdout)
        assert dest, mig.stdout
        assert "Copied " in mig.stderr and "Images are identical." in mig.stderr, mig.stderr
        at_switch = writer.count()
        writer.wait_for(at_switch + 50)  # writing on to the destination
        n, err = writer.finish()
        assert "switched to" in err
    finally:
        writer.kill()
    # The source is gone; the destination serves.
    assert not run([tool("tap-ctl"), "list"], env=src_env, text=True).stdout.strip()
    expected[:BLOCKS * BLOCK] = replay(n, BLOCKS * BLOCK)
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    dpid, dminor = dest[1], dest[2]
    uri = f"nbd+unix:///?socket={dst_control}/nbd{dpid}.{dminor}"
    cmp = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", uri, str(want)],
              text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    dst_env = dict(env, BLKTAP_CONTROL_DIR=str(dst_control))
    assert run([tool("tap-ctl"), "destroy", "-p", dpid, "-m", dminor],
               env=dst_env).returncode == 0
    # The destination files alone (no tapdisk) hold it too.
    cmp = run([tool("blktap"), "compare", f"vhd:{dst_dir}/leaf.vhd", f"aio:{want}"],
              text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.slow
def test_migration_rolls_back_when_the_mirror_breaks(tmp_path: Path) -> None:
    """The destination's leaf tapdisk dies during the copy: the copy's --check-mirror
    fails, the script stops before any switch and the source serves alone again, with
    every write the client saw acknowledged."""
    src_control, dst_control = tmp_path / "src-run", tmp_path / "dst-run"
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    # blktap, wrapped: before the copy, kill the destination leaf's tapdisk and wait
    # until the source has declared its mirror failed (-t 3 bounds that).
    wrap = tmp_path / "bin"
    wrap.mkdir()
    (wrap / "blktap").write_text(f"""#!/bin/bash
if [ "$1" = copy ]; then
    d=$(BLKTAP_CONTROL_DIR={dst_control} tap-ctl list | grep 'leaf.vhd$' | cut -d' ' -f1)
    d=${{d#pid=}}
    kill -9 $d
    for _ in $(seq 600); do
        tap-ctl stats -p $SRC_PID -m $SRC_MINOR | grep -q '"nbd_mirror_failed": 1,' && break
        sleep 0.1
    done
fi
exec {tool("blktap")} "$@"
""")
    (wrap / "blktap").chmod(0o755)
    env = common_env(tmp_path, wrap)
    env["PATH"] = f"{wrap}:{Path(tool('tap-ctl')).parent}:{os.environ['PATH']}"
    leaf, expected, pid, minor = source_disk(tmp_path, env, src_control, "-t", "3")
    script = tmp_path / "migrate.sh"
    script.write_text(migration_script())
    writer = Writer(src_control / f"nbd{pid}.{minor}", tmp_path)
    src_env = dict(env, BLKTAP_CONTROL_DIR=str(src_control))
    try:
        writer.wait_for(BLOCKS + 10)
        mig = run(["bash", str(script)], text=True, timeout=600,
                  env=dict(env, SRC_CONTROL=str(src_control), DST_CONTROL=str(dst_control),
                           SRC_PID=pid, SRC_MINOR=minor, SRC_LEAF=str(leaf),
                           DST_DIR=str(dst_dir), SWITCH=str(switch_hook(tmp_path))))
        assert mig.returncode != 0, mig.stdout + mig.stderr
        assert "migration failed at step 'copy'" in mig.stderr, mig.stderr
        assert "is failed: write of" in mig.stderr, mig.stderr
        assert not (tmp_path / "switch").exists()
        st = run([tool("tap-ctl"), "stats", "-p", pid, "-m", minor], env=src_env, text=True)
        assert '"mirror"' not in st.stdout and '"nbd_mirror_failed": 0' in st.stdout
        at = writer.count()
        writer.wait_for(at + 50)  # the source serves on, alone
        n, _ = writer.finish()
        expected[:BLOCKS * BLOCK] = replay(n, BLOCKS * BLOCK)
        want = tmp_path / "expected.raw"
        want.write_bytes(expected)
        uri = f"nbd+unix:///?socket={src_control}/nbd{pid}.{minor}"
        cmp = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", uri, str(want)],
                  text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        writer.kill()
        stop_tapdisks(env, src_control)
        stop_tapdisks(env, dst_control)
