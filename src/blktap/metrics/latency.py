"""Request latency histograms, kept by every VBD.

Fixed bucket bounds (seconds, from 50 µs to 10 s: a page-cache hit to a request retried
against a busy device), counts per bucket and a running sum: recording a request is a
bisection over 17 bounds and two additions, O(1), and nothing is allocated. The counts
are kept per bucket (not cumulative) so that ``tap-ctl stats`` stays small; the
Prometheus rendering makes them cumulative.

Latency is measured from the moment the transport handed the request to the VBD to the
moment it completed (retries and time held by a pause included). Requests served at once
by the side door (:meth:`VBD.read_now`) cost no clock read: they are counted in the first
bucket and add nothing to the sum.
"""

from __future__ import annotations

from bisect import bisect_left

BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class LatencyHistogram:
    """Counts of requests by latency bucket; the last bucket is everything above 10 s."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    def observe_all(self, seconds: list[float]) -> None:
        """:meth:`observe` each of ``seconds`` (a batch of completions: one call)."""
        counts = self.counts
        for took in seconds:
            counts[bisect_left(BOUNDS, took)] += 1
        self.sum += sum(seconds)

    def observe_instant(self) -> None:
        """A request served without waiting (no clock read): the first bucket."""
        self.counts[0] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def as_dict(self) -> dict:
        return {"counts": list(self.counts), "sum": round(self.sum, 6)}


class OpLatency:
    """One histogram per kind of request: reads, writes, and the others (flush, discard,
    write zeroes, block status, cache)."""

    __slots__ = ("read", "write", "other")

    def __init__(self) -> None:
        self.read = LatencyHistogram()
        self.write = LatencyHistogram()
        self.other = LatencyHistogram()

    def as_dict(self) -> dict:
        return {"le": list(BOUNDS), "read": self.read.as_dict(),
                "write": self.write.as_dict(), "other": self.other.as_dict()}
