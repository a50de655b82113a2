"""Prometheus metrics: the latency histograms a VBD keeps, the text exposition (parsed with
prometheus-client's own parser), ``blktap serve --metrics`` and ``blktap exporter`` over
the tapdisks of a control directory, and the HTTP endpoint's answers to bad requests."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from blktap.metrics.latency import BOUNDS, LatencyHistogram
from blktap.metrics.prometheus import VbdSample, render
from conftest import need, run, tool, with_engine

parser = pytest.importorskip("prometheus_client.parser")
MiB = 1 << 20


def families(text: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str, **labels: str) -> float:
    hits = [s.value for s in fams[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (sample, labels, hits)
    return hits[0]


def test_histogram_buckets() -> None:
    h = LatencyHistogram()
    for seconds in (0.0, BOUNDS[0], BOUNDS[0] * 1.01, 0.003, 10.0, 11.0):
        h.observe(seconds)
    h.observe_instant()
    assert h.count == 7
    assert h.counts[0] == 3  # 0, exactly the first bound (le is inclusive), instant
    assert h.counts[1] == 1 and h.counts[BOUNDS.index(0.005)] == 1
    assert h.counts[BOUNDS.index(10.0)] == 1 and h.counts[-1] == 1


def test_histogram_observe_all_counts_as_observe_does() -> None:
    times = [0.0, BOUNDS[0], BOUNDS[0] * 1.01, 0.003, 0.003, 10.0, 11.0]
    one, batch = LatencyHistogram(), LatencyHistogram()
    for seconds in times:
        one.observe(seconds)
    batch.observe_all(times)
    assert batch.counts == one.counts and batch.count == len(times)
    assert batch.sum == pytest.approx(one.sum)
    batch.observe_all([])
    assert batch.counts == one.counts


def test_render_parses_and_escapes() -> None:
    """Labels with quotes, backslashes and newlines survive; histogram buckets are
    cumulative and end in +Inf = _count; a C tapdisk's stats (no counters, no latency)
    still give bytes, in-flight and the stack."""
    ours = {"name": "x", "secs": [8, 16], "reqs_outstanding": 2,
            "images": [{"name": "/a.vhd", "hits": [8, 16], "fail": [0, 1],
                        "driver": {"name": "vhd"}},
                       {"name": "/b.vhd", "hits": [3, 0], "fail": [0, 0],
                        "driver": {"name": "vhd"}}],
            "counters": {"read_reqs": 1, "write_reqs": 2, "other_reqs": 0, "read_errors": 0,
                         "write_errors": 1, "other_errors": 0, "retries": 4},
            "latency": {"le": list(BOUNDS), "read": {"counts": [1] + [0] * 17, "sum": 0.0},
                        "write": {"counts": [0] * 5 + [2] + [0] * 11 + [1], "sum": 12.5},
                        "other": {"counts": [0] * 18, "sum": 0}},
            "loop": {"poll_max_us": 32, "poll_window_us": 16.0,
                     "poll_backend_window_us": 4.0, "poll_hits": 7, "sleeps": 3}}
    c_shape = {"name": "y", "secs": [1, 0], "reqs_outstanding": 0,
               "images": [{"name": "/c.raw", "hits": [1, 0], "fail": [0, 0],
                           "driver": {"type": 0, "name": "aio", "status": None}}]}
    weird = 'dis"k\\\nname'
    text = render([VbdSample({"minor": "0", "image": weird}, ours, 0x2a),
                   VbdSample({"minor": "1", "image": "c"}, c_shape, 0)])
    fams = families(text)
    assert value(fams, "blktap_vbd_bytes", "blktap_vbd_bytes_total", image=weird,
                 op="write") == 16 * 512
    assert value(fams, "blktap_vbd_paused", "blktap_vbd_paused", minor="0") == 1
    assert value(fams, "blktap_vbd_paused", "blktap_vbd_paused", minor="1") == 0
    assert value(fams, "blktap_vbd_in_flight", "blktap_vbd_in_flight", minor="0") == 2
    assert value(fams, "blktap_vbd_errors", "blktap_vbd_errors_total", minor="0",
                 op="write") == 1
    assert value(fams, "blktap_vbd_retries", "blktap_vbd_retries_total", minor="0") == 4
    assert value(fams, "blktap_vbd_loop_poll_hits", "blktap_vbd_loop_poll_hits_total",
                 minor="0") == 7
    assert value(fams, "blktap_vbd_loop_poll_window_seconds",
                 "blktap_vbd_loop_poll_window_seconds", minor="0") == 16e-6
    assert value(fams, "blktap_vbd_loop_poll_backend_window_seconds",
                 "blktap_vbd_loop_poll_backend_window_seconds", minor="0") == 4e-6
    h = "blktap_vbd_request_duration_seconds"
    assert fams[h].type == "histogram"
    assert value(fams, h, h + "_bucket", op="write", le="0.001") == 0
    assert value(fams, h, h + "_bucket", op="write", le="0.0025") == 2
    assert value(fams, h, h + "_bucket", op="write", le="10.0") == 2
    assert value(fams, h, h + "_bucket", op="write", le="+Inf") == 3
    assert value(fams, h, h + "_count", op="write") == 3
    assert value(fams, h, h + "_sum", op="write") == 12.5
    stack = [(s.labels["layer"], s.labels["path"], s.labels["driver"])
             for s in fams["blktap_vbd_layer_info"].samples if s.labels["minor"] == "0"]
    assert stack == [("0", "/a.vhd", "vhd"), ("1", "/b.vhd", "vhd")]
    assert value(fams, "blktap_vbd_layer_hits_bytes", "blktap_vbd_layer_hits_bytes_total",
                 minor="0", layer="1", op="read") == 3 * 512
    # The C shape: no request counters or histograms for it, the rest is there.
    assert not [s for s in fams["blktap_vbd_requests"].samples if s.labels["minor"] == "1"]
    assert value(fams, "blktap_vbd_layer_info", "blktap_vbd_layer_info", minor="1",
                 driver="aio") == 1


def test_vbd_histograms_count_every_completed_request(tmp_path: Path) -> None:
    """One histogram sample per completed request of its op (queued or side door), none
    for a request its caller withdrew; tap-ctl stats carries them."""
    import asyncio

    from blktap.tapdisk.drivers import open_stack
    from blktap.tapdisk.vbd import VBD

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))

    async def body(engine: object) -> dict:
        driver = await engine.call(open_stack, engine, f"aio:{disk}",  # type: ignore[attr-defined]
                                   writable=True, direct=False)
        vbd = VBD(driver)
        buf = memoryview(bytearray(4096))
        await vbd.write(0, buf)
        await vbd.read(0, buf)
        await vbd.read(8192, buf)
        await vbd.flush()
        served_now = vbd.read_now(0, buf)
        task = asyncio.ensure_future(vbd.read(4096, memoryview(bytearray(512))))
        await asyncio.sleep(0)
        task.cancel()  # withdrawn while queued
        await asyncio.gather(task, return_exceptions=True)
        stats = vbd.stats_dict()
        await vbd.close()
        return {"stats": stats, "now": served_now}

    out = with_engine(body)
    c, lat = out["stats"]["counters"], out["stats"]["latency"]
    assert lat["le"] == list(BOUNDS)
    assert c["cancelled"] == 1
    for op in ("read", "write", "other"):
        assert sum(lat[op]["counts"]) == c[f"{op}_reqs"], op
    assert c["read_reqs"] == 2 + out["now"] and c["write_reqs"] == 1 and c["other_reqs"] == 1
    assert lat["write"]["sum"] > 0


SCRAPE = (f"{sys.executable} -c 'import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())'")


def test_serve_metrics_count_what_a_client_did(tmp_path: Path) -> None:
    """blktap serve --metrics: a client writes 1 MiB and reads 64 KiB; the scrape (taken
    from the captive command, so no timing is involved) says so, and each histogram's
    count equals the requests of its op."""
    qemu_io = need("qemu-io")
    img = tmp_path / "d.vhd"
    run([tool("vhd-util"), "create", "-n", str(img), "-s", "16"], check=True)
    cmd = (f'{qemu_io} -f raw -c "write -P 7 0 1M" -c "read 0 64k" "$uri" >/dev/null && '
           f'{SCRAPE} "$metrics"')
    res = run([tool("blktap"), "serve", f"vhd:{img}", "--metrics", "127.0.0.1:0",
               "--run", cmd], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    fams = families(res.stdout)
    assert value(fams, "blktap_vbd_bytes", "blktap_vbd_bytes_total", op="write") == MiB
    assert value(fams, "blktap_vbd_bytes", "blktap_vbd_bytes_total", op="read") == 64 << 10
    h = "blktap_vbd_request_duration_seconds"
    for op in ("read", "write", "other"):
        reqs = value(fams, "blktap_vbd_requests", "blktap_vbd_requests_total", op=op)
        assert value(fams, h, h + "_count", op=op) == reqs
    assert value(fams, "blktap_vbd_requests", "blktap_vbd_requests_total", op="write") >= 1
    assert value(fams, "blktap_vbd_paused", "blktap_vbd_paused") == 0
    assert [s.labels["path"] for s in fams["blktap_vbd_layer_info"].samples] == [str(img)]


def _http(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_exporter_reads_every_tapdisk(tmp_path: Path) -> None:
    """Two tapdisks in a control directory; blktap exporter --once and a scrape of
    blktap exporter both list their VBDs; a pause shows as blktap_vbd_paused 1; bad HTTP
    requests get an error and the endpoint goes on serving."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(run_dir), BLKTAP_LOG_DIR=str(tmp_path))
    procs = []
    try:
        for name in ("a.raw", "b.raw"):
            (tmp_path / name).write_bytes(bytes(MiB))
            p = subprocess.Popen([tool("tapdisk"), "-D", "--open", f"aio:{tmp_path / name}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                 text=True)
            procs.append(p)
            assert select.select([p.stdout], [], [], 30)[0]
            p.stdout.readline()  # type: ignore[union-attr]
            p.stdout.readline()  # type: ignore[union-attr]  # MINOR SOCKET
        res = run([tool("tap-ctl"), "pause", "-p", str(procs[1].pid), "-m", "1"], env=env)
        assert res.returncode == 0, res.stderr
        res = run([tool("blktap"), "exporter", "--once"], env=env, text=True)
        assert res.returncode == 0, res.stderr
        fams = families(res.stdout)
        up = {s.labels["pid"]: s.value for s in fams["blktap_tapdisk_up"].samples}
        assert up == {str(p.pid): 1 for p in procs}
        paused = {(s.labels["pid"], s.labels["minor"], s.labels["image"]): s.value
                  for s in fams["blktap_vbd_paused"].samples}
        assert paused == {(str(procs[0].pid), "0", f"aio:{tmp_path / 'a.raw'}"): 0,
                          (str(procs[1].pid), "1", f"aio:{tmp_path / 'b.raw'}"): 1}

        exp = subprocess.Popen([tool("blktap"), "exporter", "--listen", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               text=True)
        procs.append(exp)
        assert select.select([exp.stdout], [], [], 30)[0]
        url = exp.stdout.readline().strip()  # type: ignore[union-attr]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        silent = socket.create_connection(("127.0.0.1", port))  # says nothing
        assert _http(port, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405")
        assert _http(port, b"GET /nope HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        assert _http(port, b"\x00garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert _http(port, b"GET /" + b"a" * 20000) == b""  # head too long: dropped
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            fams = families(r.read().decode())
        silent.close()
        assert {s.labels["minor"] for s in fams["blktap_vbd_in_flight"].samples} == {"0", "1"}
        procs[0].send_signal(signal.SIGKILL)  # a dead tapdisk leaves its socket behind
        procs[0].wait(30)
        with urllib.request.urlopen(url, timeout=30) as r:
            fams = families(r.read().decode())
        up = {s.labels["pid"]: s.value for s in fams["blktap_tapdisk_up"].samples}
        assert up[str(procs[1].pid)] == 1 and list(up.values()).count(0) == 1
        exp.send_signal(signal.SIGTERM)
        assert exp.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]


def test_bad_listen_address(tmp_path: Path) -> None:
    res = run([tool("blktap"), "exporter", "--listen", "127.0.0.1:notaport"], text=True)
    assert res.returncode == 22 and "invalid metrics address" in res.stderr
    assert not [ln for ln in res.stderr.splitlines() if "Traceback" in ln]

