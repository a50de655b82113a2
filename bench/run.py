#!/usr/bin/env python3
"""Benchmark: blktap's NBD server against qemu-nbd, qemu-storage-daemon, nbdkit file and
an nbdkit Python plugin, on the same images, with the same fio and nbdcopy workloads.

    .venv/bin/python bench/run.py                    # the full run (make bench), ~30 min
    .venv/bin/python bench/run.py --quick            # tiny sizes, a few min (ARGS=--quick)
    .venv/bin/python bench/run.py --only raw-tmpfs --reps 5 --runtime 5 --out /tmp/b
    .venv/bin/python bench/run.py --record-quiet     # on a quiet machine: bench/quiet.json

Groups: raw-tmpfs, raw-disk (every server on a raw file), vhd (ours against qemu-nbd
-f vpc, same data), chain (ours on VHD chains of depth 1, 8 and 30, data in the base),
qcow2 (ours against qemu-nbd -f qcow2 on the same qcow2 image, fully allocated, and
read-only on a sparse one), memory (RSS of tapdisk and blktap serve).

A repetition of a group runs each workload on each server back to back (every server
started afresh for each job), the servers' order rotated from one repetition to the next;
the ratios are medians of the ratios within each repetition (stats.py). Before each
repetition a calibration (calibrate.py) is compared with the quiet reference
(bench/quiet.json, written by --record-quiet on a quiet machine), and during it a sampler
watches the other processes' CPU, steal time and runnable threads: a repetition off by
more than the limits is disturbed and run again (--retries). A run with a disturbed
repetition left, or without a quiet reference, does not judge the goals (goals.py).

Output: OUT/REPORT.md (only the section between this script's markers is replaced),
OUT/results/latest.json, OUT/results/ratios.png (with matplotlib: the `bench` extra). OUT
is bench/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate  # noqa: E402
import goals  # noqa: E402
import images  # noqa: E402
import memory  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402
import workloads  # noqa: E402
from servers import BENCH, ROOT, SERVERS, Image, Running, ServerError  # noqa: E402

GROUPS = ("raw-tmpfs", "raw-disk", "vhd", "qcow2", "chain", "memory")
QUICK_SERVERS = ("blktap", "qemu-nbd", "nbdkit-file")
QUICK_GROUPS = ("raw-tmpfs", "vhd", "chain", "memory")
DEPTHS = (1, 8, 30)
QUICK_DEPTHS = (1, 8)
MIB = 1 << 20
QUIET_FILE = BENCH / "quiet.json"


@dataclass
class Entry:
    label: str
    server: str
    image: Image
    read_only: bool = False


@dataclass
class Group:
    name: str
    title: str
    reference: str
    entries: list[Entry]
    workloads: list[workloads.Workload]
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny images, 1 repetition of 1 s jobs, servers "
                         f"{', '.join(QUICK_SERVERS)}, groups {', '.join(QUICK_GROUPS)}")
    ap.add_argument("--reps", type=int, help="repetitions (default 4; quick 1)")
    ap.add_argument("--runtime", type=float, help="seconds per job (default 3; quick 1)")
    ap.add_argument("--size", type=parse_size, help="image size, e.g. 1G (default; quick 64M)")
    ap.add_argument("--only", action="append", default=[], metavar="GROUP",
                    help=f"run only these groups ({', '.join(GROUPS)}); repeat or "
                         "comma-separate")
    ap.add_argument("--servers", default="", metavar="A,B",
                    help=f"only these servers ({', '.join(SERVERS)})")
    ap.add_argument("--reference", default="qemu-nbd", metavar="SERVER",
                    help="the reference of the raw and vhd groups' ratios (default qemu-nbd)")
    ap.add_argument("--workloads", default="", metavar="A,B",
                    help="only these workloads ("
                         f"{', '.join(w.name for w in workloads.WORKLOADS)})")
    ap.add_argument("--out", type=Path, default=BENCH,
                    help="where REPORT.md and results/ go (default bench/)")
    cal = ap.add_argument_group("quiet machine", "the calibration, the sampler and the quiet "
                                "reference (docs/benchmarks.md)")
    cal.add_argument("--quiet-file", type=Path, default=QUIET_FILE, metavar="PATH",
                     help="the quiet reference (default bench/quiet.json)")
    cal.add_argument("--record-quiet", action="store_true",
                     help="run, and if no repetition was disturbed by other processes and "
                          "the calibrations agree, write the quiet reference (on a quiet "
                          "machine only)")
    cal.add_argument("--threshold", type=float, default=0.15, metavar="FRACTION",
                     help="a calibration figure further than this from the quiet one marks "
                          "the repetition disturbed (default 0.15)")
    cal.add_argument("--retries", type=int, default=None, metavar="N",
                     help="run a disturbed repetition again up to N times (default 2; "
                          "quick 1)")
    cal.add_argument("--max-other-cpu", type=float, default=calibrate.Limits.max_other_cpu,
                     metavar="FRACTION", help="others' CPU time over the machine's that "
                     f"marks a repetition disturbed (default {calibrate.Limits.max_other_cpu})")
    cal.add_argument("--max-steal", type=float, default=calibrate.Limits.max_steal,
                     metavar="FRACTION",
                     help=f"steal time likewise (default {calibrate.Limits.max_steal})")
    cal.add_argument("--max-other-runnable", type=float,
                     default=calibrate.Limits.max_other_runnable, metavar="N",
                     help="mean runnable threads not ours likewise (default "
                          f"{calibrate.Limits.max_other_runnable})")
    args = ap.parse_args(argv)
    args.retries = args.retries if args.retries is not None else (1 if args.quick else 2)
    if args.retries < 0 or not 0 < args.threshold < 1:
        ap.error("--retries must be >= 0 and --threshold between 0 and 1")
    args.limits = calibrate.Limits(args.max_other_cpu, args.max_steal, args.max_other_runnable)
    wl_names = [w for w in args.workloads.split(",") if w]
    for w in wl_names:
        if w not in workloads.BY_NAME:
            ap.error(f"unknown workload {w!r} (choose from "
                     f"{', '.join(x.name for x in workloads.WORKLOADS)})")
    args.workload_names = wl_names or [w.name for w in workloads.WORKLOADS]
    args.reps = args.reps or (1 if args.quick else 4)
    args.runtime = args.runtime or (1.0 if args.quick else 3.0)
    args.size = args.size or (64 * MIB if args.quick else 1 << 30)
    if args.size < 16 * MIB or args.size % (2 * MIB):
        ap.error("--size must be a multiple of 2 MiB, at least 16 MiB")
    if args.reps < 1 or args.runtime <= 0:
        ap.error("--reps and --runtime must be positive")
    only = [g for item in args.only for g in item.split(",") if g]
    for g in only:
        if g not in GROUPS:
            ap.error(f"unknown group {g!r} (choose from {', '.join(GROUPS)})")
    args.groups = only or list(QUICK_GROUPS if args.quick else GROUPS)
    wanted = [s for s in args.servers.split(",") if s]
    for s in wanted:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r} (choose from {', '.join(SERVERS)})")
    args.server_names = wanted or list(QUICK_SERVERS if args.quick else SERVERS)
    return args


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_line(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "missing"
    return (res.stdout.strip() or res.stderr.strip() or "?").splitlines()[0]


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # caps the send buffer blktap asks for on UNIX sockets (large reads depend on it)
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    except (OSError, ValueError):
        wmem_max = None
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "memory_gib": mem / (1 << 30),
            "wmem_max": wmem_max}


def source_state() -> str:
    """The commit measured, and whether src/ had changes not committed yet."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return (head or "unknown") + (" (src/ has uncommitted changes)" if dirty else "")


def fs_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/self/mounts (stat -f cannot
    tell ext4 from ext2)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1].encode().decode("unicode_escape")
            inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def versions() -> dict[str, str]:
    out = {}
    for name, argv in (("fio", ["fio", "--version"]), ("nbdcopy", ["nbdcopy", "--version"]),
                       ("qemu-nbd", ["qemu-nbd", "--version"]),
                       ("nbdkit", ["nbdkit", "--version"])):
        if shutil.which(argv[0]):
            out[name] = first_line(argv).split()[-1] if name != "qemu-nbd" else \
                first_line(argv).split()[1]
    return out


def build_groups(args: argparse.Namespace, avail: list[str], shm: Path,
                 disk: Path) -> list[Group]:
    """Make the images the chosen groups need and the groups themselves."""
    groups: list[Group] = []
    size = args.size
    wls = [w for w in workloads.WORKLOADS if w.name in args.workload_names]
    wanted = set(args.groups)
    raw_shm = None
    if wanted & {"raw-tmpfs", "raw-disk", "vhd", "qcow2", "chain"}:
        say(f"preparing images ({size >> 20} MiB of random data)")
        raw_shm = images.random_raw(shm / "disk.raw", size)
    raw_servers = [s for s in avail if "raw" in SERVERS[s].formats]
    ref = args.reference if args.reference in avail else (raw_servers or ["blktap"])[0]
    if "raw-tmpfs" in wanted and raw_shm:
        groups.append(Group("raw-tmpfs", "Raw image on tmpfs", ref,
                            [Entry(s, s, raw_shm) for s in raw_servers],
                            list(wls)))
    if "raw-disk" in wanted and raw_shm:
        raw_disk = disk / "disk.raw"
        images.copy_file(raw_shm.path, raw_disk)
        fs = fs_type(disk)
        groups.append(Group("raw-disk", f"Raw image on disk ({fs}, beside the checkout)", ref,
                            [Entry(s, s, Image(raw_disk, "raw")) for s in raw_servers],
                            list(wls)))
    if ("vhd" in wanted or "chain" in wanted) and raw_shm:
        vhd = images.vhd_from_raw(raw_shm.path, shm / "disk.vhd")
        blocks = images.allocated_blocks(vhd.path)
        if blocks != size // images.VHD_BLOCK:
            raise RuntimeError(f"{vhd.path}: {blocks} blocks allocated, expected all")
        if "vhd" in wanted:
            vhd_servers = [s for s in ("blktap", "qemu-nbd") if s in avail]
            vref = "qemu-nbd" if "qemu-nbd" in vhd_servers else "blktap"
            groups.append(Group(
                "vhd", "Dynamic VHD on tmpfs (qemu-nbd: -f vpc), every block allocated", vref,
                [Entry(s, s, vhd) for s in vhd_servers], list(wls)))
        if "chain" in wanted and "blktap" in avail:
            groups.append(_chain_group(args, vhd, shm, wls))
    if "qcow2" in wanted and raw_shm:
        groups.extend(_qcow2_groups(raw_shm, avail, shm, size, wls))
    return [g for g in groups if g.workloads]


def _qcow2_groups(raw_shm: Image, avail: list[str], shm: Path, size: int,
                  wls: list[workloads.Workload]) -> list[Group]:
    """qcow2, fully allocated (every workload) and sparse (reads only: a write would
    allocate for the servers that come after), ours against qemu-nbd -f qcow2."""
    full = images.qcow2_from_raw(raw_shm.path, shm / "disk.qcow2")
    if images.qcow2_allocated(full.path) != size:
        raise RuntimeError(f"{full.path}: not every cluster allocated")
    sparse = images.sparse_qcow2(shm / "sparse.qcow2", size)
    servers = [s for s in ("blktap", "qemu-nbd") if s in avail]
    ref = "qemu-nbd" if "qemu-nbd" in servers else "blktap"
    return [
        Group("qcow2", "qcow2 on tmpfs (qemu-nbd: -f qcow2), 64 KiB clusters, every "
              "cluster allocated", ref, [Entry(s, s, full) for s in servers],
              list(wls)),
        Group("qcow2-sparse", "qcow2 on tmpfs, nothing allocated (read-only: reads of "
              "holes)", ref, [Entry(s, s, sparse, read_only=True) for s in servers],
              [w for w in wls if not w.writes]),
    ]


def _chain_group(args: argparse.Namespace, vhd: Image, shm: Path,
                 wls: list[workloads.Workload]) -> Group:
    """VHD chains of each depth over a copy of the VHD, data in the base."""
    base = shm / "base.vhd"
    images.copy_file(vhd.path, base)
    entries = []
    for depth in (QUICK_DEPTHS if args.quick else DEPTHS):
        leaf = images.chain(base, depth, f"d{depth}")
        got = images.chain_depth(leaf.path)
        if got != depth:
            raise RuntimeError(f"{leaf.path}: chain depth {got}, expected {depth}")
        entries.append(Entry(f"depth {depth}", "blktap", leaf, read_only=True))
    return Group(
        "chain", "VHD chains on tmpfs (ours, read-only): data in the base, empty "
        "snapshots above", "depth 1", entries,
        [w for w in wls if not w.writes])


class Probe:
    """The calibration and the sampler of a repetition (tests give their own)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def calibrate(self) -> dict[str, float]:
        return calibrate.measure(self.workdir)

    def sampler(self) -> calibrate.Sampler:
        return calibrate.Sampler()


Attempt = Callable[[int], dict[str, Any]]

PROVISIONAL_RUNS = 3


def provisional_reference(probe: Probe, runs: int = PROVISIONAL_RUNS) -> dict[str, float]:
    """What a recording run compares each repetition's calibration with: the medians of
    `runs` calibrations at its start. Without it nothing would flag a repetition the
    host slowed down (seen: a third of every figure gone for one repetition, the
    sampler seeing nothing), and the whole run would be refused at the end instead of
    that repetition being run again."""
    cals = [probe.calibrate() for _ in range(runs)]
    return {name: statistics.median(c[name] for c in cals) for name in calibrate.FIGURES}


def repeat_until_quiet(attempt: Attempt, retries: int) -> list[dict[str, Any]]:
    """Run `attempt(0)`, and again with 1, 2, ... while the record it returns has
    "reasons" (it was disturbed), at most `retries` more times. The last record is the
    one kept ("kept": True); the others are kept in the log only."""
    records = []
    for n in range(retries + 1):
        rec = attempt(n)
        records.append(rec)
        if not rec["reasons"]:
            break
    for rec in records:
        rec["kept"] = rec is records[-1]
    return records


def run_job(g: Group, e: Entry, w: workloads.Workload, rep: int, attempt: int,
            args: argparse.Namespace, shm: Path, peak: dict[str, int]) -> dict[str, Any]:
    """One workload on one freshly started server, on a disk image a cold one."""
    base = {"group": g.name, "label": e.label, "server": e.server, "rep": rep,
            "attempt": attempt, "workload": w.name, "unit": w.unit}
    if g.name == "raw-disk":
        # The image as the last server left it on disk, not in the page cache: otherwise
        # whoever writes with O_DIRECT after a server that writes through the cache
        # (nbdkit file) pays for its writeback and the invalidation (seen: ours at 0.33x
        # qemu-nbd on randwrite-qd32 after nbdkit file, 0.72x run alone).
        images.drop_cache(e.image.path)
    try:
        srv = Running(SERVERS[e.server], e.image, shm, e.read_only)
    except ServerError as exc:
        return {**base, "error": str(exc)}
    try:
        cpu0 = srv.cpu_seconds()
        m = workloads.run(w, srv.uri, args.size, args.runtime)
        cpu = srv.cpu_seconds() - cpu0
        hwm = srv.memory_kib().get("VmHWM", 0)
        peak[e.server] = max(peak.get(e.server, 0), hwm)
    finally:
        srv.stop()
    return {**base, **asdict(m), "cpu_s": cpu,
            "cpu_us_per_io": cpu / m.ios * 1e6 if m.ios else None}


def run_groups(groups: list[Group], args: argparse.Namespace, shm: Path,
               quiet_cal: dict[str, float] | None, probe: Probe
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Every repetition of every group, each calibrated, sampled and run again while
    disturbed. Returns the job results (each with its repetition's attempt and whether it
    is kept), the repetitions' records and the servers' peak RSS."""
    results: list[dict[str, Any]] = []
    log: list[dict[str, Any]] = []
    peak: dict[str, int] = {}
    for rep in range(args.reps):
        for g in groups:
            k = rep % len(g.entries)
            order = g.entries[k:] + g.entries[:k]

            def attempt(n: int, g: Group = g, order: list[Entry] = order,
                        rep: int = rep) -> dict[str, Any]:
                tag = f"[{rep + 1}/{args.reps}{'' if n == 0 else f' again ({n})'}] {g.name}"
                cal = probe.calibrate()
                dev, reasons = calibrate.compare(cal, quiet_cal, args.threshold)
                sampler = probe.sampler()
                sampler.start()
                rows = []
                try:
                    for w in g.workloads:
                        for e in order:
                            row = run_job(g, e, w, rep, n, args, shm, peak)
                            rows.append(row)
                            shown = row.get("error") or \
                                f"{report.fmt_value(row['value'], w.unit)} {w.unit}"
                            say(f"{tag} {w.name} {e.label}: {shown}")
                finally:
                    sample = sampler.stop()
                reasons += calibrate.judge_sample(sample, args.limits)
                results.extend(rows)
                if reasons:
                    say(f"{tag}: disturbed: {'; '.join(reasons)}")
                return {"group": g.name, "rep": rep, "attempt": n,
                        "order": [e.label for e in order], "calibration": cal,
                        "deviation": dev, "sample": sample.to_json(), "reasons": reasons}

            records = repeat_until_quiet(attempt, args.retries)
            log.extend(records)
            kept = records[-1]["attempt"]
            for r in results:
                if r["group"] == g.name and r["rep"] == rep:
                    r["kept"] = r["attempt"] == kept
    return results, log, peak


def figures_of(results: list[dict[str, Any]]) -> goals.Figures:
    """(group, label, workload) -> {repetition: figure}, over the kept jobs that worked."""
    table: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in results:
        if r.get("kept") and not r.get("error"):
            table.setdefault((r["group"], r["label"], r["workload"]), {})[r["rep"]] = r["value"]
    return lambda group, label, wl: table.get((group, label, wl), {})


def quiet_figure(quiet: dict[str, Any] | None, group: str, label: str,
                 wl: str) -> float | None:
    if not quiet:
        return None
    return quiet.get("figures", {}).get(group, {}).get(label, {}).get(wl)


def summarise(groups: list[Group], results: list[dict[str, Any]],
              quiet: dict[str, Any] | None) -> list[dict[str, Any]]:
    figures = figures_of(results)
    out = []
    for g in groups:
        rows = []
        for w in g.workloads:
            for e in g.entries:
                runs = [r for r in results if r["group"] == g.name and r["label"] == e.label
                        and r["workload"] == w.name and r.get("kept")]
                ok = [r for r in runs if not r.get("error")]
                row: dict[str, Any] = {"workload": w.name, "label": e.label, "unit": w.unit,
                                       "n": len(ok),
                                       "quiet": quiet_figure(quiet, g.name, e.label, w.name)}
                if not ok:
                    row["error"] = next((r["error"] for r in runs), "not run")
                    row.update(median=None, min=None, max=None, cpu_us_per_io=None)
                else:
                    vals = [r["value"] for r in ok]
                    cpus = [r["cpu_us_per_io"] for r in ok if r["cpu_us_per_io"] is not None]
                    row.update(median=statistics.median(vals), min=min(vals), max=max(vals),
                               cpu_us_per_io=statistics.median(cpus) if cpus else None)
                sp = stats.ratio_spread(figures(g.name, e.label, w.name),
                                        figures(g.name, g.reference, w.name))
                row["ratio"] = sp.median if sp else None
                row["ratio_spread"] = sp.to_json() if sp else None
                rows.append(row)
        out.append({"name": g.name, "title": g.title, "reference": g.reference,
                    "rows": rows, "notes": g.notes})
    return out


def judgement(quiet: dict[str, Any] | None, mismatch: str | None,
              log: list[dict[str, Any]]) -> str | None:
    """Everything that keeps the run's goals from being judged, in one line (None:
    nothing): :func:`unreferenced`'s reason, then :func:`disturbed_summary`'s."""
    reasons = [unreferenced(quiet, mismatch), disturbed_summary(log)]
    return "; ".join(r for r in reasons if r) or None


def unreferenced(quiet: dict[str, Any] | None, mismatch: str | None) -> str | None:
    """Why no goal of the run can be judged: no quiet reference, or another machine's."""
    if quiet is None:
        return "no quiet reference"
    return mismatch or None


def disturbed_summary(log: list[dict[str, Any]]) -> str | None:
    """The kept repetitions still disturbed, in one line (None: none), the first named."""
    kept = [r for r in log if r.get("kept")]
    bad = [r for r in kept if r["reasons"]]
    if not bad:
        return None
    return (f"disturbed run ({len(bad)} of {len(kept)} repetitions; "
            f"{bad[0]['group']} #{bad[0]['rep'] + 1}: {_first_reason(bad[0])})")


def _first_reason(rep: dict[str, Any]) -> str:
    return rep["reasons"][0].split(" (limit")[0]


def disturbed_groups(log: list[dict[str, Any]]) -> dict[str, str]:
    """The groups with a kept repetition still disturbed, each with why: their checks are
    not judged. The others' repetitions were each calibrated and sampled apart, at
    other times, so they stand (a group's jobs run within its own repetition)."""
    out: dict[str, str] = {}
    kept = [r for r in log if r.get("kept")]
    for group in dict.fromkeys(r["group"] for r in kept):
        mine = [r for r in kept if r["group"] == group]
        bad = [r for r in mine if r["reasons"]]
        if bad:
            out[group] = (f"{group} disturbed ({len(bad)} of {len(mine)} repetitions; "
                          f"#{bad[0]['rep'] + 1}: {_first_reason(bad[0])})")
    return out


def quiet_record(data: dict[str, Any], log: list[dict[str, Any]], threshold: float,
                 reference: dict[str, float] | None = None
                 ) -> tuple[dict[str, Any] | None, list[str]]:
    """The quiet reference from this run, or None and why it cannot be one.

    With ``reference`` (a recording run's opening calibration, which every repetition
    was compared with during the run, and run again when off by more than the
    threshold): that is the calibration recorded, and the run is refused when a kept
    repetition still has a reason to be called disturbed. Future runs are then judged
    against the very figures this run's repetitions were judged against. Without it:
    the median of the repetitions' calibrations, refused when they differ from each other
    by more than the threshold."""
    kept = [r for r in log if r.get("kept")]
    why = [f"{r['group']} #{r['rep'] + 1}: {reason}" for r in kept for reason in r["reasons"]]
    cal = dict(reference) if reference is not None else {}
    if reference is None:
        for name in calibrate.FIGURES:
            vals = [r["calibration"][name] for r in kept if name in r.get("calibration", {})]
            if not vals:
                continue
            cal[name] = statistics.median(vals)
            spread = max(vals) / min(vals) - 1
            if spread > threshold:
                why.append(f"calibration {name} varies by {spread * 100:.0f}% between "
                           "repetitions")
    if why or not cal:
        return None, why or ["no calibration measured"]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for g in data["groups"]:
        for row in g["rows"]:
            if row.get("median") is not None:
                figures.setdefault(g["name"], {}).setdefault(row["label"], {})[
                    row["workload"]] = row["median"]
    return {"recorded": data["date"], "machine": data["machine"], "source": data["source"],
            "command": data["command"], "versions": data["versions"],
            "settings": data["settings"], "calibration": cal,
            "calibration_units": calibrate.UNITS, "figures": figures}, []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    load_start = os.getloadavg()
    source = source_state()
    here = machine()
    quiet = calibrate.load_quiet(args.quiet_file)
    mismatch = calibrate.machine_mismatch(quiet["machine"], here) if quiet else None
    quiet_cal = quiet["calibration"] if quiet and not mismatch else None
    if quiet is None:
        say(f"no quiet reference in {args.quiet_file}: the goals will not be judged")
    elif mismatch:
        say(f"{mismatch}: the goals will not be judged")
    avail, skipped = [], {}
    for name in args.server_names:
        why = SERVERS[name].missing()
        if why:
            skipped[name] = why
            say(f"skipping {name}: {why}")
        else:
            avail.append(name)
    if shutil.which("fio") is None or shutil.which("nbdcopy") is None:
        say("bench/run.py: fio and nbdcopy are needed (scripts/install-deps.sh)")
        return 2
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    shm = Path(tempfile.mkdtemp(prefix="blktap-bench-", dir=shm_root))
    disk = Path(tempfile.mkdtemp(prefix=".bench-tmp-", dir=ROOT))
    provisional: dict[str, float] | None = None
    try:
        groups = build_groups(args, avail, shm, disk)
        probe = Probe(shm)
        if args.record_quiet:
            provisional = quiet_cal = provisional_reference(probe)
            say("recording: each repetition's calibration is compared with this run's "
                f"opening one ({calibrate.describe(quiet_cal)})")
        results, log, peak = run_groups(groups, args, shm, quiet_cal, probe)
        mem = memory.measure(shm / "memory") if "memory" in args.groups else []
    except calibrate.CalibrationError as exc:
        say(f"bench/run.py: {exc}")
        return 2
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    summary = summarise(groups, results, quiet)
    used = {e.server for g in groups for e in g.entries}
    sample = Image(Path("IMAGE"), "raw")
    data: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]
                              if argv is None else ["bench/run.py", *argv]),
        "source": source,
        "settings": {"quick": args.quick, "reps": args.reps, "runtime": args.runtime,
                     "size": args.size, "groups": args.groups,
                     "workloads": args.workload_names, "threshold": args.threshold,
                     "retries": args.retries, "limits": asdict(args.limits)},
        "machine": {**here, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "versions": versions(),
        "server_commands": {n: shlex.join(SERVERS[n].argv(sample, Path("SOCK"), False))
                            .replace(str(ROOT) + "/", "")
                            for n in SERVERS if n in used},
        "workload_commands": {w.name: shlex.join(
            workloads.fio_argv(w, "URI", args.size, args.runtime) if w.tool == "fio"
            else workloads.nbdcopy_argv("URI")) for w in workloads.WORKLOADS
            if w.name in args.workload_names},
        "skipped": skipped,
        "groups": summary,
        "memory": [asdict(m) for m in mem],
        "peak_rss": peak,
        "repetitions": log,
        "provisional_calibration": provisional,
        "quiet": None if quiet is None else {
            "file": str(args.quiet_file), "recorded": quiet.get("recorded"),
            "machine": quiet.get("machine"), "settings": quiet.get("settings"),
            "calibration": quiet.get("calibration"), "mismatch": mismatch},
        "results": results,
    }
    # Why no goal is judged (no quiet reference, another machine's), and the groups
    # whose checks alone are not (a repetition of theirs still disturbed).
    not_judged = unreferenced(quiet, mismatch)
    disturbed = disturbed_groups(log)
    recorded = False  # (a run recorded as the quiet reference is at its own figures)
    status = 0
    if args.record_quiet:
        record, why = quiet_record(data, log, args.threshold, provisional)
        if record is None:
            say(f"not recording {args.quiet_file}: " + "; ".join(why))
            status = 1
        else:
            args.quiet_file.parent.mkdir(parents=True, exist_ok=True)
            report.write_json(record, args.quiet_file)
            say(f"recorded the quiet reference in {args.quiet_file}")
            data["quiet"] = {"file": str(args.quiet_file), "recorded": record["recorded"],
                             "machine": record["machine"], "settings": record["settings"],
                             "calibration": record["calibration"], "mismatch": None,
                             "this_run": True}
            # This run passed the quiet checks: it is the reference.
            recorded, not_judged, disturbed = True, None, {}
    idle = next((m.rss_kib for m in mem if m.case.startswith("idle tapdisk")), None)
    checks = goals.evaluate(figures_of(results), idle, not_judged,
                            None if recorded or quiet is None
                            else functools.partial(quiet_figure, quiet), args.threshold,
                            disturbed)
    data["not_judged"] = not_judged
    data["disturbed"] = disturbed_summary(log) if disturbed else None
    data["disturbed_groups"] = disturbed
    data["goals"] = [{**asdict(c), "verdict": c.verdict} for c in checks]
    data["seconds"] = time.monotonic() - t0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(data, out / "results" / "latest.json")
    has_chart = report.chart(data, out / "results" / "ratios.png")
    section = report.markdown(data, "results/ratios.png" if has_chart else None)
    rpath = out / "REPORT.md"
    old = rpath.read_text() if rpath.exists() else ""
    rpath.write_text(report.replace_section(old, section))
    say(f"wrote {rpath}, {out / 'results' / 'latest.json'}"
        + (f", {out / 'results' / 'ratios.png'}" if has_chart else "")
        + f" in {data['seconds'] / 60:.1f} min")
    if not_judged:
        say(f"goals not judged: {not_judged}")
    for why in disturbed.values():
        say(f"checks over {why.split(' disturbed')[0]} not judged: {why}")
    for c in (c for c in checks if c.value is not None):
        verdict = "not judged" if c.not_judged else c.verdict
        say(f"goal {verdict}: {c.what} = {c.value:.2f} (target {c.target})")
    return status


if __name__ == "__main__":
    sys.exit(main())
