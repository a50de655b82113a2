"""Output of bench/run.py: the benchmark's section of REPORT.md (between markers, the
other sections kept), results/latest.json and the ratio chart results/ratios.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import calibrate

BEGIN = "<!-- bench/run.py: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/run.py: end -->"


def replace_section(old: str, section: str, begin: str = BEGIN, end_marker: str = END) -> str:
    """`old` with the text between the markers replaced by `section` (appended, after
    one blank line, when the markers are not there yet). Each benchmark script owns its
    pair of markers (bench/run.py's by default)."""
    block = f"{begin}\n{section.rstrip()}\n{end_marker}\n"
    start = old.find(begin)
    end = old.find(end_marker, start if start >= 0 else 0)
    if start >= 0 and end >= 0:
        return old[:start] + block + old[end + len(end_marker):].lstrip("\n")
    if not old.strip():
        return "# Benchmark report\n\n" + block
    return old.rstrip("\n") + "\n\n" + block


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:,.1f}"


def fmt_load(load: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:+.0f}%"


def fmt_spread(sp: dict[str, Any] | None) -> str:
    """min–max of per-repetition ratios, with the IQR when there are 4 or more."""
    if not sp:
        return "–"
    text = f"{sp['min']:.2f}–{sp['max']:.2f}"
    if sp["n"] >= 4:
        text += f" (IQR {sp['q1']:.2f}–{sp['q3']:.2f})"
    return text + f", n={sp['n']}"


def _quiet_lines(data: dict[str, Any]) -> list[str]:
    q = data.get("quiet")
    s = data["settings"]
    if not q:
        return ["**No quiet reference** (`bench/quiet.json` not recorded): nothing tells a "
                "quiet machine's figures from a disturbed one's, so the goals are not judged. "
                "`bench/run.py --record-quiet` on a quiet machine records it "
                "(docs/benchmarks.md).", ""]
    qm = q.get("machine") or {}
    cal = q.get("calibration") or {}
    text = (f"Quiet reference: recorded {q.get('recorded')} on {qm.get('cpus')} CPUs "
            f"({qm.get('cpu_model')})" + (" by this run" if q.get("this_run") else "")
            + "; calibration " + calibrate.describe(cal) + ".")
    qs = q.get("settings") or {}
    if any(qs.get(k) != s.get(k) for k in ("size", "runtime")):
        text += (f" Its figures were taken with {qs.get('size', 0) >> 20} MiB images and "
                 f"{qs.get('runtime')} s jobs, this run's with {s['size'] >> 20} MiB and "
                 f"{s['runtime']:g} s: the quiet column is indicative only.")
    if q.get("mismatch"):
        text += f" **{q['mismatch']}**: the calibration is not compared."
    return [text, ""]


def _repetition_lines(data: dict[str, Any]) -> list[str]:
    reps = data.get("repetitions") or []
    if not reps:
        return []
    prov = data.get("provisional_calibration")
    against = ("the quiet reference" if not prov else
               f"this recording run's opening calibration (medians of three: "
               f"{calibrate.describe(prov)})")
    lines = ["### Repetitions", "",
             "Calibration before each repetition (cpu1: a Python loop in one process, cpu2: "
             "in two at once, M loops/s; fio: 4 KiB random psync reads of a tmpfs file, "
             f"IOPS), its deviation from {against}, and what the sampler saw during "
             "the repetition: CPU of processes not the benchmark's (share of all CPUs), steal "
             "time, runnable threads not ours (mean), load average (1 min) at the end. A "
             "disturbed repetition is run again; only the last attempt of each is kept.", "",
             "| group | rep | attempt | cpu1 | cpu2 | fio | others' CPU | steal | runnable "
             "| load | state |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reps:
        cal, dev, smp = r.get("calibration", {}), r.get("deviation", {}), r.get("sample", {})

        def cell(name: str, cal: dict[str, Any] = cal, dev: dict[str, Any] = dev) -> str:
            if name not in cal:
                return "–"
            v = f"{cal[name]:,.0f}" if name == "fio" else f"{cal[name]:.2f}"
            return v + (f" ({fmt_pct(dev[name])})" if name in dev else "")
        if r["reasons"]:
            state = "**disturbed**: " + "; ".join(r["reasons"])
        else:
            state = "ok"
        state += "" if r.get("kept") else " (discarded)"
        load = smp.get("loadavg_end") or [None]
        lines.append(
            f"| {r['group']} | {r['rep'] + 1} | {r['attempt'] + 1} | {cell('cpu1')} | "
            f"{cell('cpu2')} | {cell('fio')} | {smp.get('other_share', 0) * 100:.0f}% | "
            f"{smp.get('steal_share', 0) * 100:.0f}% | {smp.get('other_runnable', 0):.2f} | "
            + ("–" if load[0] is None else f"{load[0]:.2f}") + f" | {state} |")
    return lines + [""]


def goal_lines(data: dict[str, Any]) -> list[str]:
    checks = data["goals"]
    lines = ["### Goals", ""]
    if data.get("not_judged"):
        lines += [f"**Not judged: {data['not_judged']}.** The ratios are shown; no goal is "
                  "called met or not met from this run.", ""]
    groups = data.get("disturbed_groups") or {}
    if groups:
        lines += [f"**Disturbed: {'; '.join(groups.values())}.** The checks over "
                  f"{_and(list(groups))} are not judged; the others' groups ran in "
                  "repetitions of their own, each calibrated and sampled, and are.", ""]
    lines += ["Each ratio is the median over the kept repetitions of the ratio within the "
              "repetition, with its min–max (IQR from 4 repetitions).", "",
              "| goal | ratio checked | target | median | min–max | verdict |",
              "|---|---|---|---|---|---|"]
    shown = None
    for c in checks:
        val = "–" if c["value"] is None else f"{c['value']:.2f}"
        goal = "" if c["goal"] == shown else c["goal"]
        shown = c["goal"]
        sp = c.get("spread")
        rng = "–" if not sp else fmt_spread(sp)
        verdict = "not judged" if c["value"] is not None and c.get("not_judged") \
            else c["verdict"]
        lines.append(f"| {goal} | {c['what']} | {c['target']} | {val} | {rng} | "
                     f"{verdict} |")
    met = sum(1 for c in checks if c["met"] is True)
    missed = sum(1 for c in checks if c["met"] is False)
    unknown = sum(1 for c in checks if c["value"] is None)
    unjudged = sum(1 for c in checks if c["value"] is not None and c.get("not_judged"))
    lines += ["", f"{met} checks met, {missed} not met, {unjudged} not judged, {unknown} not "
              "measured. By goal:", ""]
    for goal in dict.fromkeys(c["goal"] for c in checks):
        cs = [c for c in checks if c["goal"] == goal]
        verdict = goal_verdict(cs)
        ok = sum(1 for c in cs if c["met"] is True)
        lines.append(f"- {goal}: **{verdict}** ({ok} of {len(cs)} checks met)")
    stated = {data.get("not_judged"), *groups.values()}  # (said above the table)
    alone = [c for c in checks if c["value"] is not None and c.get("not_judged")
             and c["not_judged"] not in stated]
    if alone:
        lines += ["", "Not judged, each for its own reason (a reference far below its quiet "
                  "figure would make the ratio look better than a quiet machine gives):", ""]
        lines += [f"- {c['what']} ({c['value']:.2f}): {c['not_judged']}" for c in alone]
    missing = [c for c in checks if c.get("profile")]
    if missing:
        lines += ["", "Where to look, for each check whose figure misses its target "
                  "(`bench/where.py` samples `blktap serve` under that workload; images "
                  "like the run's, bench/images.py):", ""]
        for c in missing:
            lines.append(f"- {c['what']} ({c['value']:.2f}, target {c['target']}): "
                         f"`{c['profile']}`")
    return lines + [""]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def goal_verdict(cs: list[dict[str, Any]]) -> str:
    if all(c["value"] is None for c in cs):
        return "not measured"
    reason = next((c["not_judged"] for c in cs if c.get("not_judged")), None)
    if reason:
        return "not judged"
    return "not met" if any(c["met"] is False for c in cs) else "met"


def markdown(data: dict[str, Any], chart: str | None) -> str:
    s = data["settings"]
    m = data["machine"]
    lines = [
        "## NBD servers (bench/run.py)",
        "",
        f"Date: {data['date']}. Machine: {m['cpus']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gib']:.0f} GiB, Linux {m['kernel']}, Python {m['python']}"
        + (f", net.core.wmem_max {m['wmem_max']}" if m.get("wmem_max") else "") + ".",
        f"Load average (1, 5, 15 min) at the start {fmt_load(m['loadavg_start'])}, at the "
        f"end {fmt_load(m['loadavg_end'])}.",
        "Tools: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        f"Source: commit {data.get('source', '?')}. Command: `{data['command']}`"
        + (" (quick mode: tiny sizes, not for conclusions)" if s["quick"] else "") + ".",
        "",
    ]
    if data.get("not_judged"):
        lines += [f"**Goals not judged: {data['not_judged']}.**", ""]
    elif data.get("disturbed"):
        lines += [f"**Checks over a disturbed group not judged: {data['disturbed']}.**", ""]
    lines += _quiet_lines(data)
    lines += [
        f"Image size {s['size'] >> 20} MiB; {s['reps']} repetition(s) of {s['runtime']:g} s "
        "per job. In a repetition each workload runs on every server of the group back to "
        "back, each server started afresh for the job, the servers' order rotated from one "
        "repetition to the next (A B C, B C A, ...). Figures are medians with the min–max "
        "over the kept repetitions; the ratio to the group's reference is the median of "
        "the ratios within each repetition, with their min–max (and IQR from 4 "
        "repetitions). The quiet column is the quiet reference's figure (this run's median "
        "as a share of it). CPU is the "
        "server process's user+system time (/proc/PID/stat) over the job divided by the "
        "I/Os done (nbdcopy: 256 KiB requests). A repetition is disturbed when a "
        f"calibration figure is off the quiet one by more than {s['threshold'] * 100:.0f}%, "
        f"other processes used more than {s['limits']['max_other_cpu'] * 100:.0f}% of the "
        f"CPUs, steal exceeded {s['limits']['max_steal'] * 100:.0f}% or more than "
        f"{s['limits']['max_other_runnable']:g} threads not ours were runnable on average; "
        f"it is run again up to {s['retries']} time(s).",
        "",
        "Images hold random data, every block allocated: raw files on tmpfs (/dev/shm) and on "
        "disk (a directory beside the checkout), a dynamic VHD (`blktap convert`) on tmpfs, "
        "and chains on tmpfs whose data is all in the base VHD, the upper layers empty "
        "snapshots (`vhd-util snapshot -e`), served read-only. Servers:",
        "",
    ]
    for name, cmd in data["server_commands"].items():
        lines.append(f"- {name}: `{cmd}`")
    for name, why in data["skipped"].items():
        lines.append(f"- {name}: **skipped** ({why})")
    lines += ["", "Workloads (URI = the server's; nbdcopy repeats until the job's time is up):",
              ""]
    for name, cmd in data["workload_commands"].items():
        lines.append(f"- {name}: `{cmd}`")
    lines += ["", f"The whole run took {data['seconds'] / 60:.1f} min.", ""]
    lines += _repetition_lines(data)
    for g in data["groups"]:
        ref = g["reference"]
        lines += [f"### {g['title']}", "",
                  f"| workload | server | median | min–max | quiet | unit | CPU µs/IO | "
                  f"vs {ref} | ratio min–max |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in g["rows"]:
            quiet = fmt_value(row.get("quiet"), row["unit"])
            if row.get("error"):
                lines.append(f"| {row['workload']} | {row['label']} | failed | "
                             f"{row['error']} | {quiet} | | | | |")
                continue
            cpu = "–" if row["cpu_us_per_io"] is None else f"{row['cpu_us_per_io']:.1f}"
            if row.get("quiet") and row["median"]:
                quiet += f" ({row['median'] / row['quiet'] * 100:.0f}%)"
            lines.append(
                f"| {row['workload']} | {row['label']} | "
                f"{fmt_value(row['median'], row['unit'])} | "
                f"{fmt_value(row['min'], row['unit'])}–{fmt_value(row['max'], row['unit'])} | "
                f"{quiet} | {row['unit']} | {cpu} | {fmt_ratio(row['ratio'])} | "
                f"{fmt_spread(row.get('ratio_spread'))} |")
        for note in g.get("notes", []):
            lines += ["", note]
        lines.append("")
    lines += goal_lines(data)
    if data["memory"]:
        lines += ["### Memory", "", "| process | command | VmRSS MiB | peak (VmHWM) MiB | note |",
                  "|---|---|---|---|---|"]
        for r in data["memory"]:
            rss = "–" if r["rss_kib"] is None else f"{r['rss_kib'] / 1024:.1f}"
            hwm = "–" if r["hwm_kib"] is None else f"{r['hwm_kib'] / 1024:.1f}"
            lines.append(f"| {r['case']} | `{r['command']}` | {rss} | {hwm} | {r['note']} |")
        lines.append("")
    if data["peak_rss"]:
        lines += ["Peak RSS of each server after its workloads (MiB, largest over groups "
                  "and repetitions): " + ", ".join(f"{k} {v / 1024:.0f}"
                                                   for k, v in data["peak_rss"].items()) + ".",
                  ""]
    if chart:
        lines += [f"![ours vs the reference of each group]({chart})", ""]
    else:
        lines += ["(No chart: matplotlib is not installed; `pip install '.[bench]'`.)", ""]
    return "\n".join(lines)


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def chart(data: dict[str, Any], path: Path) -> bool:
    """A bar chart per group: each server's median over the group's reference, per
    workload (1.0 = as fast as the reference). False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [g for g in data["groups"] if any(r.get("ratio") for r in g["rows"])]
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        workloads = list(dict.fromkeys(r["workload"] for r in g["rows"]))
        labels = list(dict.fromkeys(r["label"] for r in g["rows"]))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            vals = []
            for wl in workloads:
                row = next((r for r in g["rows"]
                            if r["label"] == label and r["workload"] == wl), None)
                vals.append(row["ratio"] if row and row.get("ratio") else 0.0)
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(workloads))]
            ax.bar(xs, vals, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
        ax.set_ylabel(f"x {g['reference']}")
        ax.set_title(g["title"], fontsize=10)
        ax.legend(fontsize=7, ncol=min(5, len(labels)))
    fig.suptitle(f"Median of the per-repetition ratios to each group's reference ({data['date']})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
