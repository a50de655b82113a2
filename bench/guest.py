#!/usr/bin/env python3
"""Benchmark of the guest path: a Linux guest under QEMU (shared/guest-testbed, TCG) runs
blkbench on a vhost-user-blk disk served by qemu-storage-daemon (the reference) and by
ours (``blktap serve aio:IMG --vhost-user SOCK``), on the same raw image.

    .venv/bin/python bench/guest.py              # 2 rounds of A B B A, --secs 3 (~10 min)
    .venv/bin/python bench/guest.py --quick      # one A B, --secs 1 (~2 min)

Runs alternate A B B A (qsd, ours, ours, qsd) because the 2 cores are shared by QEMU's TCG
thread, its main loop and the back-end, which makes single runs noisy; each boot gets a
fresh server. Six workloads per boot (boot.sh --mode bench): 1 MiB sequential read and
write at QD1, 4 KiB random read and write at QD1 and QD16. Output: the section between
this script's markers in OUT/REPORT.md (the rest is kept), OUT/results/guest.json.
Numbers under TCG rank back-ends; they are not what a KVM guest sees.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report as report_md  # noqa: E402
from servers import stop_process  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED = Path(os.environ.get("BLKTAP_SHARED", ROOT.parent / "shared"))
GUEST = SHARED / "guest-testbed"
BEGIN = "<!-- bench/guest.py: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/guest.py: end -->"
SERVERS = ("qsd", "ours")
RESULT = re.compile(r"RESULT mode=(\S+) bs=(\d+) qd=(\d+) iops=([\d.]+) MiBps=([\d.]+) "
                    r"lat_us=([\d.]+)")


def blktap() -> str:
    exe = ROOT / ".venv" / "bin" / "blktap"
    return str(exe) if exe.exists() else (shutil.which("blktap") or str(exe))


def start(kind: str, image: Path, sock: Path, log: Path) -> subprocess.Popen:
    if kind == "qsd":
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=on",
                "--blockdev", "driver=raw,node-name=d,file=f",
                "--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1"]
    else:
        argv = [blktap(), "serve", f"aio:{image}", "--vhost-user", str(sock)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, timeout=20)
            raise RuntimeError(f"{kind} did not listen: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def parse(output: str) -> dict[str, dict[str, float]]:
    """blkbench's RESULT lines, keyed "randread 4k qd16" and so on."""
    out = {}
    for m in RESULT.finditer(output):
        mode, bs, qd = m.group(1), int(m.group(2)), int(m.group(3))
        size = f"{bs >> 20}M" if bs >= 1 << 20 else f"{bs >> 10}k"
        out[f"{mode} {size} qd{qd}"] = {"iops": float(m.group(4)), "MiBps": float(m.group(5)),
                                         "lat_us": float(m.group(6))}
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload: each server's median IOPS and MiB/s, and ours over qsd."""
    rows = []
    workloads = list(dict.fromkeys(w for r in runs for w in r["results"]))
    for w in workloads:
        row: dict[str, Any] = {"workload": w}
        for kind in SERVERS:
            vals = [r["results"][w] for r in runs if r["server"] == kind and w in r["results"]]
            row[kind] = {k: statistics.median(v[k] for v in vals) if vals else None
                         for k in ("iops", "MiBps", "lat_us")}
            row[kind]["n"] = len(vals)
        q, o = row["qsd"]["iops"], row["ours"]["iops"]
        row["ratio"] = o / q if q and o else None
        rows.append(row)
    return rows


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "## Guest path: vhost-user-blk, ours against qemu-storage-daemon (bench/guest.py)",
        "",
        f"{data['date']}, {'quick, ' if s['quick'] else ''}order {' '.join(s['order'])}, "
        f"blkbench --secs {s['secs']} --qd {s['qd']} in a Linux guest under QEMU "
        f"{s['accel']} (1 vCPU, 512 MiB), {s['image_mib']} MiB raw image (all written); load "
        "average "
        f"{data['loadavg_start'][0]:.2f} at the start, {data['loadavg_end'][0]:.2f} at the end. "
        "Medians over the boots of each server; the ratio is ours over qsd (IOPS; above 1 "
        "is faster). TCG numbers rank the back-ends, they are not a KVM guest's.",
        "",
        "| workload | qsd IOPS | ours IOPS | qsd MiB/s | ours MiB/s | qsd lat µs | ours lat µs "
        "| ours/qsd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, digits: int = 0) -> str:
        return "–" if v is None else f"{v:,.{digits}f}"
    for r in data["rows"]:
        q, o = r["qsd"], r["ours"]
        lines.append(f"| {r['workload']} | {f(q['iops'])} | {f(o['iops'])} | "
                     f"{f(q['MiBps'], 1)} | {f(o['MiBps'], 1)} | {f(q['lat_us'], 1)} | "
                     f"{f(o['lat_us'], 1)} | "
                     f"{'–' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} |")
    failed = [f"{r['server']} #{r['round']}" for r in data["runs"] if not r["ok"]]
    if failed:
        lines += ["", f"Boots that failed (left out): {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def replace_section(old: str, section: str) -> str:
    """REPORT.md with this script's section replaced (bench/report.py does the work)."""
    return report_md.replace_section(old, section, BEGIN, END)


def build(testbed: Path) -> None:
    res = subprocess.run(["bash", str(GUEST / "build.sh")], capture_output=True, text=True,
                         env={**os.environ, "GUEST_TESTBED_DIR": str(testbed)}, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"guest-testbed build.sh failed:\n{res.stdout}\n{res.stderr}")


def boot(testbed: Path, sock: Path, secs: int, qd: int) -> tuple[bool, str]:
    res = subprocess.run(["bash", str(GUEST / "boot.sh"), "--mode", "bench", "--secs", str(secs),
                          "--qd", str(qd), "--timeout", "600", "vhost", str(sock)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "GUEST_TESTBED_DIR": str(testbed)})
    return res.returncode == 0, res.stdout + res.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one A B, --secs 1")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A B B A (default 2)")
    ap.add_argument("--secs", type=int, default=3, help="seconds per workload (default 3)")
    ap.add_argument("--qd", type=int, default=16, help="queue depth of the QD runs (16)")
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=BENCH, help="where REPORT.md and results/ go")
    ap.add_argument("--testbed", type=Path, default=Path(os.environ.get(
        "GUEST_TESTBED_DIR", "/var/tmp/blktap-guest-testbed")))
    args = ap.parse_args(argv)
    if not (GUEST / "boot.sh").exists():
        print(f"guest.py: no guest testbed at {GUEST}", file=sys.stderr)
        return 2
    for program in ("qemu-system-x86_64", "qemu-storage-daemon"):
        if shutil.which(program) is None:
            print(f"guest.py: {program} is not installed (scripts/install-deps.sh)",
                  file=sys.stderr)
            return 2
    secs = 1 if args.quick else args.secs
    order = list(SERVERS) if args.quick else [*SERVERS, *reversed(SERVERS)] * args.rounds
    args.testbed.mkdir(parents=True, exist_ok=True)
    build(args.testbed)
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="blktap-guest-bench-") as tmp:
        image = Path(tmp) / "disk.raw"
        # every block written, so that no boot reads holes (faster, and not what a used
        # disk is) and the first boot sees the disk as the later ones do
        block = os.urandom(1 << 20)
        with open(image, "wb") as fimg:
            for _ in range(args.image_mib):
                fimg.write(block)
        for i, kind in enumerate(order):
            sock = Path(tmp) / f"{kind}-{i}.sock"
            log = Path(tmp) / f"{kind}.log"
            proc = start(kind, image, sock, log)
            try:
                ok, output = boot(args.testbed, sock, secs, args.qd)
            finally:
                stop_process(proc, timeout=20)
            results = parse(output)
            ok = ok and len(results) == 6
            print(f"guest.py: {i + 1}/{len(order)} {kind}: {'ok' if ok else 'FAILED'} "
                  + " ".join(f"{w}={v['iops']:.0f}" for w, v in results.items()), flush=True)
            if not ok:
                print(output[-3000:], file=sys.stderr)
            runs.append({"server": kind, "round": i, "ok": ok, "results": results if ok else {}})
    good = [r for r in runs if r["ok"]]
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {"quick": args.quick, "secs": secs, "qd": args.qd, "order": order,
                     "image_mib": args.image_mib, "accel": os.environ.get("GUEST_ACCEL", "tcg")},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "runs": runs, "rows": summarize(good),
    }
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "results" / "guest.json").write_text(json.dumps(data, indent=1) + "\n")
    report = args.out / "REPORT.md"
    old = report.read_text() if report.exists() else ""
    report.write_text(replace_section(old, markdown(data)))
    print(markdown(data))
    return 0 if len(good) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
