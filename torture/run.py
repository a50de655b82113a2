"""``make torture``: crash, maintenance-kill, fuzz and soak runs, with a summary.

    python torture/run.py [all|crash|maint|fuzz|soak ...] [--smoke] [--trials N]
                          [--kinds vhd,raw,qcow2,vhost-user,blkif] [--fuzz-runs N]
                          [--soak-seconds S] [--seed N] [--out DIR]

``--smoke`` is the short run CI does (a few minutes in all); without it the figures are
the goals of docs/reliability.md: 1000 kill -9 trials, 200 maintenance kills, 10M
executions per fuzz target, a 5-minute soak. The summary (JSON) goes to OUT/summary.json
and the exit code is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import crash  # noqa: E402
import maint  # noqa: E402
import soak  # noqa: E402

PARTS = ("crash", "maint", "fuzz", "soak")
FUZZ_TARGETS = ("control", "nbd", "nbd-inline", "nbd-inline-qcow2", "vhd", "virtqueue", "blkif",
                "blkif-inline", "qcow2")
# Inputs at most this long (bytes): 16 KiB, but the ring page and its eight granted pages
# for blkif, and for qcow2 its seeds (the one with extended L2 entries needs 16 KiB
# clusters: 99 KiB).
MAX_LEN = {"blkif": 9 * 4096, "blkif-inline": 9 * 4096, "qcow2": 128 << 10}


def fuzz(outdir: Path, runs: int, log=print) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for target in FUZZ_TARGETS:
        corpus = outdir / f"corpus-{target}"
        corpus.mkdir(exist_ok=True)
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, str(HERE / "fuzz.py"), target, f"-runs={runs}", "-timeout=20",
             f"-max_len={MAX_LEN.get(target, 16384)}",
             "-rss_limit_mb=4096", "-print_final_stats=1",
             f"-artifact_prefix={outdir}/{target}-", str(corpus)],
            capture_output=True, text=True)
        done = re.search(r"Done (\d+) runs", res.stderr)
        executed = int(done.group(1)) if done else 0
        cov = re.findall(r"cov: (\d+)", res.stderr)
        crashed = res.returncode != 0
        results[target] = {
            "executions": executed, "seconds": round(time.monotonic() - t0, 1),
            "coverage": int(cov[-1]) if cov else 0, "crashed": crashed,
        }
        if crashed:
            (outdir / f"{target}.log").write_text(res.stderr[-20000:])
            results[target]["log"] = str(outdir / f"{target}.log")
        log(f"fuzz {target}: {executed} executions, coverage {results[target]['coverage']}"
            f": {'CRASH (see ' + str(outdir / f'{target}.log') + ')' if crashed else 'ok'}")
    return {"targets": results, "failed": sum(r["crashed"] for r in results.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", default=["all"], choices=("all", *PARTS))
    ap.add_argument("--smoke", action="store_true", help="the short run CI does")
    ap.add_argument("--trials", type=int, help="kill -9 trials (default 1000, smoke 10)")
    ap.add_argument("--kinds", default=",".join(crash.KINDS),
                    help="kill -9 trials of these kinds, taken in turn (comma-separated; "
                         f"default all: {','.join(crash.KINDS)})")
    ap.add_argument("--maint-trials", type=int, help="maintenance kills (200, smoke 10)")
    ap.add_argument("--fuzz-runs", type=int, help="executions per target (10M, smoke 20k)")
    ap.add_argument("--soak-seconds", type=float, help="soak length (300, smoke 10)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--out", type=Path, default=HERE.parent / ".torture")
    args = ap.parse_args()
    parts = PARTS if "all" in args.parts else tuple(dict.fromkeys(args.parts))
    kinds = tuple(dict.fromkeys(k.strip() for k in args.kinds.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in crash.KINDS]
    if unknown or not kinds:
        ap.error(f"--kinds: unknown {', '.join(unknown) or '(none given)'} "
                 f"(known: {', '.join(crash.KINDS)})")
    smoke = args.smoke
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": args.seed, "smoke": smoke, "parts": {}}
    t0 = time.monotonic()
    if "crash" in parts:
        summary["parts"]["crash"] = crash.run(
            out / "crash", args.trials or (10 if smoke else 1000), args.seed,
            max_kill_after=1.5 if smoke else 3.0, kinds=kinds)
    if "maint" in parts:
        summary["parts"]["maint"] = maint.run(
            out / "maint", args.maint_trials or (10 if smoke else 200), args.seed)
    if "fuzz" in parts:
        summary["parts"]["fuzz"] = fuzz(out / "fuzz",
                                        args.fuzz_runs or (20_000 if smoke else 10_000_000))
    if "soak" in parts:
        s = soak.run(out / "soak", args.soak_seconds or (10 if smoke else 300))
        s["failed"] = int(not s["ok"])
        summary["parts"]["soak"] = s
    summary["seconds"] = round(time.monotonic() - t0, 1)
    failed = sum(p.get("failed", 0) for p in summary["parts"].values())
    summary["failed"] = failed
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"torture: {'FAILED' if failed else 'passed'} ({summary['seconds']} s, "
          f"seed {args.seed}, details in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
