"""The goals (issue 18's list, plus the chain, qcow2 and memory goals of earlier issues),
evaluated on per-repetition ratios: each check is the median of a ratio computed within
each repetition (stats.py), given with its spread, against its target.

A run that has no quiet reference to tell whether it was disturbed is not judged: its
checks keep their figures but the verdict is "not judged: REASON". Nor are the checks
over a group with a repetition still disturbed after its retries (the other groups ran
in repetitions of their own, each calibrated and sampled). Neither is
a check whose reference (the peer, or our own figure a ratio is taken over) ran far below
its quiet figure: a slow peer would make a ratio look met that a quiet machine would not
give. A check whose figure misses its target names the profile to take (bench/where.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stats import Spread, ratio_spread
from workloads import WORKLOADS

# (group, label, workload) -> {repetition: figure} over the repetitions kept
Figures = Callable[[str, str, str], dict[int, float]]
# (group, label, workload) -> the quiet reference's figure, None when it has none
QuietFigures = Callable[[str, str, str], float | None]
READS = ("seqread", "randread-qd1", "randread-qd32", "nbdcopy")
QD32 = ("randread-qd32", "randwrite-qd32")
QD1 = ("randread-qd1", "randwrite-qd1")
IDLE_RSS_LIMIT_MB = 40.0

# What bench/where.py profiles for each group (TYPE:IMAGE as `blktap serve` takes it).
PROFILE_TARGET = {
    "raw-tmpfs": "aio:/dev/shm/disk.raw",
    "raw-disk": "aio:DIR-ON-DISK/disk.raw",
    "vhd": "vhd:/dev/shm/disk.vhd",
    "qcow2": "qcow2:/dev/shm/disk.qcow2",
    "qcow2-sparse": "qcow2:/dev/shm/sparse.qcow2",
    "chain": "vhd:/dev/shm/LEAF-OF-A-30-DEEP-CHAIN.vhd",
}


@dataclass
class Check:
    goal: str  # the goal as the issue states it
    what: str  # the ratio checked
    target: str
    value: float | None  # median of the per-repetition ratios
    met: bool | None  # None: not measured, or not judged
    spread: Spread | None = None
    not_judged: str | None = None  # why the run cannot judge it
    profile: str | None = None  # the bench/where.py command, when the figure misses

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if self.not_judged:
            return f"not judged: {self.not_judged}"
        return "met" if self.met else "NOT met"


def profile_command(group: str, workload: str) -> str | None:
    target = PROFILE_TARGET.get(group)
    if target is None:
        return None
    tail = " -- --read-only" if group in ("chain", "qcow2-sparse") else ""
    return f"bench/where.py {target} {workload}{tail}"


def _check(goal: str, what: str, sp: Spread | None, limit: float, at_most: bool,
           group: str, workload: str, not_judged: str | None) -> Check:
    target = f"{'<=' if at_most else '>='} {limit:.3g}x"
    if sp is None:
        return Check(goal, what, target, None, None, None, not_judged)
    ok = sp.median <= limit if at_most else sp.median >= limit
    prof = None if ok else profile_command(group, workload)
    return Check(goal, what, target, sp.median, None if not_judged else ok, sp, not_judged,
                 prof)


def reference_below_quiet(figures: Figures, quiet: QuietFigures | None, threshold: float,
                          ref: tuple[str, str], wl: str) -> str | None:
    """Why a ratio over `ref` cannot be judged: its median this run is further below its
    quiet figure than the threshold (None: it is not, or there is no quiet figure)."""
    runs = figures(ref[0], ref[1], wl)
    q = quiet(ref[0], ref[1], wl) if quiet is not None else None
    if not runs or not q:
        return None
    share = statistics.median(runs.values()) / q
    if share >= 1 - threshold:
        return None
    return (f"{ref[1]} ({ref[0]} {wl}) at {share * 100:.0f}% of its quiet figure "
            f"(limit {(1 - threshold) * 100:.0f}%)")


def evaluate(figures: Figures, idle_rss_kib: int | None, not_judged: str | None = None,
             quiet: QuietFigures | None = None, threshold: float = 0.15,
             disturbed: Mapping[str, str] | None = None) -> list[Check]:
    """The checks of every goal. `not_judged` withholds every verdict (no quiet
    reference, a disturbed run); `disturbed` (group -> why) those of the checks over a
    group still disturbed; with `quiet`, a check whose reference ran below
    (1 - threshold) of its quiet figure is withheld alone."""
    out: list[Check] = []
    disturbed = disturbed or {}

    def add(goal: str, what: str, group: str, wl: str, ours: tuple[str, str],
            ref: tuple[str, str], limit: float, at_most: bool = False) -> None:
        sp = ratio_spread(figures(ours[0], ours[1], wl), figures(ref[0], ref[1], wl),
                          invert=at_most)
        why = (not_judged or disturbed.get(ours[0]) or disturbed.get(ref[0])
               or reference_below_quiet(figures, quiet, threshold, ref, wl))
        out.append(_check(goal, what, sp, limit, at_most, group, wl, why))

    g1 = "raw tmpfs 4 KiB random QD32 >= 1.5x qemu-nbd and >= 1.0x nbdkit file"
    for wl in QD32:
        t = "raw-tmpfs"
        add(g1, f"{t} {wl}: blktap / qemu-nbd", t, wl, (t, "blktap"), (t, "qemu-nbd"), 1.5)
        add(g1, f"{t} {wl}: blktap / nbdkit-file", t, wl, (t, "blktap"), (t, "nbdkit-file"),
            1.0)
    g2 = "raw on disk (O_DIRECT) 4 KiB random QD32 >= 1.0x qemu-nbd"
    for wl in QD32:
        d = "raw-disk"
        add(g2, f"{d} {wl}: blktap / qemu-nbd", d, wl, (d, "blktap"), (d, "qemu-nbd"), 1.0)
    g3 = "raw sequential write >= 1.0x nbdkit file (tmpfs)"
    add(g3, "raw-tmpfs seqwrite: blktap / nbdkit-file", "raw-tmpfs", "seqwrite",
        ("raw-tmpfs", "blktap"), ("raw-tmpfs", "nbdkit-file"), 1.0)
    g4 = "raw QD1 latency within 1.5x of nbdkit file (tmpfs)"
    for wl in QD1:
        # Latency at QD1 is the inverse of the rate: nbdkit's IOPS over ours.
        add(g4, f"raw-tmpfs {wl} latency: blktap / nbdkit-file", "raw-tmpfs", wl,
            ("raw-tmpfs", "blktap"), ("raw-tmpfs", "nbdkit-file"), 1.5, at_most=True)
    g5 = "VHD >= 2x qemu-nbd -f vpc on every workload"
    for w in WORKLOADS:
        add(g5, f"vhd {w.name}: blktap / qemu-nbd vpc", "vhd", w.name, ("vhd", "blktap"),
            ("vhd", "qemu-nbd"), 2.0)
    g6 = "VHD >= 0.9x our own raw figure (tmpfs)"
    for w in WORKLOADS:
        add(g6, f"{w.name}: blktap vhd / blktap raw (tmpfs)", "vhd", w.name,
            ("vhd", "blktap"), ("raw-tmpfs", "blktap"), 0.9)
    g7 = "chain depth 30 costs < 10% over depth 1 (reads of data in the base)"
    for wl in READS:
        # "Costs less than 10% more" per I/O: depth-30 throughput >= depth-1's / 1.1.
        add(g7, f"chain {wl}: depth 30 / depth 1", "chain", wl, ("chain", "depth 30"),
            ("chain", "depth 1"), 1 / 1.1)
    g8 = "qcow2 >= 1.0x qemu-nbd -f qcow2 on every workload"
    g9 = "qcow2 >= 0.8x our own raw figure"
    for group in ("qcow2", "qcow2-sparse"):
        for w in WORKLOADS:
            if group == "qcow2-sparse" and w.writes:
                continue  # reads only
            add(g8, f"{group} {w.name}: blktap / qemu-nbd qcow2", group, w.name,
                (group, "blktap"), (group, "qemu-nbd"), 1.0)
    for w in WORKLOADS:
        add(g9, f"{w.name}: blktap qcow2 / blktap raw (tmpfs)", "qcow2", w.name,
            ("qcow2", "blktap"), ("raw-tmpfs", "blktap"), 0.8)
    g10 = f"idle tapdisk RSS < {IDLE_RSS_LIMIT_MB:g} MB"
    if idle_rss_kib is None:
        out.append(Check(g10, "idle tapdisk VmRSS (MB)", f"< {IDLE_RSS_LIMIT_MB:g}", None,
                         None, None, not_judged))
    else:
        mb = idle_rss_kib * 1024 / 1e6
        ok = mb < IDLE_RSS_LIMIT_MB
        out.append(Check(g10, "idle tapdisk VmRSS (MB)", f"< {IDLE_RSS_LIMIT_MB:g}", mb,
                         None if not_judged else ok, None, not_judged))
    return out


def goal_verdict(checks: list[Check]) -> str:
    """One goal's verdict from its checks."""
    if all(c.value is None for c in checks):
        return "not measured"
    reason = next((c.not_judged for c in checks if c.not_judged), None)
    if reason:
        return f"not judged: {reason}"
    if any(c.met is False for c in checks):
        return "not met"
    return "met"  # every check measured is met
