#!/usr/bin/env python3
"""Benchmark: `blktap serve --fuse FILE` against qemu-storage-daemon's fuse export
(`--export type=fuse`) on the same image, with the same fio jobs on the exported file.

    .venv/bin/python bench/fuse.py                     # raw and VHD, 3 reps of 5 s each
    .venv/bin/python bench/fuse.py --reps 1 --runtime 2 --size 256M --formats raw

Both sides use the image the same way: qsd gets cache.direct=on exactly where ours
opens the image with O_DIRECT (a raw image on a disk file system); elsewhere (our VHD
driver is buffered; tmpfs has no direct I/O) both go through the page cache. fio reads
and writes the exported file with ioengine=psync and numjobs=QD (FUSE files take
synchronous I/O; a job per request in flight), direct=1 where the export accepts
O_DIRECT, else buffered. Results: the median
of the repetitions per (format, server, workload), and ours/qsd's ratio, printed as a
Markdown table (and saved as JSON with --json). Needs root (mount) or fusermount3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLKTAP = str(Path(sys.executable).parent / "blktap")
WORKLOADS = (  # name, rw, bs, jobs
    ("seqread-1M", "read", "1M", 4),
    ("seqwrite-1M", "write", "1M", 4),
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd8", "randread", "4k", 8),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd8", "randwrite", "4k", 8),
)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units \
        else int(text)


def make_image(fmt: str, path: Path, size: int) -> str:
    """A fully written image (so reads measure data, not holes); its spec for blktap."""
    raw = path.with_suffix(".raw.src")
    subprocess.run(["fio", "--name=fill", f"--filename={raw}", "--rw=write", "--bs=1M",
                    f"--size={size}", "--ioengine=psync", "--refill_buffers",
                    "--output=/dev/null"], check=True)
    if fmt == "raw":
        raw.rename(path)
        return f"aio:{path}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                    "subformat=dynamic", str(raw), str(path)], check=True)
    raw.unlink()
    return f"vhd:{path}"


def wait_mounted(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == str(path) for line in f):
                return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} was not mounted in {timeout} s")


def on_tmpfs(path: Path) -> bool:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True).stdout.strip() == "tmpfs"


def start(server: str, fmt: str, image: Path, spec: str, mnt: Path) -> subprocess.Popen:
    mnt.touch()
    if server == "blktap":
        argv = [BLKTAP, "serve", spec, "--fuse", str(mnt)]
    else:
        driver = "raw" if fmt == "raw" else "vpc"
        direct = fmt == "raw" and not on_tmpfs(image.parent)  # as ours (see above)
        cache = "cache.direct=on,aio=native" if direct else "cache.direct=off"
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={image},node-name=file,{cache}",
                "--blockdev", f"driver={driver},file=file,node-name=disk",
                "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={mnt},writable=on"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_mounted(mnt, proc)
    return proc


def stop(proc: subprocess.Popen, mnt: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def direct_ok(mnt: Path) -> bool:
    try:
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def fio(mnt: Path, rw: str, bs: str, jobs: int, size: int, runtime: float) -> float:
    direct = 1 if direct_ok(mnt) else 0
    r = subprocess.run(["fio", "--name=j", f"--filename={mnt}", f"--rw={rw}", f"--bs={bs}",
                        f"--numjobs={jobs}", "--ioengine=psync", f"--direct={direct}",
                        f"--size={size}", "--time_based", f"--runtime={runtime}",
                        "--group_reporting", "--randrepeat=0", "--output-format=json"],
                       capture_output=True, text=True, check=False, timeout=runtime + 120)
    if r.returncode != 0:
        raise RuntimeError(f"fio: {r.stderr.strip()[-300:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / (1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", default="raw,vhd")
    ap.add_argument("--dir", help="where the images go (default: a temporary folder in "
                                  "/var/tmp, a disk: O_DIRECT works there)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    for tool in ("fio", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    size = parse_size(args.size)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="bench-fuse-") as td:
        for fmt in args.formats.split(","):
            image = Path(td) / f"disk.{fmt}"
            spec = make_image(fmt, image, size)
            per = results.setdefault(fmt, {"blktap": {}, "qsd": {}})
            for rep in range(args.reps):
                order = ("blktap", "qsd") if rep % 2 == 0 else ("qsd", "blktap")
                for server in order:
                    mnt = Path(td) / f"export-{server}"
                    proc = start(server, fmt, image, spec, mnt)
                    try:
                        for name, rw, bs, jobs in WORKLOADS:
                            value = fio(mnt, rw, bs, jobs, size, args.runtime)
                            per[server].setdefault(name, []).append(value)
                            print(f"{fmt} rep {rep} {server:7} {name:18} {value:10.1f}",
                                  file=sys.stderr)
                    finally:
                        stop(proc, mnt)
    print("| format | workload | unit | blktap | qsd | blktap/qsd |")
    print("|---|---|---|---:|---:|---:|")
    summary = {}
    for fmt, per in results.items():
        for name, _rw, bs, _jobs in WORKLOADS:
            ours = statistics.median(per["blktap"][name])
            theirs = statistics.median(per["qsd"][name])
            unit = "IOPS" if bs == "4k" else "MiB/s"
            ratio = ours / theirs if theirs else float("nan")
            summary[f"{fmt}/{name}"] = {"blktap": ours, "qsd": theirs, "ratio": ratio}
            print(f"| {fmt} | {name} | {unit} | {ours:.0f} | {theirs:.0f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runtime": args.runtime,
                                               "reps": args.reps, "results": summary},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
