"""bench/run.py: the quick mode runs end to end and writes a report, the JSON and the chart;
a missing server is skipped with a note; the report's other sections are kept; ratios are
medians of per-repetition ratios; a calibration off the quiet reference, or other
processes' CPU, marks a repetition disturbed, which is run again, and a disturbed run (or
one without a quiet reference) judges no goal. Calibration figures are injected: no timing
is asserted."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, need

sys.path.insert(0, str(ROOT / "bench"))

import calibrate  # noqa: E402
import goals  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
import stats  # noqa: E402

import run as bench_run  # noqa: E402

OTHER = "# Benchmark report\n\n## Coalesce (bench/coalesce.py)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def bench(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--out", str(out),
                           *args], capture_output=True, text=True, timeout=600, env=env,
                          check=False)


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path: Path) -> None:
    for program in ("fio", "nbdcopy", "qemu-nbd", "nbdkit", "nbdinfo"):
        need(program)
    (tmp_path / "REPORT.md").write_text(OTHER)
    res = bench(tmp_path, "--quick", "--runtime", "0.5", "--retries", "0", "--quiet-file",
                str(tmp_path / "absent.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "REPORT.md").read_text()
    assert text.startswith(OTHER.rstrip("\n"))  # the other section is kept as it was
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "| seqread | blktap |" in text and "### Goals" in text and "### Memory" in text
    assert "**No quiet reference**" in text and "### Repetitions" in text
    data = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert data["settings"]["quick"] is True
    names = {g["name"] for g in data["groups"]}
    assert names == {"raw-tmpfs", "vhd", "chain"}
    for g in data["groups"]:
        for row in g["rows"]:
            assert not row.get("error"), row
            assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
            assert row["cpu_us_per_io"] is not None and row["cpu_us_per_io"] >= 0
            assert row["ratio_spread"]["n"] == 1 and row["quiet"] is None
        assert all(r["ratio"] == 1.0 for r in g["rows"] if r["label"] == g["reference"])
    # One repetition per group, each calibrated and sampled, none run again.
    assert [(r["group"], r["attempt"], r["kept"]) for r in data["repetitions"]] == \
        [(g, 0, True) for g in ("raw-tmpfs", "vhd", "chain")]
    for r in data["repetitions"]:
        assert set(r["calibration"]) == {"cpu1", "cpu2", "fio"}
        assert all(v > 0 for v in r["calibration"].values()) and r["deviation"] == {}
        assert r["sample"]["wall_s"] > 0 and r["sample"]["ticks"] >= 1
    # Without a quiet reference nothing is judged, whatever the figures.
    assert data["not_judged"].startswith("no quiet reference")
    measured = [c for c in data["goals"] if c["value"] is not None]
    assert measured and all(c["met"] is None for c in measured)
    assert all(c["verdict"].startswith("not judged: no quiet reference") for c in measured)
    idle = next(m for m in data["memory"] if m["case"].startswith("idle tapdisk"))
    assert idle["rss_kib"] > 0
    big = next(m for m in data["memory"] if "sparse" in m["case"])
    assert big["rss_kib"] > 0 and "`nbdcopy URI null:` ok" in big["note"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "No chart" in text
    else:
        png = tmp_path / "results" / "ratios.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "results/ratios.png" in text
    # A second run replaces its own section and nothing else.
    res = bench(tmp_path, "--quick", "--only", "memory")
    assert res.returncode == 0, res.stderr[-3000:]
    again = (tmp_path / "REPORT.md").read_text()
    assert again.startswith(OTHER.rstrip("\n")) and again.count(report.BEGIN) == 1
    assert "| seqread | blktap |" not in again


def test_disturbed_run_is_repeated_and_not_judged(tmp_path: Path) -> None:
    """A quiet reference for this machine whose calibration no real run can reach: every
    repetition is disturbed, run again --retries times, and the goals are not judged;
    the peers' quiet figures stand beside this run's."""
    for program in ("fio", "nbdcopy", "nbdkit"):
        need(program)
    quiet = tmp_path / "quiet.json"
    quiet.write_text(json.dumps({
        "recorded": "2026-01-01", "machine": bench_run.machine(),
        "settings": {"size": 16 << 20, "runtime": 0.2},
        "calibration": {"cpu1": 1e9, "cpu2": 2e9, "fio": 1e12},
        "figures": {"raw-tmpfs": {"nbdkit-file": {"randread-qd32": 123456.0}}}}))
    res = bench(tmp_path / "out", "--only", "raw-tmpfs", "--servers", "blktap,nbdkit-file",
                "--workloads", "randread-qd32", "--size", "16M", "--runtime", "0.2",
                "--reps", "1", "--retries", "1", "--quiet-file", str(quiet))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results" / "latest.json").read_text())
    reps = data["repetitions"]
    assert [(r["attempt"], r["kept"]) for r in reps] == [(0, False), (1, True)]
    for r in reps:
        assert any(x.startswith("calibration cpu1 100% slower") for x in r["reasons"])
        assert r["deviation"]["fio"] < -0.99
    assert {r["attempt"] for r in data["results"]} == {0, 1}
    assert all(r["kept"] == (r["attempt"] == 1) for r in data["results"])
    assert data["not_judged"] is None  # (a quiet reference of this machine)
    assert data["disturbed"].startswith("disturbed run (1 of 1 repetitions; raw-tmpfs #1: "
                                        "calibration cpu1 100% slower")
    why = data["disturbed_groups"]["raw-tmpfs"]
    assert why.startswith("raw-tmpfs disturbed (1 of 1 repetitions; #1: calibration cpu1 "
                          "100% slower")
    (check,) = [c for c in data["goals"] if c["value"] is not None]
    assert check["what"] == "raw-tmpfs randread-qd32: blktap / nbdkit-file"
    assert check["met"] is None
    assert check["verdict"] == "not judged: " + why
    (group,) = data["groups"]
    row = next(r for r in group["rows"] if r["label"] == "nbdkit-file")
    assert row["quiet"] == 123456.0 and row["n"] == 1
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "**Checks over a disturbed group not judged: disturbed run" in text
    assert "**disturbed**: calibration" in text
    assert f"**Disturbed: {why}.** The checks over raw-tmpfs are not judged" in text
    assert "| randread-qd32 | nbdkit-file |" in text
    assert re.search(r"\| 123,456 \(\d+%\) \| IOPS \|", text)
    assert "(discarded)" in text and "the quiet column is indicative only" not in text


def test_missing_server_is_skipped_with_a_note(tmp_path: Path) -> None:
    """With qemu-nbd and qemu-storage-daemon out of PATH the run still completes: they
    are named as skipped in the report, and the ratios fall back to another server."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for program in ("fio", "nbdcopy"):
        found = need(program)
        os.symlink(found, bindir / program)
    env = {**os.environ, "PATH": str(bindir)}
    res = bench(tmp_path / "out", "--only", "raw-tmpfs", "--size", "16M", "--runtime", "0.2",
                "--reps", "1", "--retries", "0", "--workloads", "seqread,randread-qd32",
                "--servers", "blktap,qemu-nbd,qsd", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "- qemu-nbd: **skipped** (qemu-nbd is not installed)" in text
    assert "- qsd: **skipped** (qemu-storage-daemon is not installed)" in text
    data = json.loads((tmp_path / "out" / "results" / "latest.json").read_text())
    (group,) = data["groups"]
    assert group["reference"] == "blktap"
    assert {r["label"] for r in group["rows"]} == {"blktap"}
    assert all(r["median"] > 0 for r in group["rows"])


def test_replace_section_keeps_the_rest() -> None:
    first = report.replace_section(OTHER, "## Ours\n\nA\n")
    assert first.startswith(OTHER) and first.endswith(f"{report.BEGIN}\n## Ours\n\nA\n"
                                                      f"{report.END}\n")
    tail = "\n## Later section\n\nkept\n"
    second = report.replace_section(first + tail, "## Ours\n\nB\n")
    assert second == OTHER + f"\n{report.BEGIN}\n## Ours\n\nB\n{report.END}\n" + tail.lstrip()
    assert report.replace_section("", "x").startswith("# Benchmark report\n\n" + report.BEGIN)


def per_rep(table: dict[tuple[str, str, str], list[float]]) -> goals.Figures:
    return lambda g, label, w: dict(enumerate(table.get((g, label, w), [])))


def test_ratios_are_medians_of_per_repetition_ratios() -> None:
    ours = {0: 100.0, 1: 60.0, 2: 80.0}
    ref = {0: 50.0, 1: 60.0, 2: 100.0, 3: 7.0}  # repetition 3 has no pair: no ratio
    assert stats.paired_ratios(ours, ref) == [2.0, 1.0, 0.8]
    sp = stats.ratio_spread(ours, ref)
    assert sp is not None and (sp.n, sp.median, sp.min, sp.max) == (3, 1.0, 0.8, 2.0)
    # Not the ratio of the medians, which pairs different repetitions (80 / 60).
    assert sp.median != pytest.approx(80 / 60)
    # Latency from rates: the reference's rate over ours.
    assert stats.paired_ratios({0: 50.0}, {0: 100.0}, invert=True) == [2.0]
    # A failed (zero) figure gives no ratio; nothing gives no spread.
    assert stats.paired_ratios({0: 0.0, 1: 5.0}, {0: 3.0, 1: 10.0}) == [0.5]
    assert stats.spread([]) is None
    five = stats.spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert five is not None and (five.median, five.q1, five.q3) == (3.0, 2.0, 4.0)
    two = stats.spread([1.0, 3.0])
    assert two is not None and (two.median, two.q1, two.q3) == (2.0, 1.0, 3.0)


def test_goals_from_per_repetition_ratios() -> None:
    fig = per_rep({("raw-tmpfs", "blktap", "randread-qd32"): [30.0, 30.0, 30.0],
                   ("raw-tmpfs", "qemu-nbd", "randread-qd32"): [20.0, 15.0, 25.0],
                   ("raw-tmpfs", "nbdkit-file", "randread-qd32"): [30.0, 40.0, 20.0],
                   ("raw-tmpfs", "blktap", "randread-qd1"): [100.0, 100.0],
                   ("raw-tmpfs", "nbdkit-file", "randread-qd1"): [160.0, 140.0],
                   ("raw-disk", "blktap", "randwrite-qd32"): [9.0],
                   ("raw-disk", "qemu-nbd", "randwrite-qd32"): [10.0],
                   ("vhd", "blktap", "seqread"): [90.0, 100.0],
                   ("raw-tmpfs", "blktap", "seqread"): [100.0, 100.0],
                   ("chain", "depth 1", "randread-qd1"): [100.0],
                   ("chain", "depth 30", "randread-qd1"): [91.0]})
    by = {c.what: c for c in goals.evaluate(fig, 30 * 1024)}
    c = by["raw-tmpfs randread-qd32: blktap / qemu-nbd"]  # ratios 1.5, 2.0, 1.2
    assert c.value == pytest.approx(1.5) and c.met is True and c.verdict == "met"
    assert c.spread is not None and (c.spread.min, c.spread.max) == (pytest.approx(1.2), 2.0)
    c = by["raw-tmpfs randread-qd32: blktap / nbdkit-file"]  # 1.0, 0.75, 1.5
    assert c.value == pytest.approx(1.0) and c.met is True
    assert by["raw-tmpfs randwrite-qd32: blktap / qemu-nbd"].verdict == "not measured"
    c = by["raw-tmpfs randread-qd1 latency: blktap / nbdkit-file"]  # 1.6, 1.4 -> 1.5
    assert c.target == "<= 1.5x" and c.value == pytest.approx(1.5) and c.met is True
    c = by["raw-disk randwrite-qd32: blktap / qemu-nbd"]
    assert c.met is False and c.verdict == "NOT met"
    assert c.profile == "bench/where.py aio:DIR-ON-DISK/disk.raw randwrite-qd32"
    c = by["seqread: blktap vhd / blktap raw (tmpfs)"]  # 0.9, 1.0 -> 0.95 >= 0.9
    assert c.met is True and c.profile is None
    assert by["chain randread-qd1: depth 30 / depth 1"].met is True  # 100/91 < 1.1
    assert by["idle tapdisk VmRSS (MB)"].met is True
    assert goals.evaluate(lambda *a: {}, 40 * 1024 * 1024)[-1].met is False
    goal_names = {c.goal for c in by.values()}
    assert "raw tmpfs 4 KiB random QD32 >= 1.5x qemu-nbd and >= 1.0x nbdkit file" in goal_names
    assert "VHD >= 0.9x our own raw figure (tmpfs)" in goal_names


def test_a_disturbed_run_is_not_judged() -> None:
    """Figures that meet and miss their targets: with a reason not to judge, no check is
    called met or not met, and the verdict names the reason."""
    fig = per_rep({("raw-tmpfs", "blktap", "randread-qd32"): [30.0],
                   ("raw-tmpfs", "qemu-nbd", "randread-qd32"): [10.0],
                   ("raw-tmpfs", "nbdkit-file", "randread-qd32"): [60.0]})
    why = "disturbed run (1 of 1 repetitions; raw-tmpfs #1: steal time 20%)"
    checks = [c for c in goals.evaluate(fig, 30 * 1024, not_judged=why) if c.value is not None]
    assert len(checks) == 3 and all(c.met is None for c in checks)
    assert {c.verdict for c in checks} == {f"not judged: {why}"}
    # The missing one still names its profile.
    slow = next(c for c in checks if c.what.endswith("nbdkit-file"))
    assert slow.profile == "bench/where.py aio:/dev/shm/disk.raw randread-qd32"
    assert goals.goal_verdict(checks) == f"not judged: {why}"


def test_report_withholds_verdicts_and_names_profiles() -> None:
    """The goals section of a disturbed run: the reason stated once, every measured check
    "not judged", and the profile to take for each check whose figure misses."""
    fig = per_rep({("vhd", "blktap", "randread-qd1"): [10.0, 12.0],
                   ("vhd", "qemu-nbd", "randread-qd1"): [10.0, 10.0],
                   ("vhd", "blktap", "nbdcopy"): [30.0, 30.0],
                   ("vhd", "qemu-nbd", "nbdcopy"): [10.0, 12.0]})
    why = "disturbed run (1 of 2 repetitions; vhd #2: steal time 9%)"
    checks = goals.evaluate(fig, None, not_judged=why)
    data = {"not_judged": why,
            "goals": [{**dataclasses.asdict(c), "verdict": c.verdict} for c in checks]}
    text = "\n".join(report.goal_lines(data))
    assert f"**Not judged: {why}.**" in text
    assert ("| VHD >= 2x qemu-nbd -f vpc on every workload | vhd seqread: blktap / "
            "qemu-nbd vpc | >= 2x | – | – | not measured |") in text
    assert ("|  | vhd randread-qd1: blktap / qemu-nbd vpc | >= 2x | 1.10 | 1.00–1.20, n=2 | "
            "not judged |") in text
    assert "| vhd nbdcopy: blktap / qemu-nbd vpc | >= 2x | 2.75 | 2.50–3.00, n=2 | " \
        "not judged |" in text
    assert "0 checks met, 0 not met, 2 not judged" in text
    assert "- VHD >= 2x qemu-nbd -f vpc on every workload: **not judged**" in text
    assert ("- vhd randread-qd1: blktap / qemu-nbd vpc (1.10, target >= 2x): "
            "`bench/where.py vhd:/dev/shm/disk.vhd randread-qd1`") in text
    assert "where.py vhd:/dev/shm/disk.vhd nbdcopy" not in text
    # Judged, the same figures are met and not met.
    data = {"not_judged": None, "goals": [{**dataclasses.asdict(c), "verdict": c.verdict}
                                          for c in goals.evaluate(fig, None)]}
    text = "\n".join(report.goal_lines(data))
    assert "Not judged" not in text and "1 checks met, 1 not met, 0 not judged" in text
    assert "| 1.10 | 1.00–1.20, n=2 | NOT met |" in text


def test_a_check_whose_reference_ran_below_its_quiet_figure_is_not_judged() -> None:
    """A peer far below its quiet figure was disturbed, not beaten: that check alone is
    withheld, with the peer, its share of the quiet figure and the limit; a peer a little
    below, or one without a quiet figure, is judged; a run-level reason comes first."""
    fig = per_rep({("qcow2-sparse", "blktap", "nbdcopy"): [100.0, 110.0, 90.0],
                   ("qcow2-sparse", "qemu-nbd", "nbdcopy"): [80.0, 70.0, 75.0],
                   ("qcow2-sparse", "blktap", "seqread"): [100.0, 100.0],
                   ("qcow2-sparse", "qemu-nbd", "seqread"): [90.0, 86.0],
                   ("qcow2", "blktap", "seqread"): [100.0],
                   ("qcow2", "qemu-nbd", "seqread"): [50.0],
                   ("qcow2", "blktap", "nbdcopy"): [100.0],
                   ("raw-tmpfs", "blktap", "nbdcopy"): [60.0]})
    quiet = {("qcow2-sparse", "qemu-nbd", "nbdcopy"): 100.0,
             ("qcow2-sparse", "qemu-nbd", "seqread"): 100.0,
             ("raw-tmpfs", "blktap", "nbdcopy"): 100.0}
    checks = goals.evaluate(fig, None, quiet=lambda g, lbl, w: quiet.get((g, lbl, w)),
                            threshold=0.15)
    by = {c.what: c for c in checks}
    slow = by["qcow2-sparse nbdcopy: blktap / qemu-nbd qcow2"]  # qemu-nbd median 75%
    assert slow.value == pytest.approx(1.25) and slow.met is None  # 1.25, 1.57, 1.2
    assert slow.verdict == ("not judged: qemu-nbd (qcow2-sparse nbdcopy) at 75% of its "
                            "quiet figure (limit 85%)")
    assert by["qcow2-sparse seqread: blktap / qemu-nbd qcow2"].met is True  # 88%: judged
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].met is True  # no quiet figure
    # Our own raw figure is the reference of this one: 60% of quiet inflates the ratio.
    own = by["nbdcopy: blktap qcow2 / blktap raw (tmpfs)"]
    assert own.met is None and own.not_judged is not None
    assert own.not_judged.startswith("blktap (raw-tmpfs nbdcopy) at 60%")
    assert goals.goal_verdict([c for c in checks if c.goal == slow.goal]) == slow.verdict
    # A looser threshold judges the 75% peer.
    loose = goals.evaluate(fig, None, quiet=lambda g, lbl, w: quiet.get((g, lbl, w)),
                           threshold=0.3)
    assert next(c for c in loose if c.what == slow.what).met is True
    why = "disturbed run (1 of 3 repetitions; qcow2 #2: steal time 9%)"
    run_level = goals.evaluate(fig, None, not_judged=why,
                               quiet=lambda g, lbl, w: quiet.get((g, lbl, w)))
    assert next(c for c in run_level if c.what == slow.what).not_judged == why
    # The report names the check and its reason under the table.
    data = {"not_judged": None, "goals": [{**dataclasses.asdict(c), "verdict": c.verdict}
                                          for c in checks]}
    text = "\n".join(report.goal_lines(data))
    assert ("- qcow2-sparse nbdcopy: blktap / qemu-nbd qcow2 (1.25): qemu-nbd "
            "(qcow2-sparse nbdcopy) at 75% of its quiet figure (limit 85%)") in text
    assert "- qcow2 >= 1.0x qemu-nbd -f qcow2 on every workload: **not judged**" in text


def test_only_the_checks_over_a_disturbed_group_are_not_judged() -> None:
    """A group whose repetition stayed disturbed withholds the checks over it (as ours or
    as the reference); the groups that ran in quiet repetitions of their own are judged,
    and the report says which groups and why above the table."""
    log = [{"group": "raw-tmpfs", "rep": 0, "kept": True, "reasons": []},
           {"group": "chain", "rep": 0, "kept": False, "reasons": ["steal time 20%"]},
           {"group": "chain", "rep": 0, "kept": True,
            "reasons": ["calibration cpu2 18% slower than quiet (limit 15%)"]},
           {"group": "qcow2", "rep": 0, "kept": True, "reasons": []},
           {"group": "chain", "rep": 1, "kept": True, "reasons": []}]
    groups = bench_run.disturbed_groups(log)
    assert groups == {"chain": "chain disturbed (1 of 2 repetitions; #1: calibration cpu2 "
                               "18% slower than quiet)"}
    fig = per_rep({("chain", "depth 1", "seqread"): [100.0],
                   ("chain", "depth 30", "seqread"): [50.0],
                   ("qcow2", "blktap", "seqread"): [90.0],
                   ("qcow2", "qemu-nbd", "seqread"): [60.0],
                   ("raw-tmpfs", "blktap", "seqread"): [100.0]})
    checks = goals.evaluate(fig, None, disturbed=groups)
    by = {c.what: c for c in checks}
    assert by["chain seqread: depth 30 / depth 1"].verdict == "not judged: " + groups["chain"]
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].met is True
    assert by["seqread: blktap qcow2 / blktap raw (tmpfs)"].met is True
    # Over the reference's group as well: raw-tmpfs disturbed withholds qcow2 over raw.
    raw = goals.evaluate(fig, None, disturbed={"raw-tmpfs": "raw-tmpfs disturbed (x)"})
    assert next(c for c in raw if c.what == "seqread: blktap qcow2 / blktap raw (tmpfs)"
                ).not_judged == "raw-tmpfs disturbed (x)"
    # A run-wide reason comes first.
    assert goals.evaluate(fig, None, "no quiet reference", disturbed=groups)[0].not_judged \
        == "no quiet reference"
    data = {"not_judged": None, "disturbed_groups": groups,
            "goals": [{**dataclasses.asdict(c), "verdict": c.verdict} for c in checks]}
    text = "\n".join(report.goal_lines(data))
    assert f"**Disturbed: {groups['chain']}.** The checks over chain are not judged" in text
    assert "each for its own reason" not in text  # (the group's reason is said once)
    assert "- chain depth 30 costs < 10% over depth 1 (reads of data in the base): " \
        "**not judged**" in text
    assert "- qcow2 >= 1.0x qemu-nbd -f qcow2 on every workload: **met**" in text


def test_qcow2_goals_from_ratios() -> None:
    fig = per_rep({("qcow2", "blktap", "seqread"): [90.0],
                   ("qcow2", "qemu-nbd", "seqread"): [100.0],
                   ("raw-tmpfs", "blktap", "seqread"): [100.0],
                   ("qcow2-sparse", "blktap", "randread-qd1"): [30.0],
                   ("qcow2-sparse", "qemu-nbd", "randread-qd1"): [20.0]})
    by = {c.what: c for c in goals.evaluate(fig, None)}
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].value == pytest.approx(0.9)
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].met is False
    assert by["seqread: blktap qcow2 / blktap raw (tmpfs)"].met is True
    assert by["qcow2-sparse randread-qd1: blktap / qemu-nbd qcow2"].met is True
    assert by["qcow2-sparse randread-qd1: blktap / qemu-nbd qcow2"].profile is None
    # The sparse group has no writes: no check is made up for them.
    assert "qcow2-sparse seqwrite: blktap / qemu-nbd qcow2" not in by


QUIET_CAL = {"cpu1": 10.0, "cpu2": 20.0, "fio": 1000.0}


def test_calibration_figures_are_the_median_of_their_runs(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """One short run is too noisy on a virtual machine: each figure (the loops' and
    fio's) is the median of its runs, so one slow or fast run does not move it."""
    figures = {1: iter([4.2, 9.9, 5.0, 5.1, 5.2]), 2: iter([10.0, 1.0, 10.2, 10.4, 30.0])}
    fio = iter([1150.0, 1000.0, 870.0])
    monkeypatch.setattr(calibrate, "_loops", lambda n: next(figures[n]))
    monkeypatch.setattr(calibrate, "_fio", lambda path: next(fio))
    assert calibrate.measure(tmp_path) == {"cpu1": 5.1, "cpu2": 10.2, "fio": 1000.0}
    assert next(fio, None) is None  # (three fio runs, no more)


def test_calibration_off_the_quiet_reference_is_disturbed() -> None:
    dev, why = calibrate.compare({"cpu1": 8.4, "cpu2": 19.0, "fio": 1200.0}, QUIET_CAL, 0.15)
    assert dev == pytest.approx({"cpu1": -0.16, "cpu2": -0.05, "fio": 0.2})
    assert why == ["calibration cpu1 16% slower than quiet (limit 15%)",
                   "calibration fio 20% faster than quiet (limit 15%)"]
    assert calibrate.compare({"cpu1": 8.6, "cpu2": 23.0, "fio": 870.0}, QUIET_CAL, 0.15)[1] == []
    assert calibrate.compare({"cpu1": 8.4}, QUIET_CAL, 0.2)[1] == []  # the threshold is an option
    assert calibrate.compare({"cpu1": 1.0}, None, 0.15) == ({}, [])  # no reference: no check


def test_sampler_figures_mark_a_disturbed_repetition() -> None:
    limits = calibrate.Limits()
    quiet = calibrate.Sample(wall_s=10, cpus=2, other_cpu_s=1.0, steal_s=0.5,
                             other_runnable=0.2)
    assert calibrate.judge_sample(quiet, limits) == []
    busy = calibrate.Sample(wall_s=10, cpus=2, other_cpu_s=3.0, steal_s=1.2,
                            other_runnable=1.5, top_others=[("qemu-system-x86", 2.5)])
    assert calibrate.judge_sample(busy, limits) == [
        "other processes used 15% of the CPUs (limit 10%: qemu-system-x86 2.5 s)",
        "steal time 6% (limit 5%)",
        "1.5 runnable threads not ours on average (limit 0.5)"]
    assert calibrate.judge_sample(busy, calibrate.Limits(0.2, 0.1, 2.0)) == []


def test_disturbed_repetition_is_run_again_then_the_run_not_judged() -> None:
    """Injected calibrations: two disturbed attempts then a quiet one are three records,
    the last kept; with fewer retries the disturbed one is kept and the run not judged."""
    def attempts(cals: list[dict[str, float]]) -> bench_run.Attempt:
        def attempt(n: int) -> dict[str, Any]:
            dev, why = calibrate.compare(cals[n], QUIET_CAL, 0.15)
            return {"group": "raw-tmpfs", "rep": 0, "attempt": n, "calibration": cals[n],
                    "deviation": dev, "reasons": why}
        return attempt
    slow = {"cpu1": 5.0, "cpu2": 20.0, "fio": 1000.0}
    cals = [slow, {"cpu1": 10.0, "cpu2": 12.0, "fio": 1000.0}, QUIET_CAL]
    log = bench_run.repeat_until_quiet(attempts(cals), retries=2)
    assert [(r["attempt"], r["kept"], bool(r["reasons"])) for r in log] == \
        [(0, False, True), (1, False, True), (2, True, False)]
    quiet = {"recorded": "x", "machine": {}, "calibration": QUIET_CAL}
    assert bench_run.judgement(quiet, None, log) is None
    assert len(bench_run.repeat_until_quiet(attempts([QUIET_CAL]), retries=2)) == 1
    log = bench_run.repeat_until_quiet(attempts(cals), retries=1)
    assert [r["kept"] for r in log] == [False, True]
    assert bench_run.judgement(quiet, None, log) == \
        "disturbed run (1 of 1 repetitions; raw-tmpfs #1: calibration cpu2 40% slower than quiet)"
    assert bench_run.judgement(None, None, log).startswith("no quiet reference; disturbed run")
    assert bench_run.judgement(quiet, "quiet reference is of another machine (cpus 4, here 2)",
                               []) == "quiet reference is of another machine (cpus 4, here 2)"


def test_a_recording_run_compares_its_repetitions_with_its_opening_calibration() -> None:
    """With no reference yet, a recording run takes the medians of three calibrations at
    its start as the provisional one: a repetition the host slowed down is then flagged
    (and run again) rather than the whole run refused at the end; the report says what
    the deviations are measured against."""
    class Probe:
        cals = iter([{"cpu1": 8.0, "cpu2": 16.0, "fio": 900.0},
                     {"cpu1": 5.0, "cpu2": 10.0, "fio": 600.0},
                     {"cpu1": 8.2, "cpu2": 15.0, "fio": 850.0}])

        def calibrate(self) -> dict[str, float]:
            return next(self.cals)
    ref = bench_run.provisional_reference(Probe())  # type: ignore[arg-type]
    assert ref == {"cpu1": 8.0, "cpu2": 15.0, "fio": 850.0}
    _, why = calibrate.compare({"cpu1": 5.3, "cpu2": 10.2, "fio": 650.0}, ref, 0.15)
    assert why[0] == "calibration cpu1 34% slower than quiet (limit 15%)"
    rep = {"group": "raw-tmpfs", "rep": 0, "attempt": 0, "calibration": ref,
           "deviation": {}, "reasons": [], "sample": {}}
    text = "\n".join(report._repetition_lines({"repetitions": [rep],
                                                "provisional_calibration": ref}))
    assert "its deviation from this recording run's opening calibration (medians of " \
           "three: cpu1 8.00, cpu2 15.00, fio 850.00)" in text
    text = "\n".join(report._repetition_lines({"repetitions": [rep]}))
    assert "its deviation from the quiet reference," in text


def test_quiet_reference_absent_placeholder_or_of_another_machine(tmp_path: Path) -> None:
    path = tmp_path / "quiet.json"
    assert calibrate.load_quiet(path) is None
    calibrate.not_recorded_file(path)
    assert json.loads(path.read_text())["state"] == "not recorded"
    assert calibrate.load_quiet(path) is None
    path.write_text("{not json")
    assert calibrate.load_quiet(path) is None
    here = bench_run.machine()
    path.write_text(json.dumps({"recorded": "2026-01-01", "machine": here,
                                "calibration": QUIET_CAL}))
    loaded = calibrate.load_quiet(path)
    assert loaded is not None and calibrate.machine_mismatch(loaded["machine"], here) is None
    other = {**here, "cpus": (here["cpus"] or 1) + 6}
    assert calibrate.machine_mismatch(other, here) == \
        f"quiet reference is of another machine (cpus {other['cpus']!r}, here {here['cpus']!r})"
    # The repository's own file is valid JSON and, until the lead records it, not recorded.
    committed = json.loads((ROOT / "bench" / "quiet.json").read_text())
    assert committed.get("recorded") is False or calibrate.load_quiet(
        ROOT / "bench" / "quiet.json") is not None


def test_record_quiet_refuses_a_disturbed_or_unsteady_run() -> None:
    data = {"date": "2026-12-03", "machine": {"cpus": 2}, "source": "abc", "command": "c",
            "versions": {}, "settings": {"size": 1},
            "groups": [{"name": "raw-tmpfs", "rows": [
                {"label": "qemu-nbd", "workload": "seqread", "median": 900.0},
                {"label": "nbdkit-file", "workload": "seqread", "median": None}]}]}

    def rep(n: int, cal: dict[str, float], why: list[str], kept: bool = True) -> dict[str, Any]:
        return {"group": "raw-tmpfs", "rep": n, "attempt": 0, "calibration": cal,
                "reasons": why, "kept": kept}
    steady = [rep(0, QUIET_CAL, []), rep(1, {**QUIET_CAL, "cpu1": 11.0}, []),
              rep(1, {**QUIET_CAL, "cpu1": 1.0}, ["steal time 20% (limit 5%)"], kept=False)]
    record, why = bench_run.quiet_record(data, steady, 0.15)
    assert why == [] and record is not None
    assert record["calibration"] == {"cpu1": 10.5, "cpu2": 20.0, "fio": 1000.0}
    assert record["figures"] == {"raw-tmpfs": {"qemu-nbd": {"seqread": 900.0}}}
    assert record["recorded"] == "2026-12-03" and record["machine"] == {"cpus": 2}
    record, why = bench_run.quiet_record(data, [rep(0, QUIET_CAL, ["steal time 20%"])], 0.15)
    assert record is None and why == ["raw-tmpfs #1: steal time 20%"]
    record, why = bench_run.quiet_record(
        data, [rep(0, QUIET_CAL, []), rep(1, {**QUIET_CAL, "fio": 1300.0}, [])], 0.15)
    assert record is None and why == ["calibration fio varies by 30% between repetitions"]
    # A recording run's opening calibration, which each repetition was compared with
    # during the run: it is what is recorded, and a repetition within the threshold of it
    # (here -10% and +10%, 22% apart) does not refuse the run; one still off it does.
    opening = {"cpu1": 10.0, "cpu2": 20.0, "fio": 1000.0}
    within = [rep(0, {**opening, "cpu2": 18.0}, []), rep(1, {**opening, "cpu2": 22.0}, [])]
    record, why = bench_run.quiet_record(data, within, 0.15, opening)
    assert why == [] and record is not None and record["calibration"] == opening
    _, off = calibrate.compare({**opening, "cpu2": 16.0}, opening, 0.15)
    record, why = bench_run.quiet_record(data, [within[0], rep(1, {**opening, "cpu2": 16.0},
                                                               off)], 0.15, opening)
    assert record is None and why == \
        ["raw-tmpfs #2: calibration cpu2 20% slower than quiet (limit 15%)"]


def test_sampler_counts_other_processes_not_ours(tmp_path: Path) -> None:
    """A busy process that is not the benchmark's (double-forked, so not our descendant)
    shows in the sample by name; a busy child of ours does not."""
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass\n"
    for name in ("stranger", "ourchild"):
        os.symlink(sys.executable, tmp_path / name)
    sampler = calibrate.Sampler(interval=0.2, top=None)  # every other command, not the top 5
    sampler.start()
    # sh starts the stranger in the background and exits: init adopts it.
    subprocess.run(["sh", "-c", f'"{tmp_path / "stranger"}" -c "$0" >/dev/null 2>&1 &', spin],
                   check=True)
    subprocess.run([str(tmp_path / "ourchild"), "-c", spin], check=True)
    time.sleep(0.3)
    sample = sampler.stop()
    names = dict(sample.top_others)
    assert names.get("stranger", 0) > 0, sample
    assert "ourchild" not in names
    assert sample.other_cpu_s >= names["stranger"] and sample.ticks >= 3
    # The stranger was ready to run through most ticks (ourchild too, not counted).
    assert 0.5 < sample.other_runnable < 1.9, sample
    assert sample.wall_s > 1.5 and sample.cpus == os.cpu_count()


def test_sizes_and_options() -> None:
    assert bench_run.parse_size("64M") == 64 << 20
    assert bench_run.parse_size("1G") == 1 << 30
    assert bench_run.parse_size("1GiB") == 1 << 30
    args = bench_run.parse_args(["--quick"])
    assert (args.reps, args.runtime, args.size) == (1, 1.0, 64 << 20)
    assert "raw-disk" not in args.groups
    full = bench_run.parse_args([])
    assert full.groups == list(bench_run.GROUPS) and full.server_names == list(servers.SERVERS)
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "nosuchgroup"])
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--size", "3M"])
    assert (args.retries, full.retries, full.threshold) == (1, 2, 0.15)
    assert full.workload_names == [w.name for w in bench_run.workloads.WORKLOADS]
    assert bench_run.parse_args(["--workloads", "seqread,nbdcopy"]).workload_names == \
        ["seqread", "nbdcopy"]
    for bad in (["--workloads", "randread-qd7"], ["--threshold", "1.5"], ["--retries", "-1"]):
        with pytest.raises(SystemExit):
            bench_run.parse_args(bad)


def test_proc_figures_of_a_live_process() -> None:
    before = servers.proc_cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert servers.proc_cpu_seconds(os.getpid()) >= before >= 0
    mem = servers.proc_memory_kib(os.getpid())
    assert mem["VmRSS"] > 0 and mem["VmHWM"] >= mem["VmRSS"]


def test_where_summarizes_samples_by_leaf_and_kind(tmp_path: Path) -> None:
    """bench/where.py's summary: shares per leaf function (file:line) and per kind, where a
    leaf that makes a system call counts as that call."""
    import where

    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (x.py:1);Channel._send_some (blktap/transport/sockio.py:338) 6\n"
        "main (x.py:1);Connection._pump (blktap/transport/nbd/connection.py:224) 3\n"
        "main (x.py:1);ThreadEngine.try_preadv (blktap/io/threads.py:176) 1\n")
    text = where.summarize(raw)
    lines = text.splitlines()
    assert lines[2] == "| 60.0% | `Channel._send_some (sockio.py:338)` | sendmsg |"
    assert lines[3] == "| 30.0% | `Connection._pump (connection.py:224)` | python |"
    assert lines[4] == "| 10.0% | `ThreadEngine.try_preadv (threads.py:176)` | preadv |"
    assert lines[-1] == "By kind: sendmsg 60%, python 30%, preadv 10% (10 samples)."
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert where.summarize(empty).startswith("no samples")


def test_where_refuses_an_unknown_workload() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "where.py"), "aio:/nonexistent",
                          "randread-qd7"], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_guest_bench_parses_and_reports() -> None:
    """bench/guest.py: blkbench's RESULT lines become medians per server and ratios; its
    report section sits between its own markers, beside bench/run.py's."""
    import guest

    def output(scale: float) -> str:
        return "\n".join(
            f"  12.000 RESULT mode={m} bs={bs} qd={qd} iops={iops * scale:.0f} "
            f"MiBps={iops * scale * bs / (1 << 20):.1f} lat_us=100.0 ios=1 secs=1.00"
            for m, bs, qd, iops in (("read", 1 << 20, 1, 100), ("randwrite", 4096, 16, 1000)))
    runs = [{"server": s, "round": i, "ok": True, "results": guest.parse(output(x))}
            for i, (s, x) in enumerate((("qsd", 1.0), ("ours", 2.0), ("ours", 4.0),
                                        ("qsd", 1.0)))]
    assert set(runs[0]["results"]) == {"read 1M qd1", "randwrite 4k qd16"}
    rows = {r["workload"]: r for r in guest.summarize(runs)}
    assert rows["read 1M qd1"]["qsd"]["iops"] == 100 and rows["read 1M qd1"]["ours"]["iops"] == 300
    assert rows["randwrite 4k qd16"]["ratio"] == 3.0 and rows["randwrite 4k qd16"]["ours"]["n"] == 2
    data = {"date": "now", "settings": {"quick": True, "secs": 1, "qd": 16,
                                        "order": ["qsd", "ours"], "image_mib": 256,
                                        "accel": "tcg"},
            "loadavg_start": [1.0], "loadavg_end": [1.0], "runs": runs,
            "rows": list(rows.values())}
    text = guest.replace_section(report.replace_section(OTHER, "run.py's"), guest.markdown(data))
    assert "run.py's" in text and "| read 1M qd1 | 100 | 300 |" in text and "3.00x" in text
    again = guest.replace_section(text, guest.markdown(data))
    assert again == text and again.count(guest.BEGIN) == 1


def test_xen_bench_ratios_goals_and_report() -> None:
    """bench/xen.py: the domU console's RESULT lines become per-repetition ratios (ours over
    kernel blkback within the same repetition, not a ratio of medians), their median and
    min–max, goal verdicts against issue 12's targets; a failed boot drops its repetition;
    the section sits between its own markers beside the others."""
    import xen

    def console(read: float, randwrite: float) -> str:
        return ("DOMU: running /guest-script\nXBENCH queue max_segments=256 write_cache=write "
                "back hw_queues=1\n" + "\n".join(
                    f"RESULT mode={m} bs={bs} qd={qd} iops={v:.0f} MiBps={v * bs / (1 << 20):.1f} "
                    f"lat_us=50.0 ios=1 secs=5.00"
                    for m, bs, qd, v in (("read", 1 << 20, 1, read),
                                         ("randwrite", 4096, 8, randwrite))))

    def run(kind: str, rep: int, read: float, randwrite: float, ok: bool = True) -> dict:
        results, queue = xen.parse_console(console(read, randwrite))
        return {"backend": kind, "rep": rep, "ok": ok, "why": "" if ok else "rc=1",
                "secs": 60.0, "results": results, "queue": queue, "xenstore": {}, "dir": "d"}
    runs = [run(xen.KERNEL, 0, 100, 1000), run(xen.OURS, 0, 150, 500),
            run(xen.KERNEL, 1, 50, 1000), run(xen.OURS, 1, 50, 900),
            run(xen.KERNEL, 2, 100, 1000), run(xen.OURS, 2, 200, 2000, ok=False)]
    assert runs[0]["queue"].startswith("max_segments=256")
    assert xen.ratios(runs) == {"read 1M qd1": [1.5, 1.0], "randwrite 4k qd8": [0.5, 0.9]}
    rows = {r["workload"]: r for r in xen.summarize(runs)}
    read = rows["read 1M qd1"]
    assert read["ratio"] == 1.25 and (read["min"], read["max"]) == (1.0, 1.5)
    # the medians of the good boots (kernel 100, 50, 100; ours 150, 50), not of the ratios
    assert read[xen.KERNEL]["iops"] == 100 and read[xen.OURS]["iops"] == 100
    assert rows["randwrite 4k qd8"]["ratio"] == pytest.approx(0.7)
    verdicts = {(g["workload"], g["met"]) for g in xen.goals(list(rows.values()))}
    assert ("read 1M qd1", True) in verdicts and ("randwrite 4k qd8", False) in verdicts
    assert ("write 1M qd1", None) in verdicts  # not measured
    data = {"date": "now", "source": "abc", "seconds": 600.0,
            "settings": {"reps": 3, "secs": 5, "image_mib": 128, "qemu_cpu": "qemu64,+svm",
                         "order": [r["backend"] for r in runs]},
            "loadavg": {"start": 9.0, "boots": [9.0] * 6}, "runs": runs,
            "rows": list(rows.values()), "goals": xen.goals(list(rows.values()))}
    section = xen.markdown(data)
    assert "| read 1M qd1 | 100 | 100 |" in section and "| 1.25x | 1.00x–1.50x |" in section
    assert "not a verdict" in section and "**failed** (rc=1)" in section
    text = report.replace_section(report.replace_section(OTHER, "run.py's"), section,
                                  xen.BEGIN, xen.END)
    again = report.replace_section(text, section, xen.BEGIN, xen.END)
    assert "run.py's" in text and again == text and again.count(xen.BEGIN) == 1
    # --cache buffered: ours without O_DIRECT, in a section of its own beside the default's
    data["settings"]["cache"] = "buffered"
    buffered = xen.markdown(data)
    assert "--cache buffered" in buffered and "tap-ctl create -D" in buffered
    both = report.replace_section(text, buffered, *xen.markers("buffered"))
    assert section in both and buffered in both and both.count(xen.BEGIN) == 1
    assert "tap-ctl create -D -a aio:$DISK_IMAGE" in xen.backend_cmd("buffered")
    assert " -D " not in xen.backend_cmd()
    # --grants copy: tapback --no-persistent-grants, a section of its own named by its
    # variant; persistent grants (tapback's default) are the default run's
    assert "tapback --no-persistent-grants -d" in xen.backend_cmd("direct", "copy")
    assert "persistent-grants" not in xen.backend_cmd()
    assert xen.variant("direct", "persistent") == ""
    assert xen.variant("direct", "copy") == "copy"
    assert xen.variant("buffered", "copy") == "buffered copy"
    assert "with persistent grants (tapback's default" in xen.markdown(
        dict(data, settings=dict(data["settings"], cache="direct", grants="persistent")))
    data["settings"].update(cache="direct", grants="copy")
    copy = xen.markdown(data)
    assert "(bench/xen.py --grants copy)" in copy and "--no-persistent-grants" in copy
    assert xen.markers("copy") not in (xen.markers(""), xen.markers("buffered"))
    # a run recorded before the option (no "grants" key) copied, unless it said otherwise
    assert xen.grants({}) == "copy" and xen.grants({"persistent_grants": True}) == "persistent"


def test_xen_bench_reads_tapdisks_cpu_from_its_log(tmp_path: Path) -> None:
    """The ring's summary at disconnect (blkif.py) gives the CPU tapdisk spent serving it:
    the bench reports it per boot of ours."""
    import xen

    out = tmp_path / "out"
    out.mkdir()
    (out / "tapdisk.258.log").write_text(
        "x INFO minor 0 (domain 1 device 51712): connected (x86_64-abi, ...)\n"
        "x INFO minor 0 (domain 1 device 51712): disconnected (245 requests: 198 reads, 42 "
        "writes, 4 flushes, 0 barriers, 1 discards, 39 indirect, 0 errors, 0 unsupported; "
        "largest 32 segments; 214 events in, 212 out; process CPU 3.20 s user, 1.70 s "
        "system in 9.80 s)\n")
    assert xen.tapdisk_cpu(tmp_path) == {"requests": 245, "user": 3.2, "system": 1.7,
                                         "wall": 9.8}
    assert xen.tapdisk_cpu(tmp_path / "nothing") is None
    run = {"backend": xen.OURS, "rep": 0, "ok": True, "why": "", "secs": 60.0, "results": {},
           "queue": "", "xenstore": {}, "dir": "d", "tapdisk": xen.tapdisk_cpu(tmp_path)}
    data = {"date": "now", "source": "abc", "seconds": 60.0,
            "settings": {"reps": 1, "secs": 5, "image_mib": 128, "qemu_cpu": "qemu64",
                         "order": [xen.OURS]},
            "loadavg": {"start": 1.0, "boots": [1.0]}, "runs": [run], "rows": [], "goals": []}
    assert ("tapdisk: 245 requests, CPU 3.2 s user + 1.7 s system in 10 s (50% of a CPU), "
            "20.00 ms per request") in xen.markdown(data)


def test_xen_bench_guest_script_carries_blkbench(tmp_path: Path) -> None:
    """The image carries blkbench gzipped near its end; the guest script takes it off the
    disk (busybox dd, head, gunzip), checks its md5 and runs every workload on the disk."""
    import xen

    busybox = need("busybox")
    fake = b"#!/bin/sh\necho \"RESULT mode=$2 bs=$3 qd=$4 iops=1 MiBps=1 lat_us=1\"\n" * 50
    disk = tmp_path / "disk.img"
    offset, packed_len = xen.write_image(disk, 2, fake)
    assert offset % 4096 == 0 and offset + packed_len <= 2 << 20
    script = tmp_path / "guest.sh"
    script.write_text(xen.guest_script(fake, 1, offset, packed_len)
                      .replace("/tmp/blkbench", str(tmp_path / "bb")))
    r = subprocess.run([busybox, "sh", str(script), str(disk)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "bb").read_bytes() == fake
    assert list(xen.parse_console(r.stdout)[0]) == [
        f"{m} {'1M' if bs > 4096 else '4k'} qd{t}" for m, bs, t in xen.WORKLOADS]
    with open(disk, "r+b") as f:  # a disk whose copy is damaged: refused, nothing run
        f.seek(offset + 20)
        f.write(b"\0" * 8)
    r = subprocess.run([busybox, "sh", str(script), str(disk)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode != 0 and "RESULT" not in r.stdout
    with pytest.raises(ValueError, match="too small"):
        xen.carry(os.urandom(1 << 20), 1 << 20)


class QuietSampler:
    """A calibrate.Sampler that sees nothing else running (a repetition never
    disturbed by other processes)."""

    def start(self) -> None:
        pass

    def stop(self) -> calibrate.Sample:
        return calibrate.Sample(wall_s=1.0, cpus=2, ticks=1)


def test_a_peer_below_its_quiet_figure_end_to_end(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """bench/run.py with real servers and fio against a quiet reference of this machine
    whose nbdkit figure no 16 MiB job reaches: every repetition quiet (injected
    calibrations, a sampler that sees nothing), so the run is judged, but the check over
    nbdkit alone is withheld, with its reason, in the results and the report."""
    for program in ("fio", "nbdcopy", "nbdkit"):
        need(program)

    monkeypatch.setattr(calibrate, "Sampler", QuietSampler)
    monkeypatch.setattr(calibrate, "measure", lambda workdir: dict(QUIET_CAL))
    quiet = tmp_path / "quiet.json"
    quiet.write_text(json.dumps({
        "recorded": "2026-01-01", "machine": bench_run.machine(),
        "settings": {"size": 16 << 20, "runtime": 0.2}, "calibration": QUIET_CAL,
        "figures": {"raw-tmpfs": {"nbdkit-file": {"randread-qd32": 1e12}}}}))
    out = tmp_path / "out"
    bench_run.main(["--only", "raw-tmpfs", "--servers", "blktap,nbdkit-file",
                    "--workloads", "randread-qd32", "--size", "16M", "--runtime", "0.2",
                    "--reps", "1", "--retries", "0", "--quiet-file", str(quiet),
                    "--out", str(out)])
    data = json.loads((out / "results" / "latest.json").read_text())
    assert data["not_judged"] is None and data["disturbed_groups"] == {}
    (check,) = [c for c in data["goals"] if c["value"] is not None]
    why = ("nbdkit-file (raw-tmpfs randread-qd32) at 0% of its quiet figure "
           "(limit 85%)")
    assert check["met"] is None and check["verdict"] == "not judged: " + why
    text = (out / "REPORT.md").read_text()
    assert f"- raw-tmpfs randread-qd32: blktap / nbdkit-file ({check['value']:.2f}): " \
        f"{why}" in text


def test_record_quiet_end_to_end_records_or_refuses(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """bench/run.py --record-quiet, real servers and fio, injected calibrations (the
    machine's own would make the outcome depend on its load): three at the start make
    the opening calibration, which is recorded when the repetition agrees with it; a
    repetition still off it (no retry left) refuses the run, the file not written."""
    for program in ("fio", "nbdcopy", "nbdkit"):
        need(program)

    monkeypatch.setattr(calibrate, "Sampler", QuietSampler)
    argv = ["--only", "raw-tmpfs", "--servers", "blktap,nbdkit-file", "--workloads",
            "randread-qd32", "--size", "16M", "--runtime", "0.2", "--reps", "1",
            "--retries", "0", "--record-quiet"]
    for rep_cal, recorded in (({"cpu1": 8.4, "cpu2": 16.0, "fio": 900.0}, True),
                              ({"cpu1": 8.0, "cpu2": 10.0, "fio": 900.0}, False)):
        cals = iter([{"cpu1": 8.0, "cpu2": 16.0, "fio": 1000.0},
                     {"cpu1": 7.0, "cpu2": 15.0, "fio": 900.0},
                     {"cpu1": 9.0, "cpu2": 17.0, "fio": 800.0}, rep_cal])
        monkeypatch.setattr(calibrate, "measure", lambda workdir, cals=cals: next(cals))
        out, quiet = tmp_path / f"out-{recorded}", tmp_path / f"quiet-{recorded}.json"
        status = bench_run.main([*argv, "--out", str(out), "--quiet-file", str(quiet)])
        data = json.loads((out / "results" / "latest.json").read_text())
        assert data["provisional_calibration"] == {"cpu1": 8.0, "cpu2": 16.0, "fio": 900.0}
        text = (out / "REPORT.md").read_text()
        assert "its deviation from this recording run's opening calibration (medians of " \
               "three: cpu1 8.00, cpu2 16.00, fio 900.00)" in text
        if recorded:
            assert status == 0
            record = json.loads(quiet.read_text())
            assert record["calibration"] == data["provisional_calibration"]
            assert record["figures"]["raw-tmpfs"]["nbdkit-file"]["randread-qd32"] > 0
            assert data["not_judged"] is None and "by this run" in text
        else:
            assert status == 1 and not quiet.exists()
            (rep,) = data["repetitions"]
            assert rep["reasons"] == ["calibration cpu2 38% slower than quiet (limit 15%)"]
            assert data["not_judged"] == "no quiet reference"
            assert data["disturbed"].startswith("disturbed run")


# ------------------------------------------------------------------------------ bench/ab.py
def ab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_ab_runs_two_builds_in_turn_and_reports_ratios(tmp_path: Path) -> None:
    """Two variants of this tree (one with polling off) on a raw image, two repetitions:
    each server started per repetition in rotated order, and a table of medians, CPU per
    request by thread and per-repetition ratios to the first."""
    need("fio")
    image = tmp_path / "d.img"
    image.write_bytes(bytes(16 << 20))
    res = ab(f"aio:{image}", "--variant", f"new={ROOT}",
             "--variant", f"off={ROOT}+BLKTAP_POLL_MAX_US=0", "--workloads",
             "randread-qd1,randwrite-qd1", "--reps", "2", "--runtime", "0.5", "--size", "16M")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    order = [line.split()[2] for line in lines if line.startswith("rep ")]
    assert order == ["new", "new", "off", "off", "off", "off", "new", "new"]
    rows = [line for line in lines if line.startswith("| rand")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        workload, variant, median, cpu, threads, ratio = cells
        assert median.endswith(" IOPS") and float(median.split()[0].replace(",", "")) > 0
        assert float(cpu) > 0 and "blktap" in threads
        if variant == "new":
            assert ratio == ""
        else:
            assert ratio.endswith(")") and float(ratio.split("x")[0]) > 0


@pytest.mark.parametrize("args, message", [
    (["aio:/x", "--variant", "a=."], "two variants"),
    (["aio:/x", "--variant", "a", "--qemu"], "NAME=TREE"),
    (["aio:/x", "--variant", "a=/nonexistent", "--qemu"], "no src/blktap"),
    (["aio:/x", "--variant", "a=.+NOVALUE", "--qemu"], "VAR=VALUE"),
    (["aio:/x", "--variant", "a=.", "--variant", "a=.", ], "must differ"),
    (["--variant", "a=.", "--qemu"], "either SPEC or --ceph"),
    (["aio:/x", "--ceph", "--variant", "a=.", "--qemu"], "either SPEC or --ceph"),
    (["aio:/x", "--variant", "a=.", "--qemu", "--workloads", "nope"], "unknown workload"),
    (["aio:/x", "--variant", "a=.", "--qemu", "--size", "12K"], "like 256M"),
    (["nbd:/x", "--variant", "a=.", "--qemu"], "does not serve nbd"),
])
def test_ab_refuses_what_it_cannot_run(args: list[str], message: str) -> None:
    res = ab(*[a.replace("=.", f"={ROOT}") if a.endswith("=.") or "=.+" in a else a
               for a in args])
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr


def need_ceph_and_qemu() -> None:
    """Skip (fail under CI, which installs them) without a cluster's programs, qemu-nbd's
    rbd driver or fio."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ceph_cluster import missing_programs

    missing = missing_programs()
    if missing or shutil.which("qemu-nbd") is None:
        reason = f"ceph or qemu-nbd missing ({', '.join(missing) or 'qemu-nbd'})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    need("fio")


def test_ab_on_a_throwaway_ceph_against_qemu_nbd() -> None:
    """--ceph: its own cluster, an image written through, ours (librbd's cache off)
    against qemu-nbd's rbd driver (--cache=none), then the cluster stopped."""
    need_ceph_and_qemu()
    res = ab("--ceph", "--variant", f"ours={ROOT}", "--qemu", "--workloads", "randread-qd1",
             "--reps", "1", "--runtime", "0.5", "--size", "16M")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line for line in res.stdout.splitlines()
            if line.startswith("| randread-qd1")}
    assert set(rows) == {"ours", "qemu-nbd"}
    assert "qemu-nbd" in rows["qemu-nbd"].split("|")[5]  # its main thread's CPU
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert not [p for p in procs if "bench-ab-" in p and "ceph-" in p]  # cluster stopped


# ----------------------------------------------------------------------------- bench/rbd.py
def _rbd_rep(ratio: float, reasons: list[str] | None = None) -> Any:
    import rbd as bench_rbd  # noqa: PLC0415

    theirs = bench_rbd.Job(1000.0, 200.0, 60.0)
    ours = bench_rbd.Job(1000.0 * ratio, 190.0, 70.0)
    return bench_rbd.Rep({"randwrite-qd1": {"blktap": ours, "qemu-nbd": theirs}},
                         reasons or [], 1, {"cpu1": 7.8, "cpu2": 14.6, "fio": 800000.0})


def _rbd_row(reps: list[Any]) -> list[str]:
    import rbd as bench_rbd  # noqa: PLC0415

    args = bench_rbd.parse_args(["--workloads", "randwrite-qd1", "--reps", str(len(reps))])
    text = bench_rbd.summary(args, reps, "sampled.", 60.0, "compared.")
    (row,) = [line for line in text.splitlines() if line.startswith("| 4 KiB random write")]
    return [c.strip() for c in row.strip("|").split("|")]


def test_rbd_bench_judges_the_median_of_per_repetition_ratios() -> None:
    """The ratio is the median of the ratios within repetitions (not of medians taken
    apart), with their min-max; the goal is met at >= 1.0x over undisturbed ones only."""
    cells = _rbd_row([_rbd_rep(r) for r in (0.9, 1.05, 1.1, 0.95, 1.02)])
    assert cells[4] == "1.02x (0.90-1.10)" and cells[-1] == "met"
    assert cells[5:9] == ["190", "200", "70", "60"]
    cells = _rbd_row([_rbd_rep(r) for r in (0.9, 0.98, 1.1)])
    assert cells[4] == "0.98x (0.90-1.10)" and cells[-1] == "**not met**"
    # A disturbed repetition is left out of the judgement ...
    cells = _rbd_row([_rbd_rep(1.2, ["calibration cpu1 30% slower"])]
                     + [_rbd_rep(r) for r in (0.97, 0.99, 0.98)])
    assert cells[4] == "0.98x (0.97-0.99)" and cells[-1] == "**not met**"
    # ... and too few undisturbed ones judge nothing (the figures are still shown).
    cells = _rbd_row([_rbd_rep(1.2, ["steal"]), _rbd_rep(1.1, ["steal"]), _rbd_rep(1.0)])
    assert cells[4] == "1.10x (1.00-1.20)"
    assert cells[-1] == "not judged (1 undisturbed repetitions)"


def test_rbd_bench_says_whether_each_job_found_the_image_written_through() -> None:
    """The section says how the jobs found the image: written through before each (the
    default, against the order effect) or left as the job before left it (--no-reset)."""
    import rbd as bench_rbd  # noqa: PLC0415

    reps = [_rbd_rep(1.0) for _ in range(3)]
    for argv, said in (([], "written through again (4 MiB writes) before each job"),
                       (["--no-reset"], "not written through again between jobs")):
        args = bench_rbd.parse_args(["--workloads", "randwrite-qd1", *argv])
        assert args.reset == (not argv) and args.size == 256 << 20
        assert said in bench_rbd.summary(args, reps, "sampled.", 60.0, "compared.")


@pytest.mark.parametrize("args, message", [
    (["--workloads", "nbdcopy"], "unknown workload"),
    (["--reps", "0"], "must be positive"),
    (["--retries", "-1"], "not negative"),
    (["--threshold", "1.5"], "between 0 and 1"),
    (["--size", "12k"], "whole MiB or GiB"),
])
def test_rbd_bench_refuses_bad_arguments(args: list[str], message: str) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "rbd.py"), *args],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_rbd_bench_on_a_throwaway_ceph_writes_its_section(tmp_path: Path) -> None:
    """One repetition end to end: the section between its markers in OUT/REPORT.md (the
    report's other sections kept), a row for the workload, the cluster stopped."""
    need_ceph_and_qemu()
    (tmp_path / "REPORT.md").write_text(OTHER)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "rbd.py"), "--reps", "1",
                          "--retries", "0", "--runtime", "0.5", "--size", "16M",
                          "--workloads", "randread-qd1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "REPORT.md").read_text()
    assert text.startswith(OTHER)
    assert "<!-- bench/rbd.py none: begin" in text and "<!-- bench/rbd.py none: end" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 4 KiB random read")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2].replace(",", "")) > 0 and float(cells[3].replace(",", "")) > 0
    assert cells[-1].startswith("not judged")  # one repetition cannot be
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert not [p for p in procs if "bench-rbd-" in p and "ceph-" in p]
