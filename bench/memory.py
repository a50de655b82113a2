"""Memory of our servers: the RSS of an idle tapdisk, of one serving a small VHD, of one
serving the largest sparse VHD after clients touched it (nbdinfo --map, nbdcopy to
null:), and of an idle `blktap serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from images import LARGEST_VHD_MB, sparse_vhd
from servers import SERVERS, Image, Running, ours, proc_memory_kib

SETTLE = 1.0  # seconds left to a new process before its RSS is read


@dataclass
class MemoryResult:
    case: str
    command: str
    rss_kib: int | None
    hwm_kib: int | None
    note: str = ""


class Tapdisk:
    """A foreground tapdisk (-D) with its own run and log directories."""

    def __init__(self, workdir: Path, opens: list[str]) -> None:
        self.run_dir = workdir / "run"
        self.log_dir = workdir / "log"
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.argv = [ours("tapdisk"), "-D", "--run-dir", str(self.run_dir),
                     "--log-dir", str(self.log_dir)]
        for spec in opens:
            self.argv += ["--open", spec]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.control = self.proc.stdout.readline().strip()
        self.sockets = [self.proc.stdout.readline().split()[-1] for _ in opens]
        if not self.control or any(not s for s in self.sockets):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"tapdisk did not start: {err.strip()}")

    def uri(self, i: int = 0) -> str:
        return f"nbd+unix:///?socket={self.sockets[i]}"

    def memory(self) -> dict[str, int]:
        return proc_memory_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def short(arg: str) -> str:
    """An argument with its path cut to the file name ("vhd:/x/y.vhd" -> "vhd:y.vhd")."""
    prefix, sep, path = arg.rpartition(":") if ":" in arg else ("", "", arg)
    return prefix + sep + os.path.basename(path) if "/" in path else arg


def _touch(uri: str) -> str:
    """Clients going over the whole disk: its map, then a copy (holes are skipped)."""
    notes = []
    for label, argv in (("nbdinfo --map URI", ["nbdinfo", "--map", uri]),
                        ("nbdcopy URI null:", ["nbdcopy", uri, "null:"])):
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        took = time.monotonic() - t0
        status = "ok" if res.returncode == 0 else f"exit {res.returncode}"
        notes.append(f"`{label}` {status} in {took:.1f} s")
    return ", ".join(notes)


def _case(workdir: Path, case: str, opens: list[str], touch: bool) -> MemoryResult:
    try:
        td = Tapdisk(workdir, opens)
    except (RuntimeError, OSError) as exc:
        return MemoryResult(case, "tapdisk -D", None, None, f"failed: {exc}")
    try:
        time.sleep(SETTLE)
        note = _touch(td.uri()) if touch else ""
        mem = td.memory()
    finally:
        td.stop()
    shown = " ".join(short(a) for a in ["tapdisk", *td.argv[1:]])
    return MemoryResult(case, shown, mem.get("VmRSS"), mem.get("VmHWM"), note)


def measure(workdir: Path) -> list[MemoryResult]:
    workdir.mkdir(exist_ok=True)
    small = sparse_vhd(workdir / "small.vhd", 64)
    big = sparse_vhd(workdir / "largest.vhd", LARGEST_VHD_MB)
    out = [
        _case(workdir, "idle tapdisk, no VBD", [], touch=False),
        _case(workdir, "tapdisk serving a 64 MiB VHD, idle", [f"vhd:{small.path}"],
              touch=False),
        _case(workdir, f"tapdisk serving a sparse {LARGEST_VHD_MB // 1024} GiB VHD "
              "after nbdinfo --map and nbdcopy", [f"vhd:{big.path}"], touch=True),
    ]
    try:
        srv = Running(SERVERS["blktap"], Image(small.path, "vhd"), workdir, read_only=False)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        out.append(MemoryResult("idle blktap serve, 64 MiB VHD", "blktap serve", None, None,
                                f"failed: {exc}"))
    else:
        try:
            time.sleep(SETTLE)
            mem = srv.memory_kib()
        finally:
            srv.stop()
        out.append(MemoryResult("idle blktap serve, 64 MiB VHD",
                                "blktap serve vhd:small.vhd --socket S",
                                mem.get("VmRSS"), mem.get("VmHWM")))
    return out
