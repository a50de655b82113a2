#!/usr/bin/env python3
"""Benchmark of the Xen path: a busybox PV domU in the Xen testbed (shared/xen-testbed:
Xen 4.17 and a Debian 12 dom0 under QEMU/TCG) runs blkbench on its xen-blkfront disk,
served by the kernel's xen-blkback (the rig's ``blkback-kernel`` scenario) and by ours
(``userspace-pv``: our tapdisk on ``aio:`` through tapback, as tests/test_xen_guest.py
runs it), on the same raw image, interleaved: kernel, ours, kernel, ours, ...

    .venv/bin/python bench/xen.py                 # 2 repetitions, 5 s per workload
    .venv/bin/python bench/xen.py --reps 3 --secs 3

Six workloads per boot, O_DIRECT on /dev/xvda: 1 MiB sequential read and write at QD1,
4 KiB random read and write at QD1 and QD8 (blkbench threads). Each repetition boots the
guest once on each back-end; the figure is ours over kernel blkback within a repetition,
reported as the median of those ratios with their min–max. TCG makes the absolute numbers
meaningless; the ratio in the same run is the figure. Output: the section between this
script's markers in OUT/REPORT.md (the rest is kept), OUT/results/xen.json.

Builds what it needs: blkbench (gcc -static, from the guest testbed's blkbench.c) and the
Xen testbed (its build.sh, root, when XEN_TESTBED_DIR has no build), or says what is
missing. Each boot takes 1-10 minutes depending on the machine's load.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tests"))

import guest  # noqa: E402  (blkbench's RESULT lines)
import report as report_md  # noqa: E402

SHARED = Path(os.environ.get("BLKTAP_SHARED", ROOT.parent / "shared"))
TESTBED = SHARED / "xen-testbed"
BLKBENCH_C = SHARED / "guest-testbed" / "blkbench.c"
BEGIN = "<!-- bench/xen.py: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/xen.py: end -->"


def variant(cache: str, grants: str) -> str:
    """The run's options as they name its report section and results file: "" for the
    default (O_DIRECT, persistent grants), else e.g. "buffered", "copy"."""
    return " ".join(([] if cache == "direct" else [cache])
                    + ([] if grants == "persistent" else [grants]))


def markers(name: str) -> tuple[str, str]:
    """The report section's markers: the default run's, or a variant's."""
    if not name:
        return BEGIN, END
    return BEGIN.replace("xen.py:", f"xen.py {name}:"), END.replace("xen.py:", f"xen.py {name}:")
KERNEL, OURS = "blkback", "ours"
# blkbench MODE BS THREADS, in this order in each boot
WORKLOADS = (("read", 1 << 20, 1), ("write", 1 << 20, 1), ("randread", 4096, 1),
             ("randread", 4096, 8), ("randwrite", 4096, 1), ("randwrite", 4096, 8))
# (goal, workloads it covers, target ratio): issue 12's speed goals
GOALS = (("1 MiB sequential >= 1.0x kernel blkback", ("read 1M qd1", "write 1M qd1"), 1.0),
         ("4 KiB random >= 0.8x kernel blkback",
          ("randread 4k qd1", "randread 4k qd8", "randwrite 4k qd1", "randwrite 4k qd8"),
          0.8))
# What blkfront negotiated, from the rig's last XenStore picture (out/xenstore-last.txt)
XS_KEYS = ("backend/max-ring-page-order", "frontend/ring-page-order",
           "backend/multi-queue-max-queues", "frontend/multi-queue-num-queues",
           "backend/feature-max-indirect-segments", "backend/feature-persistent",
           "frontend/feature-persistent")
RUN_TIMEOUT = 1800

GUEST_SCRIPT = r"""#!/bin/busybox sh
# bench/xen.py's guest workload: blkbench, which the image carries gzipped at byte @OFF@
# (the domU's initrd is no place for large files), then the workloads on the disk.
DEV=$1
SECS=@SECS@
dd if=$DEV bs=4096 skip=@SKIP@ count=@COUNT@ 2>/dev/null | head -c @LEN@ | gunzip > /tmp/blkbench ||
  { echo "XBENCH unpack failed"; exit 1; }
chmod 755 /tmp/blkbench
sum=$(md5sum /tmp/blkbench); sum=${sum%% *}
[ "$sum" = @MD5@ ] || { echo "XBENCH blkbench md5 $sum, not @MD5@"; exit 1; }
q=/sys/block/xvda/queue
echo "XBENCH queue max_segments=$(cat $q/max_segments)" \
  "max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) write_cache=$(cat $q/write_cache)" \
  "hw_queues=$(ls -d /sys/block/xvda/mq/* | wc -l)"
FAILED=0
OLDIFS=$IFS
for w in @WORKLOADS@; do
  IFS=:; set -- $w; IFS=$OLDIFS
  /tmp/blkbench $DEV $1 $2 $3 $SECS || { echo "XBENCH failed $w"; FAILED=1; }
done
exit $FAILED
"""


def carry(blkbench: bytes, size: int) -> tuple[int, bytes]:
    """Where the image carries blkbench, and the bytes it holds there (gzipped; the last
    4 KiB-aligned stretch of the disk that fits)."""
    packed = gzip.compress(blkbench, 9)
    offset = (size - len(packed)) // 4096 * 4096
    if offset < size // 2:
        raise ValueError(f"a {size >> 20} MiB image is too small to carry blkbench")
    return offset, packed


def guest_script(blkbench: bytes, secs: int, offset: int, packed_len: int) -> str:
    """The domU's script: it takes blkbench (packed_len gzipped bytes at offset) off the
    disk, checks its md5 and runs the workloads."""
    return (GUEST_SCRIPT.replace("@SECS@", str(secs)).replace("@OFF@", str(offset))
            .replace("@SKIP@", str(offset // 4096))
            .replace("@COUNT@", str(-(-packed_len // 4096))).replace("@LEN@", str(packed_len))
            .replace("@MD5@", hashlib.md5(blkbench).hexdigest())
            .replace("@WORKLOADS@", " ".join(f"{m}:{bs}:{t}" for m, bs, t in WORKLOADS)))


def write_image(path: Path, mib: int, blkbench: bytes) -> tuple[int, int]:
    """A raw image of random data (every block written: no boot reads holes) carrying
    blkbench; returns where it sits and its packed length (the script's arguments)."""
    size = mib << 20
    offset, packed = carry(blkbench, size)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.seek(offset)
        f.write(packed)
    return offset, len(packed)


def backend_cmd(cache: str = "direct", grants: str = "persistent") -> str:
    """Our back-end in dom0, as the Xen guest tests run it (tap-ctl create of aio:IMAGE
    before the guest, the block-userspace hotplug script naming it, tapback serving);
    with cache "buffered", tap-ctl create -D (no O_DIRECT: dom0's page cache, as kernel
    blkback's loop device); with grants "copy", tapback --no-persistent-grants."""
    from test_xen_guest import BACKEND_CMD
    cmd = BACKEND_CMD
    if cache != "direct":
        assert "tap-ctl create -a aio:" in cmd
        cmd = cmd.replace("tap-ctl create -a aio:", "tap-ctl create -D -a aio:")
    if grants == "copy":
        assert "blktap.cli.tapback -d" in cmd
        cmd = cmd.replace("blktap.cli.tapback -d",
                          "blktap.cli.tapback --no-persistent-grants -d")
    return cmd


def ratios(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per workload, ours over kernel blkback (IOPS) within each repetition in which both
    boots passed and measured it."""
    out: dict[str, list[float]] = {}
    for rep in sorted({r["rep"] for r in runs}):
        pair = {r["backend"]: r for r in runs if r["rep"] == rep and r["ok"]}
        if KERNEL not in pair or OURS not in pair:
            continue
        k, o = pair[KERNEL]["results"], pair[OURS]["results"]
        for w in k:
            if w in o and k[w]["iops"] > 0:
                out.setdefault(w, []).append(o[w]["iops"] / k[w]["iops"])
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per workload: each back-end's median IOPS and MiB/s over its good boots, and
    the median, min and max of the per-repetition ratios."""
    per_rep = ratios(runs)
    rows = []
    for w in dict.fromkeys(w for r in runs for w in r["results"]):
        row: dict[str, Any] = {"workload": w}
        for kind in (KERNEL, OURS):
            vals = [r["results"][w] for r in runs
                    if r["backend"] == kind and r["ok"] and w in r["results"]]
            row[kind] = {k: statistics.median(v[k] for v in vals) if vals else None
                         for k in ("iops", "MiBps", "lat_us")}
        rs = per_rep.get(w, [])
        row["ratios"] = rs
        row["ratio"] = statistics.median(rs) if rs else None
        row["min"] = min(rs) if rs else None
        row["max"] = max(rs) if rs else None
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["workload"]: r for r in rows}
    out = []
    for goal, names, target in GOALS:
        for w in names:
            v = by[w]["ratio"] if w in by else None
            out.append({"goal": goal, "workload": w, "target": target, "value": v,
                        "met": None if v is None else v >= target})
    return out


def xenstore(out: Path) -> dict[str, str]:
    from test_xen_guest import xenstore_keys
    keys = xenstore_keys(out)
    return {k: keys[k] for k in XS_KEYS if k in keys}


# The ring's summary in tapdisk's log when the guest's device goes (blkif.py's summary)
RING_SUMMARY = re.compile(r"disconnected \((\d+) requests: .*process CPU ([\d.]+) s user, "
                          r"([\d.]+) s system in ([\d.]+) s\)")


def tapdisk_cpu(out: Path) -> dict[str, float] | None:
    """What serving the ring cost our tapdisk (its log, back in OUT/out): requests, CPU
    seconds (user, system) and wall seconds from connect to disconnect."""
    for log in sorted((out / "out").glob("tapdisk.*.log")):
        hit = RING_SUMMARY.search(log.read_text(errors="replace"))
        if hit:
            n, user, system, wall = (float(v) for v in hit.groups())
            return {"requests": n, "user": user, "system": system, "wall": wall}
    return None


def parse_console(text: str) -> tuple[dict[str, dict[str, float]], str]:
    """blkbench's results and the guest's XBENCH queue line from the domU console."""
    m = re.search(r"XBENCH queue (.*)", text)
    return guest.parse(text), (m.group(1).strip() if m else "")


def grants(settings: dict[str, Any]) -> str:
    """How a run's ring reached the guest's data (runs before persistent grants existed,
    or before they became tapback's default, copied)."""
    if "grants" in settings:
        return settings["grants"]
    return "persistent" if settings.get("persistent_grants") else "copy"


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]

    def f(v: float | None, digits: int = 0) -> str:
        return "–" if v is None else f"{v:,.{digits}f}"

    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}x"
    load = data["loadavg"]
    lines = [
        "## Xen path: our tapdisk + tapback against kernel blkback (bench/xen.py"
        + ("" if s.get("cache", "direct") == "direct" else f" --cache {s['cache']}")
        + (" --grants copy" if grants(s) == "copy" else "") + ")",
        "",
        f"{data['date']}, source {data['source']}. Order {' '.join(s['order'])}; "
        f"blkbench {s['secs']} s per workload, O_DIRECT on /dev/xvda, in a busybox PV domU "
        f"(Xen testbed: Xen 4.17, Debian 12 dom0, QEMU TCG with -cpu {s['qemu_cpu']}); "
        f"{s['image_mib']} MiB raw image of random data, the same for both. Kernel blkback "
        "serves it the rig's way (`phy` target, the stock block script's loop device, "
        "buffered in dom0's page cache); ours opens it `aio:` "
        + ("(O_DIRECT)" if s.get("cache", "direct") == "direct"
           else "buffered (`tap-ctl create -D`: no O_DIRECT, dom0's page cache as the "
           "loop device)")
        + " in a tapdisk driven by our tapback"
        + (", with a grant copy per request (`tapback --no-persistent-grants`)"
           if grants(s) == "copy" else ", with persistent grants (tapback's default: the "
           "guest's pages mapped once and kept, no grant copy)")
        + ". Ratio: ours over kernel blkback (IOPS) within a repetition; median "
        "and min–max over the repetitions. TCG makes the absolute numbers meaningless.",
        "",
        f"Load average (1 min) on this 2-CPU host: {load['start']:.1f} at the start, "
        + ", ".join(f"{v:.1f}" for v in load["boots"])
        + " at each boot's end. The machine is shared: "
        + ("**a disturbed run (load above 3), not a verdict**."
           if max([load["start"], *load["boots"]]) > 3 else "a quiet run.")
        + f" The whole run took {data['seconds'] / 60:.0f} min.",
        "",
        "| workload | blkback IOPS | ours IOPS | blkback MiB/s | ours MiB/s | blkback lat µs "
        "| ours lat µs | ours/blkback | min–max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        k, o = r[KERNEL], r[OURS]
        lines.append(f"| {r['workload']} | {f(k['iops'])} | {f(o['iops'])} | "
                     f"{f(k['MiBps'], 1)} | {f(o['MiBps'], 1)} | {f(k['lat_us'], 1)} | "
                     f"{f(o['lat_us'], 1)} | {x(r['ratio'])} | {x(r['min'])}–{x(r['max'])} |")
    lines += ["", "| goal | workload | target | median ratio | verdict |", "|---|---|---|---|---|"]
    shown = None
    for g in data["goals"]:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
        lines.append(f"| {'' if g['goal'] == shown else g['goal']} | {g['workload']} | "
                     f"{g['target']:.1f}x | {x(g['value'])} | {verdict} |")
        shown = g["goal"]
    lines += ["", "Boots (what blkfront saw; XenStore after negotiation):", ""]
    for r in data["runs"]:
        state = "ok" if r["ok"] else f"**failed** ({r['why']})"
        xs = ", ".join(f"{k}={v}" for k, v in r["xenstore"].items())
        cpu = ""
        if td := r.get("tapdisk"):
            used = td["user"] + td["system"]
            cpu = (f"; tapdisk: {td['requests']:,.0f} requests, CPU {td['user']:.1f} s user + "
                   f"{td['system']:.1f} s system in {td['wall']:.0f} s "
                   f"({100 * used / td['wall']:.0f}% of a CPU), "
                   f"{1000 * used / max(1, td['requests']):.2f} ms per request")
        lines.append(f"- rep {r['rep']} {r['backend']}: {state}, {r['secs']:.0f} s; "
                     f"{r['queue'] or 'no queue line'}; {xs or 'no XenStore picture'}{cpu}")
    return "\n".join(lines) + "\n"


def git_source() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def build_blkbench(work: Path) -> bytes:
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is missing (scripts/install-deps.sh: gcc, libc6-dev)")
    exe = work / "blkbench"
    r = subprocess.run(["gcc", "-O2", "-static", "-pthread", "-s", "-o", str(exe),
                        str(BLKBENCH_C)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"blkbench did not build (static glibc: libc6-dev): {r.stderr}")
    return exe.read_bytes()


def build_testbed(work: Path) -> None:
    """The testbed's build.sh, as tests/conftest.py runs it (root, once)."""
    if (work / ".built").exists():
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the Xen testbed is not built in {work}; build.sh needs root")
    r = subprocess.run(["bash", str(TESTBED / "build.sh")], capture_output=True, text=True,
                       env=dict(os.environ, XEN_TESTBED_DIR=str(work)), check=False,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError("the Xen testbed's build.sh failed:\n" + (r.stdout + r.stderr)[-2000:])


def boot(work: Path, out: Path, kind: str, script: Path, image: Path, payload: Path,
         qemu_cpu: str, cache: str = "direct", grants: str = "persistent") -> dict[str, Any]:
    cmd = [str(TESTBED / "run.sh"), "--out", str(out), "--guest-script", str(script),
           "--image", str(image), "--domu-timeout", "900", "--backend-wait", "120",
           "--timeout", str(RUN_TIMEOUT - 60)]
    if kind == KERNEL:
        cmd += ["--scenario", "blkback-kernel"]
    else:
        cmd += ["--scenario", "userspace-pv", "--payload", str(payload),
                "--backend", backend_cmd(cache, grants)]
    env = dict(os.environ, XEN_TESTBED_DIR=str(work), QEMU_CPU=qemu_cpu)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                           timeout=RUN_TIMEOUT)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        rc, text = -1, "run.sh timed out"
    secs = time.monotonic() - t0
    console = out / "out" / "domU-console.log"
    results, queue = parse_console(console.read_text(errors="replace")
                                   if console.exists() else text)
    ok = rc == 0 and len(results) == len(WORKLOADS)
    why = ""
    if not ok:
        last = [ln for ln in text.splitlines() if "XEN-TESTBED:" in ln][-1:]
        why = f"rc={rc}, {len(results)} results" + (f"; {last[0].strip()}" if last else "")
    return {"backend": kind, "ok": ok, "why": why, "secs": secs, "results": results,
            "queue": queue, "xenstore": xenstore(out), "dir": str(out),
            "tapdisk": tapdisk_cpu(out) if kind == OURS else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="repetitions (boots of each, "
                    "interleaved; default 2)")
    ap.add_argument("--secs", type=int, default=5, help="seconds per workload (default 5)")
    ap.add_argument("--image-mib", type=int, default=128)
    ap.add_argument("--out", type=Path, default=BENCH, help="where REPORT.md and results/ go")
    ap.add_argument("--cache", choices=("direct", "buffered"), default="direct",
                    help="how our tapdisk opens the image: direct (O_DIRECT, the default, "
                    "what tap-ctl create does) or buffered (tap-ctl create -D: dom0's page "
                    "cache, as the rig's kernel blkback through its loop device)")
    ap.add_argument("--grants", choices=("persistent", "copy"), default="persistent",
                    help="how our ring reaches the guest's data: persistent (tapback's "
                    "default: blkfront reuses granted pages, which the ring maps once) or "
                    "copy (tapback --no-persistent-grants: a grant copy per request)")
    ap.add_argument("--keep", type=Path, help="keep the rig's run directories here")
    ap.add_argument("--testbed", type=Path, default=Path(os.environ.get(
        "XEN_TESTBED_DIR", "/var/tmp/xen-testbed")))
    args = ap.parse_args(argv)
    # QEMU's default "max" CPU crashes dom0 programs under load; Xen's own CI uses this.
    qemu_cpu = os.environ.get("QEMU_CPU", "qemu64,+svm")
    if not (TESTBED / "run.sh").exists() or not BLKBENCH_C.exists():
        print(f"xen.py: no Xen testbed or blkbench.c under {SHARED}", file=sys.stderr)
        return 2
    if shutil.which("qemu-system-x86_64") is None:
        print("xen.py: qemu-system-x86_64 is missing (qemu-system-x86; the testbed's build.sh "
              "installs it)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="blktap-xen-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            build_testbed(args.testbed)
            blkbench = build_blkbench(tmp)
            image = tmp / "disk.img"
            offset, packed_len = write_image(image, args.image_mib, blkbench)
            script = tmp / "guest.sh"
            script.write_text(guest_script(blkbench, args.secs, offset, packed_len))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            print(f"xen.py: {e}", file=sys.stderr)
            return 2
        payload = tmp / "payload"
        shutil.copytree(ROOT / "src", payload / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        order: list[str] = []
        runs: list[dict[str, Any]] = []
        boots_load: list[float] = []
        for rep in range(args.reps):
            for kind in (KERNEL, OURS):
                order.append(kind)
                out = (args.keep or tmp) / f"rep{rep}-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                run = boot(args.testbed, out, kind, script, image, payload, qemu_cpu,
                           args.cache, args.grants)
                run["rep"] = rep
                boots_load.append(os.getloadavg()[0])
                runs.append(run)
                print(f"xen.py: rep {rep} {kind}: "
                      + ("ok " if run["ok"] else f"FAILED ({run['why']}) ")
                      + f"{run['secs']:.0f} s load {boots_load[-1]:.1f} "
                      + " ".join(f"{w.replace(' ', '-')}={v['iops']:.0f}"
                                 for w, v in run["results"].items()), flush=True)
    rows = summarize(runs)
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "source": git_source(),
        "settings": {"reps": args.reps, "secs": args.secs, "image_mib": args.image_mib,
                     "order": order, "qemu_cpu": qemu_cpu,
                     "cache": args.cache, "grants": args.grants},
        "loadavg": {"start": load_start, "boots": boots_load},
        "seconds": time.monotonic() - t_start,
        "runs": runs, "rows": rows, "goals": goals(rows),
    }
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    name = variant(args.cache, args.grants)
    results = f"xen-{name.replace(' ', '-')}.json" if name else "xen.json"
    (args.out / "results" / results).write_text(json.dumps(data, indent=1) + "\n")
    report = args.out / "REPORT.md"
    old = report.read_text() if report.exists() else ""
    section = markdown(data)
    report.write_text(report_md.replace_section(old, section, *markers(name)))
    print(section)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
