"""The arithmetic of the benchmark's ratios: within each repetition a server's figure over
the reference's figure for the same workload (run back to back), then the median of those
per-repetition ratios with their spread. A ratio of medians would pair a fast repetition
of one server with a slow one of the other; this does not."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    min: float
    max: float
    q1: float  # quartiles (statistics.quantiles, inclusive); equal to min/max when n < 4
    q3: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def spread(values: list[float]) -> Spread | None:
    """Median, min-max and interquartile range of `values` (None when empty)."""
    if not values:
        return None
    vals = sorted(values)
    if len(vals) >= 4:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1, q3 = vals[0], vals[-1]
    return Spread(len(vals), statistics.median(vals), vals[0], vals[-1], q1, q3)


def paired_ratios(ours: dict[int, float], ref: dict[int, float],
                  invert: bool = False) -> list[float]:
    """Per repetition (the keys), ours / ref (ref / ours when `invert`, for latencies from
    rates); a repetition missing on either side, or with a zero figure, has no ratio."""
    out = []
    for rep in sorted(ours.keys() & ref.keys()):
        a, b = ours[rep], ref[rep]
        if a and b:
            out.append(b / a if invert else a / b)
    return out


def ratio_spread(ours: dict[int, float], ref: dict[int, float],
                 invert: bool = False) -> Spread | None:
    return spread(paired_ratios(ours, ref, invert))
