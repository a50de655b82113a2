"""The benchmark's workloads: fio's nbd engine jobs and whole-export nbdcopy runs, each
run against an NBD URI and measured as throughput plus the number of I/Os done."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

MIB = 1 << 20
NBDCOPY_REQUEST = 256 * 1024  # given to nbdcopy so that its I/O count is known


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    tool: str  # "fio" or "nbdcopy"
    rw: str = ""
    bs: str = ""
    qd: int = 0

    @property
    def unit(self) -> str:
        """The figure a person reads: IOPS for small requests, MiB/s for large ones."""
        return "IOPS" if self.bs == "4k" else "MiB/s"

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread", "1 MiB sequential read, QD8", "fio", "read", "1M", 8),
    Workload("seqwrite", "1 MiB sequential write, QD8", "fio", "write", "1M", 8),
    Workload("randread-qd1", "4 KiB random read, QD1", "fio", "randread", "4k", 1),
    Workload("randread-qd32", "4 KiB random read, QD32", "fio", "randread", "4k", 32),
    Workload("randwrite-qd1", "4 KiB random write, QD1", "fio", "randwrite", "4k", 1),
    Workload("randwrite-qd32", "4 KiB random write, QD32", "fio", "randwrite", "4k", 32),
    Workload("nbdcopy", "nbdcopy of the export to null:", "nbdcopy"),
)
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass
class Measure:
    value: float  # in the workload's unit
    iops: float
    mib_s: float
    ios: int
    seconds: float
    error: str | None = None


def fio_argv(w: Workload, uri: str, size: int, runtime: float) -> list[str]:
    return ["fio", f"--name={w.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.qd}", f"--size={size}", "--time_based",
            f"--runtime={max(1, round(runtime * 1000))}ms", "--output-format=json"]


def nbdcopy_argv(uri: str) -> list[str]:
    return ["nbdcopy", f"--request-size={NBDCOPY_REQUEST}", uri, "null:"]


def _failed(msg: str) -> Measure:
    return Measure(0.0, 0.0, 0.0, 0, 0.0, error=msg)


def run_fio(w: Workload, uri: str, size: int, runtime: float) -> Measure:
    try:
        res = subprocess.run(fio_argv(w, uri, size, runtime), capture_output=True, text=True,
                             timeout=runtime + 120, check=False)
    except subprocess.TimeoutExpired:
        return _failed("fio timed out")
    text = res.stdout
    if res.returncode != 0 or "{" not in text:
        last = (res.stderr or text).strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return _failed(f"fio: {last[0]}")
    # fio may print notes before its JSON document.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        return _failed(f"fio: error {job['error']}")
    r, wr = job["read"], job["write"]
    iops = r["iops"] + wr["iops"]
    mib_s = (r["bw_bytes"] + wr["bw_bytes"]) / MIB
    ios = r["total_ios"] + wr["total_ios"]
    seconds = job["job_runtime"] / 1000
    return Measure(iops if w.unit == "IOPS" else mib_s, iops, mib_s, ios, seconds)


def run_nbdcopy(uri: str, size: int, runtime: float) -> Measure:
    """Copy the whole export to null: again and again until `runtime` has passed (at least
    once); the figure is the bytes moved over the wall time, nbdcopy's start-ups included."""
    copies = 0
    start = time.monotonic()
    while True:
        try:
            res = subprocess.run(nbdcopy_argv(uri), capture_output=True, text=True,
                                 timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return _failed("nbdcopy timed out")
        if res.returncode != 0:
            last = res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
            return _failed(f"nbdcopy: {last[0]}")
        copies += 1
        elapsed = time.monotonic() - start
        if elapsed >= runtime:
            break
    mib_s = copies * size / MIB / elapsed
    ios = copies * -(-size // NBDCOPY_REQUEST)
    return Measure(mib_s, ios / elapsed, mib_s, ios, elapsed)


def run(w: Workload, uri: str, size: int, runtime: float) -> Measure:
    if w.tool == "nbdcopy":
        return run_nbdcopy(uri, size, runtime)
    return run_fio(w, uri, size, runtime)
