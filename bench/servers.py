"""The NBD servers the benchmark compares: how each is started on an image, when it is
ready, its URI, and its process's CPU time and memory from /proc.

Every server listens on a UNIX socket of its own. A server whose program (or nbdkit
plugin) is missing is reported as unavailable, never started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON_PLUGIN = BENCH / "nbdkit_file_plugin.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Image:
    path: Path
    fmt: str  # "raw", "vhd" or "qcow2"


def ours(name: str) -> str:
    """Our command from the venv, else from PATH."""
    exe = VENV_BIN / name
    return str(exe) if exe.exists() else (shutil.which(name) or str(exe))


def _blktap(img: Image, sock: Path, read_only: bool) -> list[str]:
    kind = {"vhd": "vhd", "qcow2": "qcow2"}.get(img.fmt, "aio")
    argv = [ours("blktap"), "serve", f"{kind}:{img.path}", "--socket", str(sock)]
    return argv + (["--read-only"] if read_only else [])


def _qemu_fmt(img: Image) -> str:
    return {"vhd": "vpc", "qcow2": "qcow2"}.get(img.fmt, "raw")


def _qemu_nbd(img: Image, sock: Path, read_only: bool) -> list[str]:
    fmt = _qemu_fmt(img)
    argv = ["qemu-nbd", "-t", "-e", "8", "--cache=none", "-f", fmt, "-k", str(sock)]
    return argv + (["-r"] if read_only else []) + [str(img.path)]


def _qsd(img: Image, sock: Path, read_only: bool) -> list[str]:
    fmt = _qemu_fmt(img)
    # cache.direct=on matches qemu-nbd's --cache=none; aio is qemu's default (threads).
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={img.path},cache.direct=on"
                          f",read-only={'on' if read_only else 'off'}",
            "--blockdev", f"driver={fmt},node-name=fmt0,file=file0"
                          f",read-only={'on' if read_only else 'off'}",
            "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=8",
            "--export", "type=nbd,id=exp0,node-name=fmt0,name="
                        f",writable={'off' if read_only else 'on'}"]


def _nbdkit_file(img: Image, sock: Path, read_only: bool) -> list[str]:
    return (["nbdkit", "-f", "-U", str(sock)] + (["-r"] if read_only else [])
            + ["file", str(img.path)])


def _nbdkit_python(img: Image, sock: Path, read_only: bool) -> list[str]:
    return (["nbdkit", "-f", "-U", str(sock)] + (["-r"] if read_only else [])
            + ["python", str(PYTHON_PLUGIN), f"file={img.path}"])


def _nbdkit_has(plugin: str) -> str | None:
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed"
    res = subprocess.run(["nbdkit", "--dump-plugin", plugin], capture_output=True,
                         timeout=30, check=False)
    return None if res.returncode == 0 else f"nbdkit has no {plugin} plugin"


def _needs_program(*names: str) -> Callable[[], str | None]:
    def check() -> str | None:
        for name in names:
            if shutil.which(name) is None and not Path(name).exists():
                return f"{Path(name).name} is not installed"
        return None
    return check


@dataclass(frozen=True)
class ServerDef:
    name: str
    title: str
    formats: tuple[str, ...]
    argv: Callable[[Image, Path, bool], list[str]]
    check: Callable[[], str | None]
    prints_uri: bool = False

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        return self.check()


SERVERS: dict[str, ServerDef] = {s.name: s for s in (
    ServerDef("blktap", "blktap serve (ours)", ("raw", "vhd", "qcow2"), _blktap,
              lambda: _needs_program(ours("blktap"))(), prints_uri=True),
    ServerDef("qemu-nbd", "qemu-nbd -t -e 8 --cache=none", ("raw", "vhd", "qcow2"), _qemu_nbd,
              _needs_program("qemu-nbd")),
    ServerDef("qsd", "qemu-storage-daemon (NBD export, cache.direct=on)",
              ("raw", "vhd", "qcow2"),
              _qsd, _needs_program("qemu-storage-daemon")),
    ServerDef("nbdkit-file", "nbdkit file", ("raw",), _nbdkit_file,
              lambda: _nbdkit_has("file")),
    ServerDef("nbdkit-python", "nbdkit python (bench/nbdkit_file_plugin.py)", ("raw",),
              _nbdkit_python, lambda: _nbdkit_has("python")),
)}


class ServerError(Exception):
    pass


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in KiB, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def _connectable(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    import selectors
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise ServerError("no URI printed in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise ServerError("exited before printing its URI")
        buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0].decode()


def start_listening(argv: list[str], sock: Path, env: dict[str, str] | None = None,
                    timeout: float = 30.0) -> subprocess.Popen:
    """Start a server that listens on the UNIX socket ``sock`` (a stale one is removed
    first) and return once it accepts connections; ServerError with the end of its
    stderr if it exits first or takes longer than ``timeout``."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not _connectable(sock):
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise ServerError(f"{argv[0]} exited: {proc.stderr.read()[-500:]}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise ServerError(f"{argv[0]} did not start in {timeout:g} s")
        time.sleep(0.05)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Running:
    """One started server: its process, URI and log."""

    def __init__(self, sdef: ServerDef, img: Image, workdir: Path, read_only: bool,
                 timeout: float = 30.0) -> None:
        self.sdef = sdef
        self.sock = workdir / f"{sdef.name}.sock"
        if self.sock.exists():
            self.sock.unlink()
        self.argv = sdef.argv(img, self.sock, read_only)
        self.log_path = workdir / f"{sdef.name}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE if sdef.prints_uri else subprocess.DEVNULL,
            stderr=self.log, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        try:
            if sdef.prints_uri:
                self.uri = _read_line(self.proc, deadline)
            else:
                self.uri = f"nbd+unix:///?socket={self.sock}"
                while not _connectable(self.sock):
                    if self.proc.poll() is not None:
                        raise ServerError(f"exited with {self.proc.returncode}")
                    if time.monotonic() > deadline:
                        raise ServerError("socket not ready in time")
                    time.sleep(0.05)
        except ServerError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise ServerError(f"{sdef.name}: {exc} {' '.join(tail)}".strip()) from None

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory_kib(self) -> dict[str, int]:
        return proc_memory_kib(self.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
