#!/usr/bin/env python3
"""Same-sitting A/B of `blktap serve` builds (and qemu-nbd) on one disk: each server
started afresh for each repetition, the order rotated, fio over NBD (UNIX socket), and
each server's CPU per request by thread (``/proc/PID/task/*/schedstat``). On a machine
whose speed drifts from minute to minute (two shared CPUs, a Ceph cluster warming up),
a change is judged by the ratios within repetitions, not by runs minutes apart.

    .venv/bin/python bench/ab.py SPEC --variant NAME=TREE [--variant ...] [--qemu]
        [--workloads randwrite-qd1,...] [--reps 8] [--runtime 5] [--size 256M]
    .venv/bin/python bench/ab.py --ceph --variant new=. --variant old=/tmp/old --qemu

SPEC is what `blktap serve` takes (aio:/dev/shm/disk.img, qcow2:...); with ``--ceph`` a
throwaway cluster (tests/ceph_cluster.py) holds a written-through image instead, served
with librbd's cache off (qemu-nbd: --cache=none) or, with ``--cache writeback``, on.
TREE is a source tree whose ``src`` is put first on PYTHONPATH (``.``: this one; an
older commit: ``git worktree add``, then its compiled modules built or copied).
``NAME=TREE+VAR=VALUE`` adds an environment variable (``new=.+BLKTAP_POLL_MAX_US=0``).
The first variant is the reference of the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import workloads  # noqa: E402
from servers import ours, start_listening, stop_process  # noqa: E402

from blktap.cli.common import parse_size as cli_parse_size  # noqa: E402
from blktap.errors import UsageError  # noqa: E402

MIB = 1 << 20


@dataclass
class Variant:
    name: str
    tree: Path | None  # None: qemu-nbd
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    value: float  # IOPS or MiB/s, the workload's unit
    cpu_us: float  # the server's CPU per request, every thread
    threads: dict[str, float]  # by thread name, µs per request


def parse_variant(text: str) -> Variant:
    """NAME=TREE[+VAR=VALUE...]: a build of ours, from that source tree."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is NAME=TREE[+VAR=VALUE]")
    tree, *settings = rest.split("+")
    env = {}
    for setting in settings:
        var, sep, value = setting.partition("=")
        if not sep or not var:
            raise argparse.ArgumentTypeError(f"{setting!r}: an environment setting is "
                                             "VAR=VALUE")
        env[var] = value
    path = Path(tree).resolve()
    if not (path / "src" / "blktap").is_dir():
        raise argparse.ArgumentTypeError(f"{tree}: no src/blktap there")
    return Variant(name, path, env)


def parse_size(text: str) -> int:
    """A size as the CLIs take it (256M, 1G), in whole MiB (a Ceph image's unit here)."""
    try:
        size = cli_parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0 or size % MIB:
        raise argparse.ArgumentTypeError(f"{text!r}: a size in whole MiB or GiB, like 256M "
                                         "or 1G")
    return size


def thread_cpu_ns(pid: int) -> dict[tuple[str, str], int]:
    """CPU time (ns) of each thread of ``pid``, by (tid, name)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # (a thread that ended meanwhile)
        out[(tid, comm)] = ns
    return out


def argv_of(v: Variant, spec: str, sock: Path, qemu_image: tuple[str, str],
            cache: str = "none") -> list[str]:
    """The server's command: ours on ``spec``, or qemu-nbd on (format, filename)."""
    if v.tree is None:
        fmt, filename = qemu_image
        return ["qemu-nbd", "-f", fmt, "-k", str(sock), "--persistent", f"--cache={cache}",
                "--aio=threads", filename]
    return [ours("blktap"), "serve", spec, "--socket", str(sock)]


def measure(proc: subprocess.Popen, w: workloads.Workload, uri: str, size: int,
            runtime: float) -> Sample:
    before = thread_cpu_ns(proc.pid)
    m = workloads.run(w, uri, size, runtime)
    after = thread_cpu_ns(proc.pid)
    if m.error:
        raise RuntimeError(f"{w.name}: {m.error}")
    ios = max(1, m.ios)
    threads: dict[str, float] = {}
    for key, ns in after.items():
        threads[key[1]] = threads.get(key[1], 0.0) + (ns - before.get(key, 0)) / 1e3 / ios
    return Sample(m.value, sum(threads.values()), threads)


def table(results: dict[str, dict[str, list[Sample]]], names: list[str]) -> list[str]:
    """Markdown: per workload and variant, the median figure and CPU, the busiest
    threads, and the median of the per-repetition ratios to the first variant."""
    ref = names[0]
    lines = [f"| workload | variant | median | CPU µs/req | busiest threads, µs/req | "
             f"ratio to {ref} (median, min-max) |", "|---|---|---:|---:|---|---|"]
    for wname, by_variant in results.items():
        unit = workloads.BY_NAME[wname].unit
        for name in names:
            samples = by_variant[name]
            med = statistics.median(s.value for s in samples)
            cpu = statistics.median(s.cpu_us for s in samples)
            threads: dict[str, list[float]] = {}
            for s in samples:
                for t, us in s.threads.items():
                    threads.setdefault(t, []).append(us)
            busiest = sorted(((statistics.median(v), t) for t, v in threads.items()),
                             reverse=True)[:3]
            shown = ", ".join(f"{t} {us:.0f}" for us, t in busiest)
            ratios = [s.value / r.value for s, r in zip(samples, by_variant[ref],
                                                        strict=True) if r.value]
            spread = (f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-"
                      f"{max(ratios):.2f})" if ratios and name != ref else "")
            lines.append(f"| {wname} | {name} | {med:,.0f} {unit} | {cpu:.0f} | {shown} | "
                         f"{spread} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", help="what `blktap serve` serves (not with --ceph)")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[],
                    metavar="NAME=TREE[+VAR=VALUE]", help="a build of ours (repeatable)")
    ap.add_argument("--qemu", action="store_true", help="qemu-nbd on the same disk too")
    ap.add_argument("--ceph", action="store_true",
                    help="a throwaway Ceph cluster's image, written through first")
    ap.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="with --ceph, librbd's cache for both: none (rbd_cache=false; "
                    "qemu-nbd --cache=none), or writeback (librbd's default; qemu-nbd "
                    "--cache=writeback)")
    ap.add_argument("--workloads", default="randwrite-qd1",
                    help="bench/workloads.py names, comma-separated")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per job")
    ap.add_argument("--size", default="256M", type=parse_size,
                    help="the region fio covers, and the Ceph image's size (256M, 1G)")
    args = ap.parse_args(argv)
    if args.ceph == bool(args.spec):
        ap.error("give either SPEC or --ceph")
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in workloads.BY_NAME]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)}")
    variants = list(args.variant) + ([Variant("qemu-nbd", None)] if args.qemu else [])
    if len(variants) < 2:
        ap.error("an A/B needs two variants at least (--variant, --qemu)")
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    if args.reps < 1 or args.runtime <= 0:
        ap.error("--reps and --runtime must be positive")
    size = args.size
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    cluster = None
    try:
        env = dict(os.environ)
        if args.ceph:
            from ceph_cluster import CephCluster  # noqa: PLC0415

            cluster = CephCluster.start(tmp / "ceph")
            cluster.rbd("create", "--size", f"{size // MIB}M", "rbd/ab")
            cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern",
                        "seq", "--io-total", str(size), "rbd/ab")
            env.update(cluster.env)
            qemu_image = ("raw", cluster.spec("ab"))
            spec = qemu_image[1] + (":rbd_cache=false" if args.cache == "none" else "")
        else:
            spec = args.spec
            kind, _, path = spec.partition(":")
            fmt = {"aio": "raw", "vhd": "vpc", "qcow2": "qcow2"}.get(kind)
            if args.qemu and fmt is None:
                ap.error(f"--qemu: qemu-nbd does not serve {kind}: disks")
            qemu_image = (fmt or "", path)
        results = {n: {v.name: [] for v in variants} for n in names}
        sock = tmp / "ab.sock"
        uri = f"nbd+unix:///?socket={sock}"
        for rep in range(args.reps):
            shift = rep % len(variants)
            for v in variants[shift:] + variants[:shift]:
                venv = dict(env, **v.env)
                if v.tree is not None:
                    venv["PYTHONPATH"] = str(v.tree / "src")
                proc = start_listening(argv_of(v, spec, sock, qemu_image, args.cache),
                                       sock, venv)
                try:
                    for n in names:
                        s = measure(proc, workloads.BY_NAME[n], uri, size, args.runtime)
                        results[n][v.name].append(s)
                        print(f"rep {rep} {v.name:>12} {n:>15} {s.value:>10,.0f} "
                              f"cpu {s.cpu_us:6.1f} us/req", flush=True)
                finally:
                    stop_process(proc, timeout=60)
        print("\n".join(table(results, [v.name for v in variants])))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
