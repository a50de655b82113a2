"""Is the machine as quiet as when the reference was recorded? A calibration before each
repetition, a sampler of the other processes' CPU during it, and the quiet reference
(bench/quiet.json) both are compared with.

The calibration is fixed work, timed: a Python loop in one process ("cpu1"), the same loop
in two processes at once ("cpu2": both CPUs, as a multi-threaded server and fio use them),
and a short fio job on a file in tmpfs with no server ("fio"). Each figure is a rate
(higher is faster); a repetition whose figure is off the quiet one by more than the
threshold, either way, is disturbed. During the repetition a thread samples /proc: the
CPU time of processes that are not the benchmark's (kernel threads aside), the steal time
of /proc/stat and the runnable threads of /proc/loadavg that are not ours.

The judging functions (compare, judge_sample, machine_mismatch) take numbers and return
reasons, so that they can be tested without timing anything.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOP_N = 2_000_000
LOOP_RUNS = 5  # runs of each loop; the figure is their median
FIO_FILE_SIZE = 32 << 20
FIO_RUNTIME_MS = 1000
FIO_RUNS = 3  # runs of the fio job; the figure is their median
FIGURES = ("cpu1", "cpu2", "fio")
UNITS = {"cpu1": "M loops/s", "cpu2": "M loops/s", "fio": "IOPS"}
NOT_RECORDED = "not recorded"

# The child: waits for a line on stdin (so that two start together), runs the loop, prints
# its wall time.
_LOOP = f"""
import sys, time
sys.stdin.readline()
t = time.perf_counter()
x = 0
for i in range({LOOP_N}):
    x = (x * 1103515245 + 12345) & 0xFFFFFFFF
print(time.perf_counter() - t)
"""


class CalibrationError(Exception):
    pass


def _loops(n: int) -> float:
    """Run the loop in `n` processes at once; million loops per second over all of them
    (the slowest one's wall time)."""
    procs = [subprocess.Popen([sys.executable, "-c", _LOOP], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        secs = [float(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return n * LOOP_N / max(secs) / 1e6


def _fio(path: Path) -> float:
    if not path.exists() or path.stat().st_size != FIO_FILE_SIZE:
        with open(path, "wb") as f:
            for _ in range(FIO_FILE_SIZE >> 20):
                f.write(os.urandom(1 << 20))
    argv = ["fio", "--name=calibrate", "--ioengine=psync", f"--filename={path}",
            f"--size={FIO_FILE_SIZE}", "--rw=randread", "--bs=4k", "--time_based",
            f"--runtime={FIO_RUNTIME_MS}ms", "--output-format=json"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0 or "{" not in res.stdout:
        raise CalibrationError(f"fio calibration failed: {res.stderr.strip()[-200:]}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    return float(job["read"]["iops"])


def measure(workdir: Path, runs: int = LOOP_RUNS,
            fio_runs: int = FIO_RUNS) -> dict[str, float]:
    """The calibration figures, measured now (about 8 s): each loop figure is the median
    of ``runs`` runs, the fio figure the median of ``fio_runs``. One run of a loop lasts
    a third of a second, and on a virtual machine with nothing else running its figure
    still varied from 4.2 to 7.0 over twelve runs in a row (the host's other guests); the
    median of five held within a few percent, so that only a disturbance lasting the
    calibration shows. One fio run of a second, on the same idle machine, varied by 12%
    over twelve runs in a row (717k-807k IOPS), the medians of three by 2%: with one run,
    two full benchmark runs that no sampler found disturbed were refused as a quiet
    reference for a 15-17% spread of that figure alone."""
    return {"cpu1": statistics.median(_loops(1) for _ in range(runs)),
            "cpu2": statistics.median(_loops(2) for _ in range(runs)),
            "fio": statistics.median(_fio(workdir / "calibrate.dat")
                                     for _ in range(fio_runs))}


def describe(cal: dict[str, float]) -> str:
    """A calibration's figures in one line, e.g. "cpu1 7.81, cpu2 14.61, fio 814,832.17"."""
    return ", ".join(f"{k} {v:,.2f}" for k, v in cal.items())


def compare(measured: dict[str, float], quiet: dict[str, float] | None,
            threshold: float) -> tuple[dict[str, float], list[str]]:
    """Each figure's deviation from the quiet one (measured / quiet - 1) and the reasons
    a repetition is disturbed: a figure off by more than `threshold` either way."""
    if not quiet:
        return {}, []
    dev: dict[str, float] = {}
    reasons = []
    for name in FIGURES:
        if name not in measured or not quiet.get(name):
            continue
        d = measured[name] / quiet[name] - 1
        dev[name] = d
        if abs(d) > threshold:
            side = "slower" if d < 0 else "faster"
            reasons.append(f"calibration {name} {abs(d) * 100:.0f}% {side} than quiet "
                           f"(limit {threshold * 100:.0f}%)")
    return dev, reasons


@dataclass
class Limits:
    max_other_cpu: float = 0.10  # others' CPU time over the machine's (wall x CPUs)
    max_steal: float = 0.05  # steal time over the machine's
    max_other_runnable: float = 0.5  # mean runnable threads not ours (from /proc/loadavg)


@dataclass
class Sample:
    """What the sampler saw during one repetition."""
    wall_s: float = 0.0
    cpus: int = 1
    other_cpu_s: float = 0.0
    steal_s: float = 0.0
    other_runnable: float = 0.0  # mean over the ticks
    ticks: int = 0
    loadavg_start: list[float] = field(default_factory=list)
    loadavg_end: list[float] = field(default_factory=list)
    top_others: list[tuple[str, float]] = field(default_factory=list)  # (command, CPU s)

    @property
    def other_share(self) -> float:
        return self.other_cpu_s / (self.wall_s * self.cpus) if self.wall_s > 0 else 0.0

    @property
    def steal_share(self) -> float:
        return self.steal_s / (self.wall_s * self.cpus) if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "other_share": self.other_share,
                "steal_share": self.steal_share}


def judge_sample(s: Sample, limits: Limits) -> list[str]:
    """Why the sampler's figures make a repetition disturbed (empty: they do not)."""
    reasons = []
    if s.other_share > limits.max_other_cpu:
        who = ", ".join(f"{c} {t:.1f} s" for c, t in s.top_others[:3])
        reasons.append(f"other processes used {s.other_share * 100:.0f}% of the CPUs "
                       f"(limit {limits.max_other_cpu * 100:.0f}%{': ' + who if who else ''})")
    if s.steal_share > limits.max_steal:
        reasons.append(f"steal time {s.steal_share * 100:.0f}% "
                       f"(limit {limits.max_steal * 100:.0f}%)")
    if s.other_runnable > limits.max_other_runnable:
        reasons.append(f"{s.other_runnable:.1f} runnable threads not ours on average "
                       f"(limit {limits.max_other_runnable:g})")
    return reasons


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command may hold spaces and parentheses: fields after the last ')'.
    close = text.rindex(")")
    return [text[text.index("(") + 1:close], *text[close + 2:].split()]


def _steal_ticks() -> int:
    with open("/proc/stat") as f:
        cols = f.readline().split()
    return int(cols[8]) if len(cols) > 8 else 0


def _runnable_total() -> int:
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[0])


def _loadavg() -> list[float]:
    return list(os.getloadavg())


class Sampler:
    """Samples /proc every `interval` seconds in a thread between start() and stop()."""

    def __init__(self, interval: float = 0.5, top: int | None = 5) -> None:
        self.interval = interval
        self.top = top  # how many of the busiest other commands the sample names (None: all)
        self.me = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, float] = {}  # pid -> CPU s last seen (processes not ours)
        self._comm: dict[str, str] = {}
        self._other: dict[str, float] = {}  # pid -> CPU s used since the start
        self._runnable: list[int] = []
        self._boot_ticks = 0.0

    def _scan(self, first: bool) -> None:
        info: dict[str, list[str]] = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                f = _stat_fields(pid)
                if f is not None:
                    info[pid] = f
        ppid = {pid: f[2] for pid, f in info.items()}
        ours: set[str] = set()
        for pid in info:
            p, hops = pid, 0
            while p in ppid and hops < 64:
                if p == str(self.me):
                    ours.add(pid)
                    break
                p, hops = ppid[p], hops + 1
        running_ours = 0
        for pid in ours:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    f = _stat_fields(f"{pid}/task/{tid}")
                    running_ours += bool(f and f[1] == "R")
            except OSError:
                pass
        # Kernel threads (kworkers doing our I/O among them) are not "other work".
        running_kernel = sum(1 for pid, f in info.items()
                             if (pid == "2" or f[2] == "2") and f[1] == "R")
        if not first:
            try:
                # Not clipped at zero: the total and our threads are read a moment apart,
                # and with dozens of our threads waking and sleeping the difference swings
                # both ways; clipping each tick kept only the upswings (half a thread on
                # average for a librbd server on an idle machine). The mean is clipped.
                self._runnable.append(_runnable_total() - running_ours - running_kernel)
            except (OSError, ValueError, IndexError):
                pass
        for pid, f in info.items():
            if pid in ours or pid == "2" or f[2] == "2":  # ours, kthreadd and its threads
                continue
            cpu = (int(f[12]) + int(f[13])) / CLK_TCK
            if pid in self._last:
                # max(): a pid reused by a new process between two scans
                self._other[pid] = self._other.get(pid, 0.0) + max(0.0, cpu - self._last[pid])
            elif not first and int(f[20]) >= self._boot_ticks:
                self._other[pid] = cpu  # started during the repetition: all of it counts
            self._last[pid] = cpu
            self._comm[pid] = f[0]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan(first=False)

    def start(self) -> None:
        with open("/proc/uptime") as f:
            self._boot_ticks = float(f.read().split()[0]) * CLK_TCK
        self._t0 = time.monotonic()
        self._steal0 = _steal_ticks()
        self._load0 = _loadavg()
        self._scan(first=True)
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Sample:
        assert self._thread is not None
        self._stop.set()
        self._thread.join()
        self._scan(first=False)
        by_comm: dict[str, float] = {}
        for pid, t in self._other.items():
            by_comm[self._comm[pid]] = by_comm.get(self._comm[pid], 0.0) + t
        top = sorted(((c, t) for c, t in by_comm.items() if t > 0), key=lambda x: -x[1])
        return Sample(
            wall_s=time.monotonic() - self._t0, cpus=os.cpu_count() or 1,
            other_cpu_s=sum(self._other.values()),
            steal_s=(_steal_ticks() - self._steal0) / CLK_TCK,
            other_runnable=max(0.0, statistics.mean(self._runnable)) if self._runnable
            else 0.0,
            ticks=len(self._runnable), loadavg_start=self._load0, loadavg_end=_loadavg(),
            top_others=top[:self.top])


# The quiet reference -------------------------------------------------------------------

def load_quiet(path: Path) -> dict[str, Any] | None:
    """The quiet reference, or None when it is absent or marked not recorded."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("recorded") or not data.get("calibration"):
        return None
    return data


def machine_mismatch(quiet_machine: dict[str, Any], here: dict[str, Any]) -> str | None:
    """Why the reference does not describe this machine (CPU model, number of CPUs)."""
    for key in ("cpu_model", "cpus"):
        if quiet_machine.get(key) != here.get(key):
            return (f"quiet reference is of another machine ({key} {quiet_machine.get(key)!r}"
                    f", here {here.get(key)!r})")
    return None


def not_recorded_file(path: Path) -> None:
    """Write the placeholder a repository holds until --record-quiet runs."""
    path.write_text(json.dumps({
        "recorded": False, "state": NOT_RECORDED,
        "how": "bench/run.py --record-quiet on a quiet machine writes this file: the "
               "machine, the calibration figures and every server's medians"}, indent=1)
        + "\n")
