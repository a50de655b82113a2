"""Where the samples come from: a VBD in this process (``blktap serve``), or every tapdisk
on the host through its control socket (``blktap exporter``, as ``tap-ctl stats`` asks)."""

from __future__ import annotations

import json
import logging

from blktap.errors import BlktapError
from blktap.io.polling import add_loop_stats
from blktap.metrics.prometheus import TapdiskSample, VbdSample, render

log = logging.getLogger("blktap.metrics")


def vbd_sample(vbd: object, labels: dict[str, str]) -> VbdSample:
    """The sample of a :class:`~blktap.tapdisk.vbd.VBD` of this process."""
    stats = add_loop_stats(vbd.stats_dict())  # type: ignore[attr-defined]
    return VbdSample(labels, stats, int(vbd.state))  # type: ignore[attr-defined]


def scrape_host(ctl: object | None = None) -> str:
    """Ask every tapdisk of the control directory for its VBDs and their stats (blocking:
    run it in a thread). A tapdisk that does not answer is reported down, not an error."""
    from blktap.control.client import TapCtl

    tc = ctl if ctl is not None else TapCtl()
    assert isinstance(tc, TapCtl)
    tapdisks: list[TapdiskSample] = []
    vbds: list[VbdSample] = []
    for tid in tc.tapdisk_ids():
        try:
            pid = tc.pid(tid)
            entries = [e for e in tc.vbds(tid, pid) if e.minor is not None]
        except (BlktapError, OSError) as exc:
            log.info("tapdisk %d did not answer: %s", tid, exc)
            tapdisks.append(TapdiskSample(str(tid), False))
            continue
        found = 0
        for e in entries:
            assert e.minor is not None
            try:
                stats = json.loads(tc.stats(tid, e.minor) or b"{}")
            except (BlktapError, OSError, ValueError) as exc:
                log.info("tapdisk %d minor %d: no stats: %s", pid, e.minor, exc)
                continue
            if not isinstance(stats, dict):
                continue
            found += 1
            vbds.append(VbdSample({"pid": str(pid), "minor": str(e.minor),
                                   "image": e.args or str(stats.get("name", ""))},
                                  stats, e.state))
        tapdisks.append(TapdiskSample(str(pid), True, found))
    return render(vbds, tapdisks)


__all__ = ["scrape_host", "vbd_sample"]
