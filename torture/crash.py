"""kill -9 trials: a server is killed under NBD writes, then the image is judged.

One trial: make an image (dynamic VHD, differencing VHD over a full parent, fixed VHD or
raw), serve it (``blktap serve`` or a tapdisk made by ``tap-ctl create``), run one or two
writer connections (:mod:`writer`, libnbd) on disjoint regions with FUA and flushes at
random, kill -9 the server at a random moment, and then:

- the image must pass ``vhd-util check -i`` as the kill left it (a primary footer may be
  missing, as after the reference tapdisk's crash), then ``vhd-util repair`` and plain
  ``check``;
- every sector of each region must hold a version the model allows (:mod:`model`):
  nothing durable lost, nothing torn, nothing misplaced.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blktap.image import Chain
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from model import Model, verify
from procs import SYSTEM_PYTHON, Server, rss_kib, start_serve, start_tapdisk, tool

MiB = 1 << 20
REGION = 8 * MiB
DISK = 4 * REGION
LAYOUTS = ("dynamic", "differencing", "fixed", "raw")
TRANSPORTS = ("serve", "tapdisk")
WRITER = str(Path(__file__).with_name("writer.py"))


@dataclass
class Trial:
    seed: int
    layout: str
    transport: str
    connections: int
    kill_after: float
    writes_sent: int = 0
    writes_acked: int = 0
    durable_writes: int = 0
    flushes: int = 0
    sectors: int = 0
    lost: int = 0
    torn: int = 0
    misplaced: int = 0
    check_ok: bool = False
    repair_ok: bool = False
    server_rss_kib: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _make_image(workdir: Path, layout: str, rng: random.Random) -> tuple[str, bytes]:
    """(spec, initial content of the whole disk)."""
    if layout == "raw":
        path = workdir / "disk.raw"
        with open(path, "wb") as f:
            f.truncate(DISK)
        return f"aio:{path}", bytes(DISK)
    path = workdir / "disk.vhd"
    if layout == "differencing":
        base = workdir / "base.vhd"
        create_vhd(str(base), DISK)
        initial = rng.randbytes(DISK)
        with Chain.open(f"vhd:{base}", writable=True) as disk:
            disk.pwrite(0, initial)
        snapshot_vhd(str(path), str(base))
        return f"vhd:{path}", initial
    create_vhd(str(path), DISK, fixed=(layout == "fixed"))
    return f"vhd:{path}", bytes(DISK)


def _read_regions(spec: str, regions: list[int]) -> list[bytes]:
    with Chain.open(spec) as disk:
        return [disk.pread(r, REGION) for r in regions]


def sabotage(spec: str, region: int, model: Model, how: str) -> None:
    """Damage a durable sector on purpose (the harness's self-test: it must notice)."""
    sector = next(iter(sorted(model.durable)))
    with Chain.open(spec, writable=True) as disk:
        raw = bytearray(disk.pread(sector * 512, 512))
        if how == "lose":
            raw[:] = bytes(512)
        else:  # tear: the second half of an older or other version
            raw[256:] = bytes(range(256))
        disk.pwrite(sector * 512, bytes(raw))
    del region


def run_trial(workdir: Path, seed: int, *, layout: str, transport: str, connections: int,
              max_kill_after: float, damage: str | None = None) -> Trial:
    rng = random.Random(seed)
    trial = Trial(seed, layout, transport, connections,
                  kill_after=round(rng.uniform(0.2, max_kill_after), 3))
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    spec, initial = _make_image(workdir, layout, rng)
    regions = rng.sample(range(0, DISK, REGION), connections)
    server: Server | None = None
    writers: list[subprocess.Popen] = []
    try:
        server = (start_serve(spec, workdir / "nbd.sock") if transport == "serve"
                  else start_tapdisk(spec, workdir))
        for i, region in enumerate(regions):
            writers.append(subprocess.Popen(
                [SYSTEM_PYTHON, WRITER, server.uri, str(seed * 16 + i), str(region),
                 str(REGION), "--depth", str(rng.choice((1, 4, 16))), "--seconds", "60"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(trial.kill_after)
        trial.server_rss_kib = rss_kib(server.pid)
        server.kill()
        outputs = []
        for w in writers:
            try:
                out, err = w.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                out, err = w.communicate()
                trial.problems.append("a writer did not notice the server's death")
            outputs.append(out)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if server is not None:
            server.stop()

    path = spec.split(":", 1)[1]
    if layout != "raw":
        res = subprocess.run([tool("vhd-util"), "check", "-i", "-n", path],
                             capture_output=True, text=True, timeout=300)
        # (vhd-util check prints nothing for a fixed disk, as the C tool does)
        trial.check_ok = res.returncode == 0 and ("is valid" in res.stdout or layout == "fixed")
        if not trial.check_ok:
            trial.problems.append(f"check -i after the kill: {(res.stdout + res.stderr).strip()}")
    else:
        trial.check_ok = True
    models = []
    for i, out in enumerate(outputs):
        model = Model(seed * 16 + i)
        model.feed(out.splitlines())
        models.append(model)
    if damage and models[0].durable:
        sabotage(spec, regions[0], models[0], damage)
    data = _read_regions(spec, regions)
    for i, (region, model) in enumerate(zip(regions, models, strict=True)):
        trial.writes_sent += len(model.writes)
        trial.writes_acked += sum(w.acked for w in model.writes.values())
        trial.durable_writes += model.durable_writes
        trial.flushes += model.flushes_done
        verdict = verify(model, region, data[i], initial[region:region + REGION])
        trial.sectors += verdict.sectors
        trial.lost += len(verdict.lost)
        trial.torn += len(verdict.torn)
        trial.misplaced += len(verdict.misplaced)
        if not verdict.ok:
            trial.problems.append(f"region {region}: {verdict.summary()}")
    if layout != "raw":
        res = subprocess.run([tool("vhd-util"), "repair", "-n", path], capture_output=True,
                             text=True, timeout=300)
        res2 = subprocess.run([tool("vhd-util"), "check", "-n", path], capture_output=True,
                              text=True, timeout=300)
        trial.repair_ok = res.returncode == 0 and res2.returncode == 0
        if not trial.repair_ok:
            trial.problems.append(f"repair/check: {(res.stderr + res2.stdout).strip()}")
        elif _read_regions(spec, regions) != data:
            trial.problems.append("repair changed the data")
    else:
        trial.repair_ok = True
    trial.seconds = round(time.monotonic() - t0, 2)
    return trial


def run(outdir: Path, trials: int, seed: int, *, max_kill_after: float = 3.0,
        layouts: tuple[str, ...] = LAYOUTS, transports: tuple[str, ...] = TRANSPORTS,
        log=print) -> dict:
    """``trials`` trials, cycling through layouts x transports x connections."""
    outdir.mkdir(parents=True, exist_ok=True)
    combos = [(lay, tr, c) for lay in layouts for tr in transports for c in (1, 2)]
    results = []
    with open(outdir / "crash.jsonl", "w") as journal:
        for n in range(trials):
            layout, transport, conns = combos[n % len(combos)]
            trial = run_trial(outdir / f"t{n}", seed + n, layout=layout, transport=transport,
                              connections=conns, max_kill_after=max_kill_after)
            journal.write(json.dumps(asdict(trial)) + "\n")
            journal.flush()
            results.append(trial)
            log(f"crash {n + 1}/{trials} {layout} {transport} x{conns}: "
                f"{trial.durable_writes} durable of {trial.writes_acked} acked, "
                f"{'ok' if trial.ok else 'FAIL: ' + '; '.join(trial.problems)}")
            if trial.ok:  # keep the evidence of failures only
                shutil.rmtree(outdir / f"t{n}", ignore_errors=True)
    return {
        "trials": len(results),
        "failed": sum(not t.ok for t in results),
        "writes_acked": sum(t.writes_acked for t in results),
        "durable_writes": sum(t.durable_writes for t in results),
        "lost_sectors": sum(t.lost for t in results),
        "torn_sectors": sum(t.torn for t in results),
        "misplaced_sectors": sum(t.misplaced for t in results),
        "images_failing_check": sum(not (t.check_ok and t.repair_ok) for t in results),
        "max_server_rss_kib": max((t.server_rss_kib for t in results), default=0),
    }
