#!/usr/bin/env python3
"""Benchmark: ``blktap serve rbd:...`` against ``qemu-nbd`` on qemu's rbd driver, the
same image on a throwaway single-node Ceph (tests/ceph_cluster.py: one memstore OSD, so
this measures the two clients' overheads, not a real cluster's network), the same fio
workloads over NBD (UNIX socket). Ratios are ours / qemu-nbd's (above 1: we are faster).

    .venv/bin/python bench/rbd.py [--reps 6] [--runtime 5] [--size 256M] [--out bench]
        [--cache none|writeback] [--workloads seqwrite,...] [--retries 2]

The Ceph figures on this kind of machine drift by 10-30% within minutes, so the two
servers are compared within each repetition: for each workload both run back to back,
each started afresh, the one that goes first alternating (an even number of repetitions
gives each the first place as often), the image written through again before each job:
on this one-OSD cluster the job before shapes the next one's figures by 5-25% (which
server went first decided most per-repetition ratios of writes without it). A
workload's ratio is the median of its per-repetition ratios. Each repetition is
calibrated first and sampled while it runs (bench/calibrate.py, as bench/run.py does),
and run again, up to ``--retries`` times, while disturbed; the goal (>= 1.0x on every
workload) is judged only on undisturbed repetitions.

Writes the section between its markers in OUT/REPORT.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import calibrate  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from ab import parse_size, thread_cpu_ns  # noqa: E402
from servers import ServerError, start_listening, stop_process  # noqa: E402

from ceph_cluster import CephCluster, missing_programs  # noqa: E402
from run import machine, repeat_until_quiet  # noqa: E402

BEGIN = "<!-- bench/rbd.py: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/rbd.py: end -->"
NAMES = ("seqread", "seqwrite", "randread-qd1", "randread-qd32", "randwrite-qd1",
         "randwrite-qd32")
SERVERS = ("blktap", "qemu-nbd")
GOAL = 1.0
MIN_KEPT = 3  # undisturbed repetitions a verdict needs
MIB = 1 << 20


@dataclass
class Job:
    """One workload on one freshly started server."""
    value: float  # the workload's unit
    cpu_us: float  # the server process's CPU per request, every thread
    main_us: float  # its main thread's (ours: the event loop's; qemu-nbd's main loop)


@dataclass
class Rep:
    """A repetition as kept: its jobs by workload and server, and what disturbed it."""
    jobs: dict[str, dict[str, Job]]
    reasons: list[str]
    attempts: int
    calibration: dict[str, float]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6,
                    help="repetitions (even: each server goes first as often)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per job")
    ap.add_argument("--size", default="256M", type=parse_size,
                    help="the image's size, whole MiB or GiB (256M, 1G)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="librbd's cache for both: none (rbd_cache=false; qemu-nbd "
                    "--cache=none), or writeback (librbd's default, writethrough until "
                    "the first flush; qemu-nbd --cache=writeback)")
    ap.add_argument("--workloads", default=",".join(NAMES),
                    help="bench/workloads.py names, comma-separated (default: all six)")
    ap.add_argument("--retries", type=int, default=2,
                    help="how many times a disturbed repetition is run again")
    ap.add_argument("--threshold", type=float, default=0.15, metavar="FRACTION",
                    help="a calibration figure off the quiet one by more than this marks "
                    "the repetition disturbed")
    ap.add_argument("--quiet-file", type=Path, default=HERE / "quiet.json",
                    help="the quiet reference whose calibration each repetition's is "
                    "compared with")
    ap.add_argument("--no-reset", dest="reset", action="store_false",
                    help="do not write the image through again before each job (the "
                    "previous job's writes then shape the next one's figures)")
    args = ap.parse_args(argv)
    args.names = args.workloads.split(",")
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)} (choose from "
                 f"{', '.join(NAMES)})")
    if args.reps < 1 or args.runtime <= 0 or args.retries < 0:
        ap.error("--reps and --runtime must be positive, --retries not negative")
    if not 0 < args.threshold < 1:
        ap.error("--threshold is a fraction between 0 and 1")
    return args


def run_job(argv: list[str], sock: Path, env: dict[str, str], w: workloads.Workload,
            size: int, runtime: float) -> Job:
    proc = start_listening(argv, sock, env)
    try:
        before = thread_cpu_ns(proc.pid)
        m = workloads.run(w, f"nbd+unix:///?socket={sock}", size, runtime)
        after = thread_cpu_ns(proc.pid)
    finally:
        stop_process(proc, timeout=60)
    if m.error:
        raise RuntimeError(f"{argv[0]} {w.name}: {m.error}")
    ios = max(1, m.ios)
    used = {key: ns - before.get(key, 0) for key, ns in after.items()}
    main = sum(ns for (tid, _), ns in used.items() if tid == str(proc.pid))
    return Job(m.value, sum(used.values()) / 1e3 / ios, main / 1e3 / ios)


def med(jobs: list[Job], attr: str) -> float:
    return statistics.median(getattr(j, attr) for j in jobs)


def summary(args: argparse.Namespace, reps: list[Rep], sample_note: str,
            elapsed: float, quiet_note: str) -> str:
    kept = [r for r in reps if not r.reasons]
    disturbed = len(reps) - len(kept)
    lines = [
        f"## blktap serve rbd: against qemu-nbd (qemu's rbd driver), cache {args.cache}",
        "",
        f"One memstore OSD on this host (tests/ceph_cluster.py), a {args.size // MIB} "
        f"MiB image written through first, fio over NBD on a UNIX socket, jobs of "
        f"{args.runtime:g} s; librbd's cache: {args.cache} for both. In each of {args.reps} "
        "repetitions every workload runs on both servers back to back, each started "
        "afresh, the first alternating"
        + ("; the image written through again (4 MiB writes) before each job"
           if args.reset else "; the image not written through again between jobs")
        + "; the ratio (ours / qemu-nbd's) is the median of "
        "the per-repetition ratios, with their min-max. Each repetition was calibrated "
        f"first and sampled while it ran, and run again (up to {args.retries} times) "
        f"while disturbed; {quiet_note} CPU: the server process's user + system time per "
        "request (every thread, librbd's included), and its main thread's (ours: the "
        "event loop), in µs.",
        f"Host: {os.cpu_count()} CPUs. {sample_note} The run took {elapsed / 60:.1f} min; "
        f"{len(kept)} of {len(reps)} repetitions kept undisturbed"
        + (f", {disturbed} disturbed after every retry: "
           + "; ".join(f"rep {i + 1}: {', '.join(r.reasons)}" for i, r in enumerate(reps)
                       if r.reasons) if disturbed else "") + ".",
        "",
        "| workload | unit | blktap | qemu-nbd | ratio (min-max) | CPU/req blktap | "
        "CPU/req qemu-nbd | main thread blktap | main thread qemu-nbd | goal >= 1.0x |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for n in args.names:
        wl = workloads.BY_NAME[n]
        pool = kept if len(kept) >= MIN_KEPT else reps
        ours = [r.jobs[n]["blktap"] for r in pool]
        theirs = [r.jobs[n]["qemu-nbd"] for r in pool]
        ratios = [a.value / b.value for a, b in zip(ours, theirs, strict=True) if b.value]
        ratio = statistics.median(ratios)
        if len(kept) < MIN_KEPT:
            verdict = f"not judged ({len(kept)} undisturbed repetitions)"
        else:
            verdict = "met" if ratio >= GOAL else "**not met**"
        lines.append(
            f"| {wl.title} | {wl.unit} | {med(ours, 'value'):,.0f} | "
            f"{med(theirs, 'value'):,.0f} | {ratio:.2f}x ({min(ratios):.2f}-"
            f"{max(ratios):.2f}) | {med(ours, 'cpu_us'):.0f} | {med(theirs, 'cpu_us'):.0f} "
            f"| {med(ours, 'main_us'):.0f} | {med(theirs, 'main_us'):.0f} | {verdict} |")
    lines += ["", "Calibration of the kept repetitions (cpu1, cpu2: M loops/s; fio: IOPS): "
              + "; ".join(f"{calibrate.describe(r.calibration)}"
                          + (f" ({r.attempts} attempts)" if r.attempts > 1 else "")
                          for r in reps) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing_programs() or not shutil.which("qemu-nbd") or not shutil.which("fio"):
        print("bench/rbd.py: needs ceph, qemu-nbd (qemu-block-extra) and fio "
              "(scripts/install-deps.sh)", file=sys.stderr)
        return 1
    quiet = calibrate.load_quiet(args.quiet_file)
    mismatch = calibrate.machine_mismatch(quiet["machine"], machine()) if quiet else None
    quiet_cal = quiet["calibration"] if quiet and not mismatch else None
    quiet_note = ("the calibration was compared with the quiet reference's "
                  f"({calibrate.describe(quiet_cal)}, {args.threshold * 100:.0f}% either "
                  "way)." if quiet_cal else
                  f"no quiet reference ({mismatch or 'none recorded'}): only the sampler "
                  "judged the repetitions.")
    blktap = str(Path(sys.executable).parent / "blktap")
    size = args.size
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rbd-"))
    # The calibration's fio reads a file in memory, as bench/run.py's does.
    shm = Path(tempfile.mkdtemp(prefix="bench-rbd-cal-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    reps: list[Rep] = []
    samples: list[calibrate.Sample] = []
    cluster = CephCluster.start(tmp / "ceph")
    try:
        cluster.rbd("create", "--size", f"{size // MIB}M", "rbd/bench")

        def write_through() -> None:
            # Every object written whole: reads are of data, not of absent objects, and
            # each job finds the OSD's objects laid out alike.
            cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern",
                        "seq", "--io-total", str(size), "rbd/bench")

        write_through()
        spec = cluster.spec("bench")
        ours = spec + (":rbd_cache=false" if args.cache == "none" else "")
        sock = tmp / "bench.sock"
        argvs = {
            "blktap": [blktap, "serve", ours, "--socket", str(sock)],
            "qemu-nbd": ["qemu-nbd", "-f", "raw", "-k", str(sock), "--persistent",
                         f"--cache={args.cache}", "--aio=threads", spec],
        }
        env = dict(os.environ, **cluster.env)
        for rep in range(args.reps):

            def attempt(n: int, rep: int = rep) -> dict:
                tag = f"[{rep + 1}/{args.reps}{f' again ({n})' if n else ''}]"
                cal = calibrate.measure(shm)
                _, reasons = calibrate.compare(cal, quiet_cal, args.threshold)
                # Other processes' CPU and steal time while measuring (the cluster, the
                # servers and fio are this script's descendants: not counted).
                sampler = calibrate.Sampler()
                sampler.start()
                jobs: dict[str, dict[str, Job]] = {}
                try:
                    for i, w in enumerate(args.names):
                        first = (rep + i) % 2
                        for name in SERVERS[first:] + SERVERS[:first]:
                            if args.reset:
                                write_through()
                            job = run_job(argvs[name], sock, env, workloads.BY_NAME[w],
                                          size, args.runtime)
                            jobs.setdefault(w, {})[name] = job
                            print(f"{tag} {w} {name}: {job.value:,.0f} "
                                  f"{workloads.BY_NAME[w].unit}, {job.cpu_us:.0f} µs/req "
                                  f"(main thread {job.main_us:.0f})", flush=True)
                finally:
                    sample = sampler.stop()
                samples.append(sample)
                reasons += calibrate.judge_sample(sample, calibrate.Limits())
                if reasons:
                    print(f"{tag} disturbed: {'; '.join(reasons)}", flush=True)
                return {"jobs": jobs, "reasons": reasons, "calibration": cal}

            records = repeat_until_quiet(attempt, args.retries)
            last = records[-1]
            reps.append(Rep(last["jobs"], last["reasons"], len(records), last["calibration"]))
    except (ServerError, RuntimeError, calibrate.CalibrationError) as exc:
        print(f"bench/rbd.py: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    other = statistics.median(s.other_share for s in samples) if samples else 0.0
    steal = statistics.median(s.steal_share for s in samples) if samples else 0.0
    sample_note = (f"While measured, other processes used {other * 100:.0f}% of the CPUs "
                   f"and steal time was {steal * 100:.0f}% (medians over the attempts); "
                   f"load average {os.getloadavg()[0]:.1f} at the end, this run's own "
                   "processes included.")
    section = summary(args, reps, sample_note, time.monotonic() - t0, quiet_note)
    print(section)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "REPORT.md"
    old = out.read_text() if out.exists() else ""
    begin, end = BEGIN.replace("rbd.py", f"rbd.py {args.cache}"), END.replace(
        "rbd.py", f"rbd.py {args.cache}")
    out.write_text(report.replace_section(old, section, begin, end))
    return 0


if __name__ == "__main__":
    sys.exit(main())
