"""Per-disk counters, in the units ``tap-ctl stats`` reports (sectors of 512 bytes)."""

from __future__ import annotations

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
