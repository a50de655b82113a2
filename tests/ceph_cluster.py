"""A throwaway single-node Ceph cluster for the tests, from Debian's packages.

One monitor and one OSD on memstore (RAM only), no manager (librbd's data path and
``rbd create`` do not need one), authentication off, pools of one replica, every
daemon bound to 127.0.0.1 (the monitor on two free ports picked here, the OSD in its
usual port range on loopback), everything in one temporary folder. Daemons run in the
foreground as our children (``-f``): they are stopped by their pids, never by name.

    cluster = CephCluster.start(tmpdir)
    cluster.rbd("create", "--size", "64M", "rbd/disk")
    ... "rbd:rbd/disk:conf=" + str(cluster.conf) ...
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

PROGRAMS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")
POOL = "rbd"
# memstore keeps every object in RAM; the tests' images are small.
MEMSTORE_BYTES = 1 << 30
COMMAND_TIMEOUT = 60


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class CephError(RuntimeError):
    pass


class CephCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "ceph.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ set-up
    @classmethod
    def start(cls, root: Path) -> CephCluster:
        began = time.monotonic()
        cluster = cls(root)
        try:
            cluster._create()
        except BaseException:
            cluster.stop(remove=False)
            raise
        cluster.start_seconds = time.monotonic() - began
        return cluster

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, CEPH_CONF=str(self.conf))

    def _create(self) -> None:
        root = self.root
        for sub in ("mon", "osd", "run", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        v2, v1 = _free_ports(2)
        self.mon_addrs = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        fsid = str(uuid.uuid4())
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = {self.mon_addrs}
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
keyring = /dev/null
mon allow pool delete = true
mon allow pool size one = true
mon data avail crit = 0
mon data avail warn = 0
mon warn on pool no redundancy = false
osd objectstore = memstore
osd fast shutdown = false
memstore device bytes = {MEMSTORE_BYTES}
osd op num shards = 1
osd op num threads per shard = 2
# One OSD and pool size 1: no replica ever recovers from the PG log, yet Pacific keeps
# up to 10,000 entries (and 3,000 dups) per PG. This OSD grew by 800 MiB and became 40%
# slower within a minute of 4 KiB writes as its logs filled, and a benchmark's later
# repetitions measured that rather than the servers. A short log keeps it steady. The
# dups still cover every request a client may resend after the OSD restarts.
osd min pg log entries = 250
osd max pg log entries = 500
osd pg log dups tracked = 500
[mon.a]
mon data = {root}/mon
[osd.0]
osd data = {root}/osd
""")
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", self.mon_addrs,
                   str(root / "monmap")])
        self._run(["ceph-mon", "--id", "a", "--mkfs", "--monmap", str(root / "monmap"),
                   "--keyring", "/dev/null"])
        (root / "mon" / "keyring").touch()
        self._spawn("mon.a", ["ceph-mon", "-f", "--id", "a", "--public-addrv", self.mon_addrs])
        self.ceph("osd", "create")
        self.ceph("osd", "crush", "add", "osd.0", "1", "root=default")
        self._run(["ceph-osd", "--id", "0", "--mkjournal", "--mkfs"])
        self.start_osd()
        self.ceph("osd", "pool", "create", POOL, "8")
        self.rbd("pool", "init", POOL)

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the child's)
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def start_osd(self) -> None:
        self._spawn("osd.0", ["ceph-osd", "-f", "--id", "0"])
        # Up once the monitor says so (the OSD boots in about a second).
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while time.monotonic() < deadline:
            if self.procs["osd.0"].poll() is not None:
                raise CephError("ceph-osd exited: " + self.log_tail("osd.0"))
            out = self.ceph("osd", "dump")
            if any(line.startswith("osd.0 up") for line in out.splitlines()):
                return
            time.sleep(0.2)
        raise CephError("osd.0 did not come up: " + self.log_tail("osd.0"))

    def stop_osd(self) -> None:
        """Stop the OSD (SIGTERM; memstore saves its objects to the OSD folder on the
        way down and loads them at the next start)."""
        self._stop("osd.0")

    def pause_osd(self) -> None:
        """Freeze the OSD (SIGSTOP): requests to it are held, as when a storage node
        stops answering."""
        pid = self.procs["osd.0"].pid
        os.kill(pid, signal.SIGSTOP)
        # SIGSTOP is delivered asynchronously: return once every thread has stopped, so
        # that a request issued next cannot slip through to a still-running OSD.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue
            if states and all(st in "tT" for st in states):
                return
            time.sleep(0.01)

    def resume_osd(self) -> None:
        os.kill(self.procs["osd.0"].pid, signal.SIGCONT)

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, *, remove: bool = True) -> None:
        for name in ("osd.0", "mon.a"):
            self._stop(name)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, name: str, n: int = 2000) -> str:
        text = ""
        for f in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if f.exists():
                text += f.read_text(errors="replace")[-n:]
        return text

    # ------------------------------------------------------------------ commands
    def _run(self, argv: list[str]) -> str:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT)
        if r.returncode != 0:
            raise CephError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout

    def ceph(self, *args: str) -> str:
        return self._run(["ceph", "--connect-timeout", "30", *args])

    def rbd(self, *args: str) -> str:
        return self._run(["rbd", *args])

    def spec(self, image: str, snap: str | None = None) -> str:
        """The qemu-style spec of an image of the pool: rbd:POOL/IMAGE[@SNAP]:conf=..."""
        at = f"@{snap}" if snap else ""
        return f"rbd:{POOL}/{image}{at}:conf={self.conf}"
