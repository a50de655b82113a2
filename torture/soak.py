"""A soak: 32 fio clients with verify against one served disk, and what the server holds
(RSS, open fds) before, at the peak and after the clients have left.

fio's NBD engine (libnbd) writes random blocks with a checksum header in each and, every
16 writes, reads the written blocks back to verify them; a mismatch fails the job. The
server must serve every client correctly and give its memory and descriptors back when
they are gone: RSS within 2x of idle, the fd count back to idle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from procs import fd_count, rss_kib, start_serve

MiB = 1 << 20


def run(outdir: Path, seconds: float, clients: int = 32, log=print) -> dict:
    fio = shutil.which("fio")
    if fio is None:
        raise RuntimeError("fio is not installed (make torture installs it)")
    outdir.mkdir(parents=True, exist_ok=True)
    region = 16 * MiB
    disk = outdir / "soak.raw"
    with open(disk, "wb") as f:
        f.truncate(clients * region)
    server = start_serve(f"aio:{disk}", outdir / "soak.sock")
    try:
        time.sleep(0.5)
        idle_rss, idle_fds = rss_kib(server.pid), fd_count(server.pid)
        peak = [idle_rss, idle_fds]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                peak[0] = max(peak[0], rss_kib(server.pid))
                peak[1] = max(peak[1], fd_count(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        res = subprocess.run(
            [fio, "--name=soak", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
             "--bsrange=4k-256k", "--iodepth=8", f"--numjobs={clients}",
             f"--size={region}", f"--offset_increment={region}", "--verify=crc32c",
             "--verify_fatal=1", "--verify_backlog=16", "--do_verify=1", "--time_based",
             f"--runtime={max(1, int(seconds))}", "--group_reporting",
             "--output-format=json", f"--output={outdir / 'fio.json'}"],
            capture_output=True, text=True, timeout=seconds + 600, cwd=outdir)
        stop.set()
        sampler.join()
        time.sleep(1.0)  # the connections' teardown
        after_rss, after_fds = rss_kib(server.pid), fd_count(server.pid)
        alive = server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
    errors = 0
    ios = 0
    try:
        report = json.loads((outdir / "fio.json").read_text())
        job = report["jobs"][0]
        errors = job.get("error", 0)
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    except (OSError, ValueError, KeyError, IndexError):
        errors = -1
    result = {
        "clients": clients,
        "seconds": seconds,
        "fio_exit": res.returncode,
        "fio_error": errors,
        "ios": ios,
        "server_alive": alive,
        "idle_rss_kib": idle_rss, "peak_rss_kib": peak[0], "after_rss_kib": after_rss,
        "idle_fds": idle_fds, "peak_fds": peak[1], "after_fds": after_fds,
    }
    result["ok"] = (res.returncode == 0 and errors == 0 and alive
                    and after_rss <= 2 * idle_rss and after_fds <= idle_fds)
    if not result["ok"]:
        result["fio_stderr"] = res.stderr[-2000:]
    log(f"soak: {clients} clients x {seconds}s, {ios} I/Os verified, fio exit "
        f"{res.returncode}; RSS {idle_rss} -> {peak[0]} -> {after_rss} KiB, fds "
        f"{idle_fds} -> {peak[1]} -> {after_fds}: {'ok' if result['ok'] else 'FAIL'}")
    return result
