"""kill -9 trials: a server is killed under NBD writes, then the image is judged.

One trial: make an image (dynamic VHD, differencing VHD over a full parent, fixed VHD,
raw, or qcow2: fresh, over a full qcow2 backing file, with lazy refcounts, with extended L2
entries over a backing file), serve it (``blktap serve`` or a tapdisk made by ``tap-ctl
create``), run one or two writer connections (:mod:`writer`, libnbd) on disjoint regions
with FUA and flushes at random, kill -9 the server at a random moment, and then:

- a VHD must pass ``vhd-util check -i`` as the kill left it (a primary footer may be
  missing, as after the reference tapdisk's crash), then ``vhd-util repair`` and plain
  ``check``; a qcow2 image must pass ``qemu-img check`` as left (leaked clusters allowed,
  as qemu allows them; with lazy refcounts a dirty image may also hold refcount errors,
  which qemu repairs on its next writable open), then ``qemu-img check -r all`` and a
  clean ``check``;
- every sector of each region must hold a version the model allows (:mod:`model`):
  nothing durable lost, nothing torn, nothing misplaced. A qcow2 image is read by qemu
  (``qemu-img convert`` to raw), and our own reading must agree with it.

The other transports' trials are in :mod:`guests` (vhost-user, the Xen ring).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blktap.image import Chain
from blktap.image.qcow2.create import create as create_qcow2
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from model import Model, verify
from procs import SYSTEM_PYTHON, Server, rss_kib, start_serve, start_tapdisk, tool

MiB = 1 << 20
REGION = 8 * MiB
DISK = 4 * REGION
VHD_LAYOUTS = ("dynamic", "differencing", "fixed")
QCOW2_LAYOUTS = ("qcow2", "qcow2-backed", "qcow2-lazy", "qcow2-extl2")
LAYOUTS = (*VHD_LAYOUTS, "raw", *QCOW2_LAYOUTS)
NBD_TRANSPORTS = ("serve", "tapdisk")
VHOST_TRANSPORTS = ("vhost-serve", "vhost-tapdisk")
TRANSPORTS = (*NBD_TRANSPORTS, *VHOST_TRANSPORTS, "blkif")
# What ``--kinds`` selects: (layout, transport) pairs, cycled through.
KINDS: dict[str, list[tuple[str, str]]] = {
    "vhd": [(lay, t) for lay in VHD_LAYOUTS for t in NBD_TRANSPORTS],
    "raw": [("raw", t) for t in NBD_TRANSPORTS],
    "qcow2": [(lay, t) for lay in QCOW2_LAYOUTS for t in NBD_TRANSPORTS],
    "vhost-user": [(lay, t) for lay in ("dynamic", "raw", "qcow2-backed")
                   for t in VHOST_TRANSPORTS],
    "blkif": [(lay, "blkif") for lay in ("dynamic", "raw", "qcow2", "differencing")],
}
# A tapdisk exports one vhost-user socket per disk; the blkif child serves one ring.
MAX_CONNECTIONS = {"vhost-tapdisk": 1, "blkif": 1}
HERE = Path(__file__).resolve().parent
WRITER = str(HERE / "writer.py")
VHOST_WRITER = str(HERE / "vhost_writer.py")
BLKIF_WRITER = str(HERE / "blkif_writer.py")


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
    dirty: bool = False  # a qcow2 image left with its dirty bit (lazy refcounts)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def make_image(workdir: Path, layout: str, rng: random.Random) -> tuple[str, bytes]:
    """(spec, initial content of the whole disk)."""
    if layout == "raw":
        path = workdir / "disk.raw"
        with open(path, "wb") as f:
            f.truncate(DISK)
        return f"aio:{path}", bytes(DISK)
    if layout in QCOW2_LAYOUTS:
        path = workdir / "disk.qcow2"
        initial = bytes(DISK)
        kw: dict = {"lazy_refcounts": layout == "qcow2-lazy",
                    "extended_l2": layout == "qcow2-extl2"}
        if layout in ("qcow2-backed", "qcow2-extl2"):
            base = workdir / "base.qcow2"
            create_qcow2(str(base), DISK)
            initial = rng.randbytes(DISK)
            with Chain.open(f"qcow2:{base}", writable=True) as disk:
                disk.pwrite(0, initial)
            kw.update(backing_file=str(base), backing_fmt="qcow2")
        create_qcow2(str(path), DISK, **kw)
        return f"qcow2:{path}", initial
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


def read_regions(spec: str, regions: list[int]) -> list[bytes]:
    with Chain.open(spec) as disk:
        return [disk.pread(r, REGION) for r in regions]


def _qemu_read(path: str, regions: list[int]) -> list[bytes]:
    """The regions as qemu reads the qcow2 image (and its backing file)."""
    out = Path(path).with_suffix(".qemu-raw")
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path,
                        str(out)], check=True, capture_output=True, timeout=300)
        with open(out, "rb") as f:
            return [os.pread(f.fileno(), REGION, r) for r in regions]
    finally:
        out.unlink(missing_ok=True)


def _qemu_check(path: str, *repair: str) -> tuple[int, dict, str]:
    """``qemu-img check`` (exit code, JSON report, text)."""
    res = subprocess.run(["qemu-img", "check", *repair, "--output=json", "-f", "qcow2", path],
                         capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(res.stdout)
    except ValueError:
        report = {}
    return res.returncode, report, (res.stdout + res.stderr).strip()


def _dirty(path: str) -> bool:
    """The qcow2 header's dirty bit (incompatible feature bit 0): lazy refcounts unsaved."""
    with open(path, "rb") as f:
        head = f.read(80)
    return len(head) >= 80 and bool(int.from_bytes(head[72:80], "big") & 1)


def check_as_left(layout: str, path: str) -> str | None:
    """What is wrong with the image as the kill left it (None: nothing)."""
    if layout in VHD_LAYOUTS:
        res = subprocess.run([tool("vhd-util"), "check", "-i", "-n", path],
                             capture_output=True, text=True, timeout=300)
        # (vhd-util check prints nothing for a fixed disk, as the C tool does)
        if res.returncode == 0 and ("is valid" in res.stdout or layout == "fixed"):
            return None
        return f"check -i after the kill: {(res.stdout + res.stderr).strip()}"
    if layout in QCOW2_LAYOUTS:
        code, report, text = _qemu_check(path)
        if code in (0, 3):  # 3: leaked clusters only, which qemu accepts
            return None
        # A dirty image with lazy refcounts may hold stale refcounts (qemu repairs them
        # when it opens the image for writing); anything but refcount errors is corrupt.
        stale_refcounts = (code == 2 and _dirty(path) and layout == "qcow2-lazy"
                           and report.get("corruptions", 0) > 0
                           and "corruptions-fixed" not in report)
        if stale_refcounts and _only_refcount_errors(text):
            return None
        return f"qemu-img check after the kill (exit {code}): {text[-2000:]}"
    return None


def _only_refcount_errors(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.startswith(("ERROR", "Warning"))]
    return all("refcount" in ln.lower() for ln in lines)


def repair(layout: str, path: str) -> str | None:
    """Repair as an administrator would, then check again (None: clean)."""
    if layout in VHD_LAYOUTS:
        res = subprocess.run([tool("vhd-util"), "repair", "-n", path], capture_output=True,
                             text=True, timeout=300)
        res2 = subprocess.run([tool("vhd-util"), "check", "-n", path], capture_output=True,
                              text=True, timeout=300)
        if res.returncode == 0 and res2.returncode == 0:
            return None
        return f"repair/check: {(res.stderr + res2.stdout).strip()}"
    if layout in QCOW2_LAYOUTS:
        code, _, text = _qemu_check(path, "-r", "all")
        code2, _, text2 = _qemu_check(path)
        if code in (0, 3) and code2 == 0:
            return None
        return f"qemu-img check -r all (exit {code}) then check (exit {code2}): {text2[-2000:]}"
    return None


def read_as_judged(layout: str, spec: str, regions: list[int]) -> tuple[list[bytes], str | None]:
    """The regions to judge, and a problem if two readers disagree."""
    ours = read_regions(spec, regions)
    if layout not in QCOW2_LAYOUTS:
        return ours, None
    qemu = _qemu_read(spec.split(":", 1)[1], regions)
    if qemu != ours:
        return qemu, "qemu and blktap read different data"
    return qemu, None


def _await_start(proc: subprocess.Popen, until: bytes, timeout: float = 60.0) -> str:
    """What a writer printed up to its first line starting with ``until`` (or its end),
    read raw: ``communicate`` reads the pipe itself, past any reader's buffer. The kill's
    clock starts after it, so that no trial ends before its writers began (a loaded
    machine can take a second to start a Python)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return got.decode()
            got += chunk
            if any(ln.startswith(until) for ln in got.split(b"\n")[:-1]):
                return got.decode()
        elif proc.poll() is not None:
            return got.decode()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise RuntimeError(f"a writer did not start: {err.strip()[-2000:]}")


def _await_socket(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no vhost-user socket")
        time.sleep(0.05)


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
    shutil.rmtree(workdir, ignore_errors=True)  # (what an earlier run left there)
    workdir.mkdir(parents=True)
    spec, initial = make_image(workdir, layout, rng)
    regions = rng.sample(range(0, DISK, REGION), connections)
    server: Server | None = None
    writers: list[subprocess.Popen] = []
    early: list[str] = []  # what each writer printed before the clock started
    try:
        depth = str(rng.choice((1, 4, 16)))
        if transport == "blkif":
            order, abi = rng.choice((0, 1, 2)), rng.choice((64, 32))
            child = subprocess.Popen(
                [sys.executable, BLKIF_WRITER, spec, str(workdir / "run"), str(seed * 16),
                 str(regions[0]), str(REGION), "--depth", depth, "--seconds", "60",
                 "--order", str(order), "--abi", str(abi)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            writers.append(child)
            early.append(_await_start(child, b"R"))  # its ring is connected
            if not early[0].startswith("R\n"):
                raise RuntimeError(f"the blkif writer did not start: {early[0][-2000:]}")
            server = Server("blkif", "", child.pid, proc=child)
        elif transport in VHOST_TRANSPORTS:
            server = (start_serve(spec, workdir / "nbd.sock",
                                  [workdir / f"vhost{i}.sock" for i in range(connections)])
                      if transport == "vhost-serve" else
                      start_tapdisk(spec, workdir, vhost_user=True))
            for i, region in enumerate(regions):
                _await_socket(server.vhost[i])
                writers.append(subprocess.Popen(
                    [sys.executable, VHOST_WRITER, server.vhost[i], str(seed * 16 + i),
                     str(region), str(REGION), "--depth", depth, "--seconds", "60"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        else:
            server = (start_serve(spec, workdir / "nbd.sock") if transport == "serve"
                      else start_tapdisk(spec, workdir))
            for i, region in enumerate(regions):
                writers.append(subprocess.Popen(
                    [SYSTEM_PYTHON, WRITER, server.uri, str(seed * 16 + i), str(region),
                     str(REGION), "--depth", str(rng.choice((1, 4, 16))), "--seconds", "60"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if transport != "blkif":
            early = [_await_start(w, b"S") for w in writers]  # its first write is sent
        time.sleep(trial.kill_after)
        trial.server_rss_kib = rss_kib(server.pid)
        if server.proc is not None and server.proc.poll() is not None:
            trial.problems.append(f"the server had died before the kill "
                                  f"(exit {server.proc.returncode})")
        server.kill()
        outputs = []
        for w in writers:
            try:
                out, err = w.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                out, err = w.communicate()
                trial.problems.append("a writer did not notice the server's death")
            if transport != "blkif" and w.returncode != 0:
                trial.problems.append(f"a writer failed (exit {w.returncode}): "
                                      f"{err.strip()[-1500:]}")
            outputs.append(out)
        outputs = [e + o for e, o in zip(early, outputs, strict=True)]
        for out in outputs:
            if not any(ln.startswith("S ") for ln in out.splitlines()):
                trial.problems.append(f"a writer sent no write: {out.strip()[-300:]!r}")
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if server is not None:
            server.stop()

    path = spec.split(":", 1)[1]
    if layout in QCOW2_LAYOUTS and _dirty(path):
        trial.dirty = True
    problem = check_as_left(layout, path)
    trial.check_ok = problem is None
    if problem:
        trial.problems.append(problem)
    models = []
    for i, out in enumerate(outputs):
        model = Model(seed * 16 + i)
        model.feed(out.splitlines())
        models.append(model)
    if damage and models[0].durable:
        sabotage(spec, regions[0], models[0], damage)
    data, problem = read_as_judged(layout, spec, regions)
    if problem:
        trial.problems.append(problem)
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
    problem = repair(layout, path)
    trial.repair_ok = problem is None
    if problem:
        trial.problems.append(problem)
    elif read_as_judged(layout, spec, regions)[0] != data:
        trial.problems.append("repair changed the data")
    trial.seconds = round(time.monotonic() - t0, 2)
    return trial


def combos(kinds: tuple[str, ...]) -> list[tuple[str, str, str, int]]:
    """(kind, layout, transport, connections) of each kind, interleaved so that the first
    trials of a run already take every kind in turn."""
    per_kind = [[(k, lay, tr, c) for lay, tr in KINDS[k] for c in (1, 2)
                 if c <= MAX_CONNECTIONS.get(tr, 2)] for k in kinds]
    out = []
    for i in range(max(len(p) for p in per_kind)):
        out += [p[i % len(p)] for p in per_kind]
    return out


def run(outdir: Path, trials: int, seed: int, *, max_kill_after: float = 3.0,
        kinds: tuple[str, ...] = tuple(KINDS), log=print) -> dict:
    """``trials`` trials, cycling through the kinds' layouts x transports x connections."""
    outdir.mkdir(parents=True, exist_ok=True)
    plan = combos(kinds)
    results: list[tuple[str, Trial]] = []
    with open(outdir / "crash.jsonl", "w") as journal:
        for n in range(trials):
            kind, layout, transport, conns = plan[n % len(plan)]
            trial = run_trial(outdir / f"t{n}", seed + n, layout=layout, transport=transport,
                              connections=conns, max_kill_after=max_kill_after)
            journal.write(json.dumps({"kind": kind, **asdict(trial)}) + "\n")
            journal.flush()
            results.append((kind, trial))
            log(f"crash {n + 1}/{trials} {layout} {transport} x{conns}: "
                f"{trial.durable_writes} durable of {trial.writes_acked} acked, "
                f"{'ok' if trial.ok else 'FAIL: ' + '; '.join(trial.problems)}")
            if trial.ok:  # keep the evidence of failures only
                shutil.rmtree(outdir / f"t{n}", ignore_errors=True)
    summary = _totals([t for _, t in results])
    summary["kinds"] = {k: _totals([t for kk, t in results if kk == k])
                        for k in kinds if any(kk == k for kk, _ in results)}
    return summary


def _totals(results: list[Trial]) -> dict:
    return {
        "trials": len(results),
        "failed": sum(not t.ok for t in results),
        "writes_acked": sum(t.writes_acked for t in results),
        "durable_writes": sum(t.durable_writes for t in results),
        "flushes": sum(t.flushes for t in results),
        "lost_sectors": sum(t.lost for t in results),
        "torn_sectors": sum(t.torn for t in results),
        "misplaced_sectors": sum(t.misplaced for t in results),
        "images_failing_check": sum(not (t.check_ok and t.repair_ok) for t in results),
        "images_left_dirty": sum(t.dirty for t in results),
        "max_server_rss_kib": max((t.server_rss_kib for t in results), default=0),
        "seconds": round(sum(t.seconds for t in results), 1),
    }
