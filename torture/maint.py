"""SIGKILL of maintenance commands at random moments, then recovery and judgement.

Each trial builds a small chain with data in most blocks, records what the disk reads
as, starts one command, kills it with SIGKILL after a random delay (within the time the
command takes when left alone) and then checks what an operator would:

- ``coalesce`` (vhd-util coalesce -n leaf): the leaf reads as before and both images
  pass check; coalescing again completes and the parent then reads as the leaf did.
- ``resize`` (vhd-util resize -j): the journal, if left, reverts (vhd-util revert); the
  image passes check and reads as before (grown or not).
- ``modify`` (vhd-util modify -p, to a copy of the parent): the leaf passes check, names
  the old or the new parent, and reads as before.
- ``snapshot`` (vhd-util snapshot): the leaf is untouched; the snapshot is absent or valid
  and reads as the leaf.
- ``convert`` (blktap convert -O vhd|raw): the source is untouched; the target is absent
  or complete; no temporary file or folder is left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blktap.image import Chain
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from procs import tool

MiB = 1 << 20
SIZE = 256 * MiB
KINDS = ("coalesce", "resize", "modify", "snapshot", "convert")


@dataclass
class MaintTrial:
    kind: str
    seed: int
    delay: float
    finished: bool = False  # the command completed before the kill
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _fill(spec: str, rng: random.Random, share: float) -> None:
    with Chain.open(spec, writable=True) as disk:
        for block in range(SIZE // (2 * MiB)):
            if rng.random() < share:
                at = block * 2 * MiB + rng.randrange(0, 2 * MiB, 4096)
                n = min(rng.choice((4096, 65536, 2 * MiB)), SIZE - at)
                disk.pwrite(at, (rng.randbytes(4096) * (n // 4096 + 1))[:n])


def _content(spec: str) -> bytes:
    with Chain.open(spec) as disk:
        return disk.pread(0, disk.size)


def _check(path: Path, problems: list[str], what: str) -> None:
    res = subprocess.run([tool("vhd-util"), "check", "-n", str(path)], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 or "is valid" not in res.stdout:
        problems.append(f"{what}: check: {(res.stdout + res.stderr).strip()}")


def _build(workdir: Path, rng: random.Random) -> tuple[Path, Path]:
    base, leaf = workdir / "base.vhd", workdir / "leaf.vhd"
    create_vhd(str(base), SIZE)
    _fill(f"vhd:{base}", rng, 0.9)
    snapshot_vhd(str(leaf), str(base))
    _fill(f"vhd:{leaf}", rng, 0.6)
    return base, leaf


def _command(kind: str, workdir: Path, base: Path, leaf: Path) -> list[str]:
    if kind == "coalesce":
        return [tool("vhd-util"), "coalesce", "-n", str(leaf)]
    if kind == "resize":
        return [tool("vhd-util"), "resize", "-n", str(base), "-s", str(2 * SIZE // MiB),
                "-j", str(workdir / "resize.journal")]
    if kind == "modify":
        return [tool("vhd-util"), "modify", "-n", str(leaf), "-p", str(workdir / "base2.vhd")]
    if kind == "snapshot":
        return [tool("vhd-util"), "snapshot", "-n", str(workdir / "snap.vhd"), "-p", str(leaf)]
    fmt = "vhd" if hash(str(workdir)) % 2 else "raw"
    return [tool("blktap"), "convert", "-O", fmt, f"vhd:{leaf}", str(workdir / "out.img")]


def run_trial(workdir: Path, kind: str, seed: int, window: tuple[float, float]) -> MaintTrial:
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    trial = MaintTrial(kind, seed, round(rng.uniform(*window), 3))
    base, leaf = _build(workdir, rng)
    if kind == "modify":
        shutil.copyfile(base, workdir / "base2.vhd")
    before_leaf = _content(f"vhd:{leaf}")
    before_base = _content(f"vhd:{base}")
    entries_before = set(os.listdir(workdir))
    proc = subprocess.Popen(_command(kind, workdir, base, leaf), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=workdir)
    time.sleep(trial.delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    trial.finished = proc.returncode == 0
    p = trial.problems
    if kind == "coalesce":
        _check(leaf, p, "leaf")
        _check(base, p, "parent")
        if _content(f"vhd:{leaf}") != before_leaf:
            p.append("the leaf changed")
        res = subprocess.run(_command(kind, workdir, base, leaf), capture_output=True,
                             timeout=300)
        if res.returncode != 0:
            p.append(f"coalesce again failed: {res.stderr.decode().strip()}")
        elif _content(f"vhd:{base}") != before_leaf:
            p.append("the parent after coalesce does not read as the leaf did")
    elif kind == "resize":
        journal = workdir / "resize.journal"
        if journal.exists():
            res = subprocess.run([tool("vhd-util"), "revert", "-n", str(base), "-j",
                                  str(journal)], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                p.append(f"revert: {res.stdout.strip()} {res.stderr.strip()}")
        _check(base, p, "resized image")
        after = _content(f"vhd:{base}")
        if after[:SIZE] != before_base or after[SIZE:].count(0) != len(after) - SIZE:
            p.append("the resized image's content changed")
    elif kind == "modify":
        _check(leaf, p, "leaf")
        if _content(f"vhd:{leaf}") != before_leaf:
            p.append("the leaf's content changed")
    elif kind == "snapshot":
        snap = workdir / "snap.vhd"
        if _content(f"vhd:{leaf}") != before_leaf:
            p.append("the leaf changed")
        if snap.exists():
            _check(snap, p, "snapshot")
            if not p and _content(f"vhd:{snap}") != before_leaf:
                p.append("the snapshot does not read as the leaf")
    else:
        out = workdir / "out.img"
        if _content(f"vhd:{leaf}") != before_leaf:
            p.append("the source changed")
        if out.exists():
            spec = f"{'vhd' if out.read_bytes()[:8] == b'conectix' else 'aio'}:{out}"
            if _content(spec)[: len(before_leaf)] != before_leaf:
                p.append("a converted image exists but is incomplete")
    extra = set(os.listdir(workdir)) - entries_before - {"out.img", "snap.vhd",
                                                          "resize.journal"}
    if extra:
        p.append(f"left behind: {sorted(extra)}")
    return trial


def _startup(kind: str) -> float:
    """How long the command's program takes to start and exit doing nothing."""
    argv = _command(kind, Path("/nonexistent"), Path("/nonexistent"), Path("/nonexistent"))
    t0 = time.monotonic()
    subprocess.run(argv[:2], capture_output=True, timeout=300)  # usage, exit
    return time.monotonic() - t0


def _timing(workdir: Path, kind: str, seed: int) -> float:
    """How long the command takes when left alone."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    base, leaf = _build(workdir, rng)
    if kind == "modify":
        shutil.copyfile(base, workdir / "base2.vhd")
    t0 = time.monotonic()
    subprocess.run(_command(kind, workdir, base, leaf), capture_output=True, timeout=300)
    took = time.monotonic() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    return took


def run(outdir: Path, trials: int, seed: int, *, kinds: tuple[str, ...] = KINDS,
        log=print) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    # Medians of three runs: a shared machine's load makes single timings wander.
    durations = {k: sorted(_timing(outdir / f"timing-{k}", k, seed) for _ in range(3))[1]
                 for k in kinds}
    # The kill lands after the program has started and before it would have finished.
    windows = {k: (min(_startup(k), durations[k]) * 0.9, durations[k] * 1.05) for k in kinds}
    results = []
    with open(outdir / "maint.jsonl", "w") as journal:
        for n in range(trials):
            kind = kinds[n % len(kinds)]
            trial = run_trial(outdir / f"m{n}", kind, seed + n, windows[kind])
            journal.write(json.dumps(asdict(trial)) + "\n")
            journal.flush()
            results.append(trial)
            log(f"maint {n + 1}/{trials} {kind} killed at {trial.delay}s"
                f"{' (had finished)' if trial.finished else ''}: "
                f"{'ok' if trial.ok else 'FAIL: ' + '; '.join(trial.problems)}")
            if trial.ok:
                shutil.rmtree(outdir / f"m{n}", ignore_errors=True)
    return {
        "trials": len(results),
        "failed": sum(not t.ok for t in results),
        "killed_midway": sum(not t.finished for t in results),
        "windows_s": {k: (round(a, 3), round(b, 3)) for k, (a, b) in windows.items()},
    }
