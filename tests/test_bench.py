"""bench/run.py: the quick mode runs end to end and writes a report, the JSON and the chart;
a missing server is skipped with a note; the report's other sections are kept; goals and
ratios come out of the medians as stated. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need

sys.path.insert(0, str(ROOT / "bench"))

import goals  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402
import servers  # noqa: E402

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
    res = bench(tmp_path, "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "REPORT.md").read_text()
    assert text.startswith(OTHER.rstrip("\n"))  # the other section is kept as it was
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "| seqread | blktap |" in text and "### Goals" in text and "### Memory" in text
    data = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert data["settings"]["quick"] is True
    names = {g["name"] for g in data["groups"]}
    assert names == {"raw-tmpfs", "vhd", "chain"}
    for g in data["groups"]:
        for row in g["rows"]:
            assert not row.get("error"), row
            assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
            assert row["cpu_us_per_io"] is not None and row["cpu_us_per_io"] >= 0
        assert all(r["ratio"] == 1.0 for r in g["rows"] if r["label"] == g["reference"])
    idle = next(m for m in data["memory"] if m["case"].startswith("idle tapdisk"))
    assert idle["rss_kib"] > 0
    big = next(m for m in data["memory"] if "sparse" in m["case"])
    assert big["rss_kib"] > 0 and "`nbdcopy URI null:` ok" in big["note"]
    assert any(c["met"] is not None for c in data["goals"])
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
                "--reps", "1", "--servers", "blktap,qemu-nbd,qsd", env=env)
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


def test_goals_from_medians() -> None:
    med = {("raw-tmpfs", "blktap", "seqread"): 100.0,
           ("raw-tmpfs", "nbdkit-file", "seqread"): 125.0,
           ("raw-tmpfs", "blktap", "randread-qd32"): 30.0,
           ("raw-tmpfs", "qemu-nbd", "randread-qd32"): 20.0,
           ("chain", "depth 1", "randread-qd1"): 100.0,
           ("chain", "depth 30", "randread-qd1"): 91.0}
    checks = goals.evaluate(lambda g, label, w: med.get((g, label, w)), 30 * 1024)
    by = {c.what: c for c in checks}
    c = by["raw-tmpfs seqread: blktap / nbdkit-file"]
    assert c.value == pytest.approx(0.8) and c.met is False and c.verdict == "NOT met"
    assert by["raw-tmpfs randread-qd32: blktap / qemu-nbd"].met is True
    assert by["raw-tmpfs randread-qd32: blktap / nbdkit-python"].met is None
    assert by["chain randread-qd1: depth 30 / depth 1"].met is True  # 100/91 < 1.1
    assert by["idle tapdisk VmRSS (MB)"].met is True
    assert goals.evaluate(lambda *a: None, 40 * 1024 * 1024)[-1].met is False


def test_qcow2_goals_from_medians() -> None:
    med = {("qcow2", "blktap", "seqread"): 90.0, ("qcow2", "qemu-nbd", "seqread"): 100.0,
           ("raw-tmpfs", "blktap", "seqread"): 100.0,
           ("qcow2-sparse", "blktap", "randread-qd1"): 30.0,
           ("qcow2-sparse", "qemu-nbd", "randread-qd1"): 20.0}
    by = {c.what: c for c in goals.evaluate(lambda g, label, w: med.get((g, label, w)), None)}
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].value == pytest.approx(0.9)
    assert by["qcow2 seqread: blktap / qemu-nbd qcow2"].met is False
    assert by["seqread: blktap qcow2 / blktap raw (tmpfs)"].met is True
    assert by["qcow2-sparse randread-qd1: blktap / qemu-nbd qcow2"].met is True
    # The sparse group has no writes: no check is made up for them.
    assert "qcow2-sparse seqwrite: blktap / qemu-nbd qcow2" not in by


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
