#!/usr/bin/env python3
"""Benchmark: ``blktap serve rbd:...`` against ``qemu-nbd`` on qemu's rbd driver, the
same image on a throwaway single-node Ceph (tests/ceph_cluster.py: one memstore OSD, so
this measures the two clients' overheads, not a real cluster's network), the same fio
workloads over NBD (UNIX socket). Ratios are ours / qemu-nbd's (above 1: we are faster).

    .venv/bin/python bench/rbd.py [--reps 3] [--runtime 5] [--size 256M] [--out bench]

Writes the section between its markers in OUT/REPORT.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import calibrate  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from servers import proc_cpu_seconds, start_listening, stop_process  # noqa: E402

from ceph_cluster import CephCluster, missing_programs  # noqa: E402

BEGIN = "<!-- bench/rbd.py: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/rbd.py: end -->"
NAMES = ("seqread", "seqwrite", "randread-qd1", "randread-qd32", "randwrite-qd1",
         "randwrite-qd32")
MIB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="librbd's cache for both: none (rbd_cache=false; qemu-nbd "
                    "--cache=none), or writeback (librbd's default, writethrough until "
                    "the first flush; qemu-nbd --cache=writeback)")
    args = ap.parse_args()
    if missing_programs() or not shutil.which("qemu-nbd") or not shutil.which("fio"):
        print("bench/rbd.py: needs ceph, qemu-nbd (qemu-block-extra) and fio "
              "(scripts/install-deps.sh)", file=sys.stderr)
        return 1
    size = int(args.size.rstrip("M")) * MIB
    blktap = str(Path(sys.executable).parent / "blktap")
    tmp = Path(tempfile.mkdtemp(prefix="bench-rbd-"))
    cluster = CephCluster.start(tmp / "ceph")
    # Other processes' CPU and steal time while measuring (the cluster, the servers and
    # fio are this script's descendants: not counted).
    sampler = calibrate.Sampler()
    sampler.start()
    results: dict[str, dict[str, list[float]]] = {n: {"blktap": [], "qemu-nbd": []}
                                                  for n in NAMES}
    # The server's CPU time per request (µs): what the machine's load disturbs least.
    cpu: dict[str, dict[str, list[float]]] = {n: {"blktap": [], "qemu-nbd": []}
                                              for n in NAMES}
    try:
        cluster.rbd("create", "--size", f"{size // MIB}M", "rbd/bench")
        # Written once all through, so that reads are of data, not of absent objects.
        cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                    "--io-total", str(size), "rbd/bench")
        spec = cluster.spec("bench")
        ours = spec + (":rbd_cache=false" if args.cache == "none" else "")
        servers = {
            "blktap": lambda sock: [blktap, "serve", ours, "--socket", str(sock)],
            "qemu-nbd": lambda sock: ["qemu-nbd", "-f", "raw", "-k", str(sock),
                                      "--persistent", f"--cache={args.cache}",
                                      "--aio=threads", spec],
        }
        order = list(servers)
        for rep in range(args.reps):
            for name in order[rep % 2:] + order[: rep % 2]:
                sock = tmp / f"{name}.sock"
                sock.unlink(missing_ok=True)
                proc = start_listening(servers[name](sock), sock, cluster.env)
                uri = f"nbd+unix:///?socket={sock}"
                try:
                    for w in NAMES:
                        before = proc_cpu_seconds(proc.pid)
                        m = workloads.run(workloads.BY_NAME[w], uri, size, args.runtime)
                        used = proc_cpu_seconds(proc.pid) - before
                        if m.error:
                            raise RuntimeError(f"{name} {w}: {m.error}")
                        results[w][name].append(m.value)
                        cpu[w][name].append(used * 1e6 / max(1, m.ios))
                finally:
                    stop_process(proc, timeout=60)
    finally:
        sample = sampler.stop()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    disturbed = calibrate.judge_sample(sample, calibrate.Limits())

    lines = [f"## blktap serve rbd: against qemu-nbd (qemu's rbd driver), cache {args.cache}",
             "",
             f"One memstore OSD on this host (tests/ceph_cluster.py), a {size // MIB} MiB "
             f"image written through first, fio over NBD on a UNIX socket, {args.reps} "
             f"repetitions of {args.runtime:g} s, medians; ratio = ours / qemu-nbd's. "
             f"librbd's cache: {args.cache} for both. CPU: the server process's user + "
             f"system time (every thread, librbd's included) per request, in µs; its "
             f"ratio is qemu-nbd's / ours (above 1: we spend less).",
             f"Host: {os.cpu_count()} CPUs; while measured, other processes used "
             f"{sample.other_share * 100:.0f}% of them, steal time "
             f"{sample.steal_share * 100:.0f}% (load average {os.getloadavg()[0]:.1f} at "
             "the end, this run's own processes included)"
             + (f". **Disturbed**: {'; '.join(disturbed)}." if disturbed else "."), "",
             "| workload | unit | blktap | qemu-nbd | ratio | CPU/req blktap | "
             "CPU/req qemu-nbd | CPU ratio |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for w in NAMES:
        wl = workloads.BY_NAME[w]
        ours = statistics.median(results[w]["blktap"])
        theirs = statistics.median(results[w]["qemu-nbd"])
        ratio = ours / theirs if theirs else float("nan")
        c_ours = statistics.median(cpu[w]["blktap"])
        c_theirs = statistics.median(cpu[w]["qemu-nbd"])
        c_ratio = c_theirs / c_ours if c_ours else float("nan")
        lines.append(f"| {wl.title} | {wl.unit} | {ours:.0f} | {theirs:.0f} | {ratio:.2f}x "
                     f"| {c_ours:.0f} | {c_theirs:.0f} | {c_ratio:.2f}x |")
    section = "\n".join(lines)
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
