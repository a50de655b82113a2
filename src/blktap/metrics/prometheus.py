"""The Prometheus text exposition format (version 0.0.4) of what VBDs count.

Written by hand rather than with ``prometheus-client``: the format is a few lines of
text per sample, our counters already live in the VBD (``tap-ctl stats`` reads the same
ones), and the daemons then need no dependency nor a second registry of counters kept in
step with the first. The tests parse this output with prometheus-client's own parser.

Input is one :class:`VbdSample` per VBD: the ``tap-ctl stats`` object of the VBD (ours,
or the C tapdisk's, which lacks ``counters`` and ``latency``: those families are then
left out for it), its state bits and the labels that name it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SECTOR = 512
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PAUSED_BITS = 0x010 | 0x020  # PAUSE_REQUESTED | PAUSED


@dataclass
class VbdSample:
    labels: dict[str, str]  # e.g. {"pid": "4242", "minor": "0", "image": "vhd:/x.vhd"}
    stats: dict  # the tap-ctl stats object
    state: int | None = None


@dataclass
class TapdiskSample:
    """A tapdisk process: up (it answered) or not, and how many VBDs it serves."""

    pid: str
    up: bool
    vbds: int = 0


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: dict[str, str], value: float, suffix: str = "") -> None:
        self.samples.append((self.name + suffix, labels, value))

    def render(self, out: list[str]) -> None:
        if not self.samples:
            return
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for name, labels, value in self.samples:
            out.append(f"{name}{_labels(labels)} {_number(value)}")


class _Families:
    def __init__(self) -> None:
        self._by_name: dict[str, _Family] = {}

    def __call__(self, name: str, kind: str, help: str) -> _Family:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = _Family(name, kind, help)
        return fam

    def render(self) -> str:
        out: list[str] = []
        for fam in self._by_name.values():
            fam.render(out)
        return "\n".join(out) + "\n" if out else ""


def _vbd(f: _Families, v: VbdSample) -> None:
    st, base = v.stats, v.labels
    secs = st.get("secs") or [0, 0]
    by = f("blktap_vbd_bytes_total", "counter", "Bytes read and written (completed).")
    by.add(base | {"op": "read"}, int(secs[0]) * SECTOR)
    by.add(base | {"op": "write"}, int(secs[1]) * SECTOR)
    f("blktap_vbd_in_flight", "gauge", "Requests under way.").add(
        base, int(st.get("reqs_outstanding", 0)))
    if v.state is not None:
        f("blktap_vbd_state", "gauge", "The tapdisk VBD state bits (tap-ctl list).").add(
            base, v.state)
        f("blktap_vbd_paused", "gauge", "1 while paused or pausing (tap-ctl pause).").add(
            base, 1 if v.state & PAUSED_BITS else 0)
    c = st.get("counters")
    if isinstance(c, dict):
        req = f("blktap_vbd_requests_total", "counter", "Requests completed, by op.")
        err = f("blktap_vbd_errors_total", "counter", "Requests failed, by op.")
        for op in ("read", "write", "other"):
            req.add(base | {"op": op}, c.get(f"{op}_reqs", 0))
            err.add(base | {"op": op}, c.get(f"{op}_errors", 0))
        for key, help in (("retries", "Requests reissued after EAGAIN/EBUSY/EINTR."),
                          ("timeouts", "Requests failed after retrying past the timeout."),
                          ("cancelled", "Requests withdrawn by their client."),
                          ("merged", "Requests merged into a neighbour's system call."),
                          ("submitted", "Requests handed to the VBD."),
                          ("watchdog_stalls", "Times requests were stuck for the "
                                              "watchdog's period.")):
            f(f"blktap_vbd_{key}_total", "counter", help).add(base, c.get(key, 0))
    lat = st.get("latency")
    if isinstance(lat, dict):
        hist = f("blktap_vbd_request_duration_seconds", "histogram",
                 "Request latency, from the transport's hand-over to completion.")
        bounds = [float(b) for b in lat.get("le", [])]
        for op in ("read", "write", "other"):
            h = lat.get(op)
            if not isinstance(h, dict):
                continue
            counts = [int(n) for n in h.get("counts", [])]
            labels = base | {"op": op}
            total = 0
            for bound, n in zip([*bounds, math.inf], counts, strict=False):
                total += n
                hist.add(labels | {"le": _number(bound)}, total, "_bucket")
            hist.add(labels, float(h.get("sum", 0.0)), "_sum")
            hist.add(labels, total, "_count")
    loop = st.get("loop")
    if isinstance(loop, dict):
        f("blktap_vbd_loop_poll_hits_total", "counter",
          "Waits of the process's event loop that a poll ended, with no sleep.").add(
            base, int(loop.get("poll_hits", 0)))
        f("blktap_vbd_loop_sleeps_total", "counter",
          "Waits of the process's event loop that slept.").add(
            base, int(loop.get("sleeps", 0)))
        f("blktap_vbd_loop_poll_window_seconds", "gauge",
          "How long the event loop polls before it sleeps now (adaptive), waiting for "
          "consumers.").add(base, float(loop.get("poll_window_us", 0)) / 1e6)
        f("blktap_vbd_loop_poll_backend_window_seconds", "gauge",
          "How long the event loop polls before it sleeps now (adaptive), waiting for a "
          "disk's backend.").add(base, float(loop.get("poll_backend_window_us", 0)) / 1e6)
    layers = st.get("images") or []
    info = f("blktap_vbd_layer_info", "gauge",
             "The driver stack, leaf first (layer 0): one sample per layer.")
    hits = f("blktap_vbd_layer_hits_bytes_total", "counter",
             "Bytes each layer of the stack served (tap-ctl stats' hits).")
    fails = f("blktap_vbd_layer_fail_bytes_total", "counter",
              "Bytes each layer failed (tap-ctl stats' fail).")
    for i, img in enumerate(layers):
        drv = img.get("driver") or {}
        where = base | {"layer": str(i)}
        info.add(where | {"driver": str(drv.get("name", "")),
                          "path": str(img.get("name", ""))}, 1)
        for j, op in enumerate(("read", "write")):
            hits.add(where | {"op": op}, int((img.get("hits") or [0, 0])[j]) * SECTOR)
            fails.add(where | {"op": op}, int((img.get("fail") or [0, 0])[j]) * SECTOR)


def render(vbds: Iterable[VbdSample], tapdisks: Sequence[TapdiskSample] = ()) -> str:
    """The exposition of every VBD (and tapdisk) given."""
    f = _Families()
    for t in tapdisks:
        f("blktap_tapdisk_up", "gauge", "1 if the tapdisk answered this scrape.").add(
            {"pid": t.pid}, 1 if t.up else 0)
        f("blktap_tapdisk_vbds", "gauge", "VBDs the tapdisk serves.").add(
            {"pid": t.pid}, t.vbds)
    for v in vbds:
        _vbd(f, v)
    return f.render()


__all__ = ["CONTENT_TYPE", "TapdiskSample", "VbdSample", "escape", "render"]
