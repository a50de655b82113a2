"""The torture harness (torture/, ``make torture``): its model judges correctly, it notices
damage, and a short run of each part passes (the long runs' figures are in
docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need

sys.path.insert(0, str(ROOT / "torture"))

import model as m  # noqa: E402

REGION = 64 * 512


def _events(*lines: str) -> list[str]:
    return list(lines)


def _disk(model: m.Model, seqs_by_sector: dict[int, int]) -> bytes:
    out = bytearray(REGION)
    for sector, seq in seqs_by_sector.items():
        out[sector * 512:(sector + 1) * 512] = m.sector_bytes(model.seed, seq, sector)
    return bytes(out)


def test_pattern_names_itself() -> None:
    raw = m.sector_bytes(7, 42, 1000)
    assert len(raw) == 512 and m.identify(raw, 7) == (42, 1000)
    assert m.identify(raw, 8) is None  # another trial's
    torn = raw[:256] + m.sector_bytes(7, 43, 1000)[256:]
    assert m.identify(torn, 7) is None


def test_flush_makes_durable_what_was_acknowledged_before_it() -> None:
    model = m.Model(1)
    model.feed(_events("S 1 0 1024 0", "A 1", "FS 1", "S 2 0 512 0", "A 2", "FA 1",
                       "S 3 4096 512 1", "A 3", "S 4 8192 512 0", "A 4"))
    assert model.durable == {0: 1, 1: 1, 8: 3}
    assert model.made_durable == {1, 3}
    assert model.allowed(0) == [1, 2]  # write 2 was acked after the flush was sent
    assert model.allowed(16) == [m.INITIAL, 4]  # acked, never flushed: may be lost
    assert model.allowed(20) == [m.INITIAL]


def test_verify_accepts_every_allowed_outcome() -> None:
    model = m.Model(3)
    model.feed(_events("S 1 0 1024 0", "A 1", "FS 1", "FA 1", "S 2 512 512 0"))
    for sector1 in (1, 2):  # write 2 in flight: either version
        data = _disk(model, {0: 1, 1: sector1})
        assert m.verify(model, 0, data, bytes(REGION)).ok


def test_verify_reports_lost_torn_and_misplaced() -> None:
    model = m.Model(3)
    model.feed(_events("S 1 0 2048 0", "A 1", "FS 1", "FA 1", "S 2 0 512 0", "A 2"))
    good = bytearray(_disk(model, {0: 2, 1: 1, 2: 1, 3: 1}))
    assert m.verify(model, 0, bytes(good), bytes(REGION)).ok
    lost = bytearray(good)
    lost[512:1024] = bytes(512)  # durable write 1 of sector 1 gone
    v = m.verify(model, 0, bytes(lost), bytes(REGION))
    assert len(v.lost) == 1 and "sector 1" in v.lost[0]
    torn = bytearray(good)
    torn[1024 + 300] ^= 0xFF
    assert len(m.verify(model, 0, bytes(torn), bytes(REGION)).torn) == 1
    misplaced = bytearray(good)
    misplaced[1536:2048] = m.sector_bytes(3, 1, 2)
    assert len(m.verify(model, 0, bytes(misplaced), bytes(REGION)).misplaced) == 1
    older = bytearray(good)
    older[0:512] = m.sector_bytes(3, 1, 0)  # fine: write 2 was never flushed
    assert m.verify(model, 0, bytes(older), bytes(REGION)).ok


def test_failed_flush_makes_nothing_durable() -> None:
    model = m.Model(1)
    model.feed(_events("S 1 0 512 0", "A 1", "FS 1", "FE 1 5"))
    assert model.durable == {} and model.allowed(0) == [m.INITIAL, 1]
    model.feed(_events("FS 2", "FA 2"))
    assert model.durable == {0: 1}


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "layout", "transport"), [
    ("lose", "dynamic", "serve"), ("tear", "dynamic", "serve"),
    ("lose", "qcow2-backed", "serve"), ("tear", "raw", "vhost-serve"),
    ("lose", "raw", "blkif")])
def test_a_trial_notices_damage(tmp_path: Path, damage: str, layout: str,
                                transport: str) -> None:
    if transport in ("serve", "tapdisk"):
        need("nbdsh")
    if layout.startswith("qcow2"):
        need("qemu-img")
    import crash

    trial = crash.run_trial(tmp_path / "t", 11, layout=layout, transport=transport,
                            connections=1, max_kill_after=1.0, damage=damage)
    assert trial.durable_writes > 0
    assert not trial.ok and (trial.lost or trial.torn), trial


def test_kinds_are_taken_in_turn() -> None:
    import crash

    plan = crash.combos(("qcow2", "vhost-user", "blkif"))
    assert [k for k, *_ in plan[:3]] == ["qcow2", "vhost-user", "blkif"]
    assert {lay for k, lay, _, _ in plan if k == "qcow2"} == set(crash.QCOW2_LAYOUTS)
    assert {tr for k, _, tr, _ in plan if k == "vhost-user"} == {"vhost-serve",
                                                                 "vhost-tapdisk"}
    # one ring per blkif child, one vhost-user socket per tapdisk
    assert all(c == 1 for _, _, tr, c in plan if tr in ("blkif", "vhost-tapdisk"))
    assert any(c == 2 for _, _, tr, c in plan if tr == "vhost-serve")


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "torture" / "run.py"), "crash",
                          "--kinds", "qcow2,floppy", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown floppy" in res.stderr


def _run(tmp_path: Path, *args: str) -> dict:
    res = subprocess.run([sys.executable, str(ROOT / "torture" / "run.py"), *args,
                          "--smoke", "--seed", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    return summary


@pytest.mark.slow
def test_smoke_crash(tmp_path: Path) -> None:
    need("nbdsh")
    need("qemu-img")
    s = _run(tmp_path, "crash")["parts"]["crash"]
    assert s["trials"] == 10 and s["durable_writes"] > 100
    assert (s["lost_sectors"], s["torn_sectors"], s["images_failing_check"]) == (0, 0, 0)
    # every kind took its turn (two trials each) and made writes durable
    assert set(s["kinds"]) == {"vhd", "raw", "qcow2", "vhost-user", "blkif"}
    for kind, k in s["kinds"].items():
        assert k["trials"] == 2 and k["failed"] == 0 and k["durable_writes"] > 0, kind


@pytest.mark.slow
def test_smoke_maintenance_kills(tmp_path: Path) -> None:
    s = _run(tmp_path, "maint")["parts"]["maint"]
    assert s["trials"] == 10 and s["failed"] == 0 and s["killed_midway"] > 0


@pytest.mark.slow
def test_smoke_fuzz(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    s = _run(tmp_path, "fuzz", "--fuzz-runs", "5000")["parts"]["fuzz"]
    for name, target in s["targets"].items():
        assert target["executions"] == 5000 and not target["crashed"], name


def test_fuzz_runs_leave_no_folders_behind(tmp_path: Path) -> None:
    """libFuzzer ends a run from C, where Python's exit handlers do not run: the folder of
    a finished run (its image files, its corpus) is swept by the next run, as the
    library's staging folders are, so runs one after the other never pile up folders."""
    pytest.importorskip("atheris")

    def fuzz_run() -> int:
        proc = subprocess.Popen([sys.executable, str(ROOT / "torture" / "fuzz.py"), "vhd",
                                 "-runs=20"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return proc.pid

    def fuzz_folders() -> set[str]:
        return {p.name for p in Path("/dev/shm").iterdir() if "fuzz" in p.name}

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    before = fuzz_folders()
    fuzz_run()
    second = fuzz_run()
    # Only the last run's folder is left (the first run's was swept by the second).
    assert {n for n in fuzz_folders() - before if not n.startswith(f".blktap-{second}-")} == set()
    from blktap.image.fileio import remove_stale_stages

    dirfd = os.open("/dev/shm", os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_stale_stages(dirfd)  # (the second run's, as a third run would)
    finally:
        os.close(dirfd)
    assert fuzz_folders() - before == set()


@pytest.mark.slow
def test_smoke_soak(tmp_path: Path) -> None:
    need("fio")
    s = _run(tmp_path, "soak")["parts"]["soak"]
    assert s["ok"] and s["ios"] > 0, s
