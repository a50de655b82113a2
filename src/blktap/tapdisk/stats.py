"""Per-disk counters, in the units ``tap-ctl stats`` reports (sectors of 512 bytes)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class VbdStats:
    read_reqs: int = 0  # requests completed
    write_reqs: int = 0
    read_sectors: int = 0
    write_sectors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    other_reqs: int = 0  # flush, discard, write zeroes, block status, cache
    other_errors: int = 0
    retries: int = 0
    merged: int = 0  # requests that rode along in another's system call
    cancelled: int = 0  # withdrawn by their caller (a client gone) before completing
    submitted: int = 0
    in_flight: int = 0
    timeouts: int = 0
    watchdog_stalls: int = 0

    @property
    def errors(self) -> int:
        return self.read_errors + self.write_errors + self.other_errors

    def as_dict(self) -> dict:
        out = asdict(self)
        out["errors"] = self.errors
        return out


def format_stats(value: object) -> str:
    """JSON in the layout of the reference's stats writer (``tapdisk-stats.c``):
    ``{ "k": v, "k2": v2 }`` and ``[ 1, 2 ]``, spaces inside the brackets (so an empty
    one is ``[  ]``), ", " between items, on one line. sm reads it with ``json.loads``;
    people read it too."""
    if isinstance(value, dict):
        if not value:
            return "{  }"
        return "{ " + ", ".join(f"{json.dumps(str(k))}: {format_stats(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        if not value:
            return "[  ]"
        return "[ " + ", ".join(format_stats(v) for v in value) + " ]"
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps(value)
    raise TypeError(f"cannot format {type(value).__name__} as stats")
