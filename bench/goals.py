"""The goals of issue 6, evaluated on the medians of one run: each check is a ratio of
two medians measured in the same run (or a memory figure) against its target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from workloads import WORKLOADS

Median = Callable[[str, str, str], float | None]  # (group, label, workload) -> median
RAW_GROUPS = ("raw-tmpfs", "raw-disk")
READS = ("seqread", "randread-qd1", "randread-qd32", "nbdcopy")
IDLE_RSS_LIMIT_MB = 40.0


@dataclass
class Check:
    goal: str  # the goal as the issue states it
    what: str  # the ratio checked
    target: str
    value: float | None
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def _ratio(goal: str, what: str, a: float | None, b: float | None, at_least: float) -> Check:
    if a is None or b is None or b == 0:
        return Check(goal, what, f">= {at_least:.3g}x", None, None)
    r = a / b
    return Check(goal, what, f">= {at_least:.3g}x", r, r >= at_least)


def evaluate(median: Median, idle_rss_kib: int | None) -> list[Check]:
    out: list[Check] = []
    g1 = "raw sequential read/write >= 1.0x nbdkit file"
    g2 = "raw 4 KiB random QD32 >= 1.0x qemu-nbd and >= 2x nbdkit python"
    for group in RAW_GROUPS:
        for wl in ("seqread", "seqwrite"):
            out.append(_ratio(g1, f"{group} {wl}: blktap / nbdkit-file",
                              median(group, "blktap", wl), median(group, "nbdkit-file", wl),
                              1.0))
    for group in RAW_GROUPS:
        for wl in ("randread-qd32", "randwrite-qd32"):
            ours = median(group, "blktap", wl)
            out.append(_ratio(g2, f"{group} {wl}: blktap / qemu-nbd", ours,
                              median(group, "qemu-nbd", wl), 1.0))
            out.append(_ratio(g2, f"{group} {wl}: blktap / nbdkit-python", ours,
                              median(group, "nbdkit-python", wl), 2.0))
    g3 = "VHD >= 2x qemu-nbd -f vpc on every workload"
    g4 = "VHD >= 0.8x our own raw figure"
    for w in WORKLOADS:
        ours = median("vhd", "blktap", w.name)
        out.append(_ratio(g3, f"vhd {w.name}: blktap / qemu-nbd vpc", ours,
                          median("vhd", "qemu-nbd", w.name), 2.0))
    for w in WORKLOADS:
        out.append(_ratio(g4, f"{w.name}: blktap vhd / blktap raw (tmpfs)",
                          median("vhd", "blktap", w.name),
                          median("raw-tmpfs", "blktap", w.name), 0.8))
    g5 = "chain depth 30 costs < 10% over depth 1 (reads of data in the base)"
    for wl in READS:
        # "Costs less than 10% more" per I/O: depth-30 throughput >= depth-1's / 1.1.
        out.append(_ratio(g5, f"chain {wl}: depth 30 / depth 1",
                          median("chain", "depth 30", wl), median("chain", "depth 1", wl),
                          1 / 1.1))
    g7 = "qcow2 >= 1.0x qemu-nbd -f qcow2 on every workload"
    g8 = "qcow2 >= 0.8x our own raw figure"
    for group in ("qcow2", "qcow2-sparse"):
        for w in WORKLOADS:
            ours = median(group, "blktap", w.name)
            if ours is None and group == "qcow2-sparse":
                continue  # reads only
            out.append(_ratio(g7, f"{group} {w.name}: blktap / qemu-nbd qcow2", ours,
                              median(group, "qemu-nbd", w.name), 1.0))
    for w in WORKLOADS:
        out.append(_ratio(g8, f"{w.name}: blktap qcow2 / blktap raw (tmpfs)",
                          median("qcow2", "blktap", w.name),
                          median("raw-tmpfs", "blktap", w.name), 0.8))
    g6 = f"idle tapdisk RSS < {IDLE_RSS_LIMIT_MB:g} MB"
    if idle_rss_kib is None:
        out.append(Check(g6, "idle tapdisk VmRSS (MB)", f"< {IDLE_RSS_LIMIT_MB:g}", None, None))
    else:
        mb = idle_rss_kib * 1024 / 1e6
        out.append(Check(g6, "idle tapdisk VmRSS (MB)", f"< {IDLE_RSS_LIMIT_MB:g}", mb,
                         mb < IDLE_RSS_LIMIT_MB))
    return out
