#!/usr/bin/env python3
"""Benchmark: vhd-util coalesce against plain file copies of the same bytes.

A differencing child holding N GiB of scattered data (most blocks full, some with several
short runs) is coalesced into an empty dynamic parent with ``vhd-util coalesce``. The same
number of bytes is then moved from a plain file by ``cp --sparse=always`` and by a bare
``os.copy_file_range`` loop, on the same file system, in the same run. Runs are
interleaved (coalesce, copy_file_range, cp, coalesce, ...) and the median is reported,
with the coalesce / copy_file_range ratio (goal: >= 0.8).

    .venv/bin/python bench/coalesce.py                  # 2 GiB, on /dev/shm and on disk
    .venv/bin/python bench/coalesce.py --gib 0.25 --reps 1 --dirs /tmp
    .venv/bin/python bench/coalesce.py --report bench/REPORT.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blktap.image import Chain
from blktap.image.vhd import create, snapshot
from blktap.image.vhd.coalesce import coalesce

MB = 1 << 20
BLOCK = 2 * MB
ROOT = Path(__file__).resolve().parent.parent


def vhd_util() -> str:
    here = Path(sys.executable).parent / "vhd-util"
    return str(here) if here.exists() else "vhd-util"


def build(folder: Path, data_bytes: int, seed: int) -> tuple[Path, Path, Path, int]:
    """An empty parent (kept pristine), a child with scattered data, and a plain file of
    the same number of data bytes. Returns (parent template, child, plain file, bytes)."""
    rng = random.Random(seed)
    blocks_with_data = data_bytes // BLOCK
    virtual = 2 * blocks_with_data * BLOCK  # half of the blocks hold data
    template = folder / "parent.template.vhd"
    parent = folder / "parent.vhd"
    child = folder / "child.vhd"
    create(str(template), virtual)
    shutil.copy(template, parent)
    snapshot(str(child), str(parent))
    chosen = sorted(rng.sample(range(virtual // BLOCK), blocks_with_data))
    payload = os.urandom(BLOCK)
    moved = 0
    with Chain.open(f"vhd:{child}", writable=True) as chain:
        for blk in chosen:
            if rng.random() < 0.8:  # a full block
                chain.pwrite(blk * BLOCK, payload)
                moved += BLOCK
            else:  # four runs of 256 KiB at random sector-aligned places
                starts = sorted(rng.sample(range(0, BLOCK // (256 * 1024)), 4))
                for s in starts:
                    chain.pwrite(blk * BLOCK + s * 256 * 1024, payload[: 256 * 1024])
                    moved += 256 * 1024
    plain = folder / "plain.bin"
    with open(plain, "wb") as f:
        left = moved
        while left:
            n = min(left, BLOCK)
            f.write(payload[:n])
            left -= n
    os.sync()
    return template, child, plain, moved


def time_coalesce(template: Path, child: Path) -> float:
    parent = child.with_name("parent.vhd")
    shutil.copy(template, parent)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run([vhd_util(), "coalesce", "-n", str(child)], capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"coalesce failed: {proc.stdout}{proc.stderr}")
    return elapsed


def time_coalesce_in_process(template: Path, child: Path) -> float:
    """The library call alone: coalesce without the interpreter's start-up."""
    parent = child.with_name("parent.vhd")
    shutil.copy(template, parent)
    os.sync()
    start = time.perf_counter()
    coalesce(str(child))
    return time.perf_counter() - start


def time_copy_file_range(src: Path) -> float:
    dst = src.with_name("cfr.out")
    dst.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while done < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done, done, done)
            if n == 0:
                break
            done += n
        os.fsync(fout.fileno())
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


def time_cp(src: Path) -> float:
    dst = src.with_name("cp.out")
    dst.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    subprocess.run(["sync", str(dst)], check=False)
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


def fs_type(path: Path) -> str:
    proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
                          capture_output=True, text=True)
    return (proc.stdout.split() or ["?"])[0]


def bench_dir(base: Path, gib: float, reps: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="blktap-bench-", dir=base))
    try:
        template, child, plain, moved = build(folder, int(gib * (1 << 30)), seed=1)
        runs: dict[str, list[float]] = {"coalesce": [], "copy_file_range": [], "cp": [],
                                        "coalesce (in-process)": []}
        order = list(runs)
        for rep in range(reps):
            rotated = order[rep % 4:] + order[: rep % 4]  # interleave the order too
            for name in rotated:
                if name == "coalesce":
                    runs[name].append(time_coalesce(template, child))
                elif name == "coalesce (in-process)":
                    runs[name].append(time_coalesce_in_process(template, child))
                elif name == "copy_file_range":
                    runs[name].append(time_copy_file_range(plain))
                else:
                    runs[name].append(time_cp(plain))
        return {"dir": str(base), "fs": fs_type(base), "bytes": moved, "runs": runs}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarize(result: dict) -> list[str]:
    moved = result["bytes"]
    med = {k: statistics.median(v) for k, v in result["runs"].items()}
    rate = {k: moved / t / MB for k, t in med.items()}
    ratio = rate["coalesce"] / rate["copy_file_range"]
    best = min(result["runs"]["copy_file_range"]) / min(result["runs"]["coalesce"])
    lines = []
    for name in ("coalesce", "coalesce (in-process)", "copy_file_range", "cp"):
        runs = result["runs"][name]
        lines.append(f"| {result['fs']} ({result['dir']}) | {name} | {moved / MB:.0f} | "
                     f"{med[name]:.3f} | {min(runs):.3f}–{max(runs):.3f} | {rate[name]:.0f} | "
                     f"{rate[name] / rate['copy_file_range']:.2f}x |")
    verdict = "met" if ratio >= 0.8 else "NOT met"
    lines.append(f"| | **coalesce / copy_file_range** | | | | | **{ratio:.2f}x** on medians, "
                 f"{best:.2f}x best of runs (goal 0.8x: {verdict}) |")
    return lines


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


def write_report(report: Path, table: list[str], args: argparse.Namespace) -> None:
    section = [
        "## Coalesce (bench/coalesce.py)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/coalesce.py --gib {args.gib} --reps {args.reps} "
        f"--dirs {' '.join(args.dirs)}`. Medians of {args.reps} interleaved runs; MB = MiB.",
        "The child holds scattered data (80% full 2 MiB blocks, 20% blocks with four "
        "256 KiB runs) over a disk twice that size; copy_file_range and cp move the same "
        "number of bytes from a plain file on the same file system.",
        "",
        "`coalesce` is the `vhd-util coalesce` command, interpreter start-up included; "
        "`coalesce (in-process)` is the library call alone. The ratio uses the command.",
        "",
        "| file system | method | MiB moved | median s | min–max s | MiB/s | vs copy_file_range |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
    ]
    text = report.read_text() if report.exists() else "# Benchmark report\n\n"
    start = text.find("## Coalesce (bench/coalesce.py)")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n".join(section) + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    report.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="data in the child (GiB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dirs", nargs="+", default=["/dev/shm", "/var/tmp"],
                        help="folders to run in (tmpfs and disk by default)")
    parser.add_argument("--report", type=Path, default=None,
                        help="write the table into this Markdown report")
    args = parser.parse_args()
    table: list[str] = []
    for d in args.dirs:
        result = bench_dir(Path(d), args.gib, args.reps)
        rows = summarize(result)
        table.extend(rows)
        print("\n".join(rows), flush=True)
    if args.report:
        write_report(args.report, table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
