"""What the torture writers share: the event lines they print and the random choice of
their requests (sizes, places, which are bare flushes, which writes are made durable at
once), so that every transport is tortured with the same mix and the harness's model
(:mod:`model`) reads every writer's lines alike.

Standard library and :mod:`model` only: :mod:`writer` runs under the system Python.
"""

from __future__ import annotations

import random
import sys
from typing import TextIO

from model import SECTOR

FLUSH_CHANCE = 0.06  # a request is a bare flush
DURABLE_CHANCE = 0.15  # a write is made durable at once (FUA, or a flush right after it)
MAX_WRITE = 128 * 1024
# Write sizes in sectors, the last drawn at random up to MAX_WRITE: single sectors (torn
# writes show there first), a page, odd sizes that straddle pages, and large ones.
SIZES = (1, 1, 2, 7, 8, 16, 64)


class Events:
    """Prints one event line and flushes it at once: the harness must see every line
    written before the writer is killed."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, *words: object) -> None:
        self.out.write(" ".join(map(str, words)) + "\n")
        self.out.flush()


class WritePlan:
    """Random writes into a region, none overlapping a write still in flight (so that
    the versions of each sector are ordered)."""

    def __init__(self, seed: int, offset: int, length: int, max_write: int = MAX_WRITE) -> None:
        self.rng = random.Random(seed)
        self.offset = offset
        self.sectors = length // SECTOR
        self.max_sectors = max_write // SECTOR
        self.busy: list[tuple[int, int]] = []  # byte ranges of the writes in flight

    def flush_next(self) -> bool:
        return self.rng.random() < FLUSH_CHANCE

    def durable_next(self) -> bool:
        return self.rng.random() < DURABLE_CHANCE

    def next_span(self, limit: int | None = None) -> tuple[int, int] | None:
        """The byte range of the next write (at most ``limit`` sectors), now in flight;
        None when it would overlap one in flight: the writer then waits for completions
        before it draws again."""
        rng = self.rng
        count = rng.choice(SIZES + (rng.randint(1, self.max_sectors),))
        count = min(count, self.sectors, limit or self.max_sectors)
        start = rng.randrange(0, self.sectors - count + 1)
        a = self.offset + start * SECTOR
        b = a + count * SECTOR
        if any(a < e and s < b for s, e in self.busy):
            return None
        self.busy.append((a, b))
        return a, b

    def finished(self, span: tuple[int, int]) -> None:
        self.busy.remove(span)
