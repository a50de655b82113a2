"""Processes a torture run starts: servers to kill, and what they hold (RSS, fds)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"  # the one with python3-libnbd
START_TIMEOUT = 30.0


def tool(name: str) -> str:
    path = VENV_BIN / name
    return str(path) if path.exists() else name


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Server:
    """A disk served over NBD by a process we may kill."""

    kind: str  # "serve" (blktap serve) or "tapdisk" (tap-ctl create)
    uri: str
    pid: int
    proc: subprocess.Popen | None = None
    minor: int | None = None
    env: dict[str, str] | None = None
    vhost: list[str] = field(default_factory=list)  # vhost-user sockets, when asked for

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait(30)
        else:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
                # A daemon is not our child: wait for /proc to let it go (zombies of
                # init's are reaped quickly).
                if _state(self.pid) == "Z":
                    break
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop cleanly (what is left of it after a trial)."""
        if self.kind == "serve" and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.kind == "tapdisk":
            if Path(f"/proc/{self.pid}").exists() and _state(self.pid) != "Z":
                subprocess.run([tool("tap-ctl"), "destroy", "-p", str(self.pid), "-m",
                                str(self.minor)], env=self.env, capture_output=True,
                               timeout=60)
            # After a kill -9 the minor's marker stays allocated: free it.
            subprocess.run([tool("tap-ctl"), "free", "-m", str(self.minor)], env=self.env,
                           capture_output=True, timeout=60)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def start_serve(spec: str, sock: Path, vhost_user: list[Path] | None = None) -> Server:
    """``blktap serve`` on an NBD socket, or (``vhost_user``) on vhost-user sockets only."""
    where = (["--socket", str(sock)] if not vhost_user else
             [a for p in vhost_user for a in ("--vhost-user", str(p))])
    proc = subprocess.Popen([tool("blktap"), "serve", spec, *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # (raw reads: select does not see what a reader buffered)
    got = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            got += os.read(fd, 4096)
            lines = [ln.strip() for ln in got.decode().split("\n")[:-1] if ln.strip()]
            if lines and not vhost_user:
                return Server("serve", lines[0], proc.pid, proc=proc)
            if vhost_user and len(lines) == len(vhost_user):
                return Server("serve", lines[0], proc.pid, proc=proc,
                              vhost=[ln.split(":", 1)[1] for ln in lines])
        if proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise RuntimeError(f"blktap serve {spec} did not start: {err.strip()}")


def start_tapdisk(spec: str, workdir: Path, vhost_user: bool = False) -> Server:
    """A tapdisk made by ``tap-ctl create``; with ``vhost_user`` it also exports the disk
    on its vhost-user socket (BLKTAP_VHOST_USER=1)."""
    env = {**os.environ, "BLKTAP_CONTROL_DIR": str(workdir / "run"),
           "BLKTAP_LOG_DIR": str(workdir / "log")}
    if vhost_user:
        env["BLKTAP_VHOST_USER"] = "1"
    res = subprocess.run([tool("tap-ctl"), "create", "-a", spec], env=env,
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"tap-ctl create -a {spec}: {res.stderr.strip()}")
    minor = int(res.stdout.strip().rsplit("-", 1)[1])
    for _ in range(5):
        # On a loaded machine the tapdisk may not answer LIST within tap-ctl's 10 s: it
        # then says so (ETIMEDOUT on stderr), and asking again is the caller's part.
        res = subprocess.run([tool("tap-ctl"), "list", "-m", str(minor)], env=env,
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"pid=(\d+)", res.stdout)
        if m:
            break
    else:
        raise RuntimeError(f"tap-ctl list: no tapdisk for minor {minor}: {res.stdout!r} "
                           f"{res.stderr.strip()!r} (exit {res.returncode})")
    pid = int(m.group(1))
    sock = workdir / "run" / f"nbd{pid}.{minor}"
    vhost = [str(workdir / "run" / f"vhost{pid}.{minor}")] if vhost_user else []
    return Server("tapdisk", f"nbd+unix:///?socket={sock}", pid, minor=minor, env=env,
                  vhost=vhost)
