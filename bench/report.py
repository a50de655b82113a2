"""Output of bench/run.py: the benchmark's section of REPORT.md (between markers, the
other sections kept), results/latest.json and the ratio chart results/ratios.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        f"end {fmt_load(m['loadavg_end'])}: other work shares the machine, so read the "
        "spreads.",
        "Tools: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        f"Source: commit {data.get('source', '?')}. Command: `{data['command']}`"
        + (" (quick mode: tiny sizes, not for conclusions)" if s["quick"] else "") + ".",
        f"Image size {s['size'] >> 20} MiB; {s['reps']} repetition(s) of {s['runtime']:g} s "
        "per job; servers interleaved (A B C, B C A, ...), each started afresh on the image "
        "for each repetition and running the group's workloads in turn. Figures are medians "
        "with the min–max over the repetitions; CPU is the server process's user+system "
        "time (/proc/PID/stat) over the job divided by the I/Os done (nbdcopy: 256 KiB "
        "requests).",
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
    for g in data["groups"]:
        ref = g["reference"]
        lines += [f"### {g['title']}", "",
                  f"| workload | server | median | min–max | unit | CPU µs/IO | vs {ref} |",
                  "|---|---|---|---|---|---|---|"]
        for row in g["rows"]:
            if row.get("error"):
                lines.append(f"| {row['workload']} | {row['label']} | failed | "
                             f"{row['error']} | | | |")
                continue
            cpu = "–" if row["cpu_us_per_io"] is None else f"{row['cpu_us_per_io']:.1f}"
            lines.append(
                f"| {row['workload']} | {row['label']} | "
                f"{fmt_value(row['median'], row['unit'])} | "
                f"{fmt_value(row['min'], row['unit'])}–{fmt_value(row['max'], row['unit'])} | "
                f"{row['unit']} | {cpu} | {fmt_ratio(row['ratio'])} |")
        for note in g.get("notes", []):
            lines += ["", note]
        lines.append("")
    lines += ["### Goals", "", "| goal | ratio checked | target | measured | verdict |",
              "|---|---|---|---|---|"]
    shown = None
    for c in data["goals"]:
        val = "–" if c["value"] is None else f"{c['value']:.2f}"
        goal = "" if c["goal"] == shown else c["goal"]
        shown = c["goal"]
        lines.append(f"| {goal} | {c['what']} | {c['target']} | {val} | {c['verdict']} |")
    met = sum(1 for c in data["goals"] if c["met"] is True)
    missed = sum(1 for c in data["goals"] if c["met"] is False)
    unknown = sum(1 for c in data["goals"] if c["met"] is None)
    lines += ["", f"{met} checks met, {missed} not met, {unknown} not measured. By goal:", ""]
    for goal in dict.fromkeys(c["goal"] for c in data["goals"]):
        cs = [c for c in data["goals"] if c["goal"] == goal]
        if all(c["met"] is None for c in cs):
            verdict = "not measured"
        elif all(c["met"] is True for c in cs):
            verdict = "**met**"
        else:
            verdict = "**not met**"
        ok = sum(1 for c in cs if c["met"] is True)
        lines.append(f"- {goal}: {verdict} ({ok} of {len(cs)} checks)")
    lines.append("")
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
    fig.suptitle(f"Median throughput relative to each group's reference ({data['date']})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
