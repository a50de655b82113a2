"""The byte-exact model of what a crashed server must still hold.

Every 512-byte sector a torture writer puts on the disk names itself: a magic, the write's
sequence number, the sector's number and the trial's seed, then filler derived from those.
After a kill -9 each sector of the region is read back and must be, byte for byte, one of
the versions the model allows:

- the newest *durable* version (a write acknowledged before a flush that completed, or a
  write acknowledged with FUA), or any version written after it (acknowledged or not: a
  write in flight may or may not have landed);
- with no durable version yet: the initial content or any version written.

Anything else is a failure: a *lost* write (an older version, or the initial content, where
a durable write existed), a *torn* sector (the bytes match no version: a partial write) or a
*misplaced* one (a valid pattern naming another sector). Writers never have two writes in
flight that overlap, so each sector's versions are ordered by their sequence numbers.

Standard library only: the writer runs under the system Python (libnbd's binding).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

SECTOR = 512
MAGIC = b"BLKTORT1"
# magic, seed, seq, sector; then filler to 512 bytes
HEAD = struct.Struct("<8sQQQ")
INITIAL = 0  # the sequence number of "what the region held before the trial"


def sector_bytes(seed: int, seq: int, sector: int) -> bytes:
    """The 512 bytes write ``seq`` of trial ``seed`` puts at ``sector``."""
    head = HEAD.pack(MAGIC, seed, seq, sector)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return head + fill * ((SECTOR - HEAD.size) // 64) + fill[: (SECTOR - HEAD.size) % 64]


def write_bytes(seed: int, seq: int, offset: int, length: int) -> bytes:
    first = offset // SECTOR
    return b"".join(sector_bytes(seed, seq, first + i) for i in range(length // SECTOR))


def identify(raw: bytes | memoryview, seed: int) -> tuple[int, int] | None:
    """(seq, sector) a sector's bytes claim to be, if they are an intact pattern of this
    trial; None for anything else (zeros, another trial, torn bytes)."""
    if len(raw) != SECTOR or bytes(raw[:8]) != MAGIC:
        return None
    _, rseed, seq, sector = HEAD.unpack_from(raw)
    if rseed != seed or bytes(raw) != sector_bytes(seed, seq, sector):
        return None
    return seq, sector


@dataclass
class Write:
    seq: int
    offset: int
    length: int
    fua: bool
    acked: bool = False
    failed: bool = False


@dataclass
class Model:
    """Built from a writer's event lines; answers what each sector may hold."""

    seed: int
    writes: dict[int, Write] = field(default_factory=dict)
    # Per sector: the sequence numbers that wrote it, in order.
    versions: dict[int, list[int]] = field(default_factory=dict)
    # Per sector: the newest durable sequence number.
    durable: dict[int, int] = field(default_factory=dict)
    flushes_done: int = 0
    made_durable: set[int] = field(default_factory=set)  # writes a flush or FUA made durable
    _acked_since: list[int] = field(default_factory=list)  # acked, not yet covered by a flush
    _pending_flush: dict[int, list[int]] = field(default_factory=dict)

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            kind, args = parts[0], [int(x) for x in parts[1:] if x.lstrip("-").isdigit()]
            if kind == "S":
                seq, offset, length, fua = args
                w = self.writes[seq] = Write(seq, offset, length, bool(fua))
                for s in range(offset // SECTOR, (offset + length) // SECTOR):
                    self.versions.setdefault(s, []).append(seq)
                del w
            elif kind == "A":
                w = self.writes[args[0]]
                w.acked = True
                if w.fua:
                    self._make_durable([w.seq])
                else:
                    self._acked_since.append(w.seq)
            elif kind == "E":
                self.writes[args[0]].failed = True
            elif kind == "FS":  # a flush covers what was acknowledged when it was sent
                self._pending_flush[args[0]] = self._acked_since
                self._acked_since = []
            elif kind == "FA":
                self._make_durable(self._pending_flush.pop(args[0], []))
                self.flushes_done += 1
            elif kind == "FE":  # a failed flush makes nothing durable
                self._acked_since = self._pending_flush.pop(args[0], []) + self._acked_since

    def _make_durable(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.made_durable.add(seq)
            w = self.writes[seq]
            for s in range(w.offset // SECTOR, (w.offset + w.length) // SECTOR):
                if self.durable.get(s, INITIAL) < seq:
                    self.durable[s] = seq

    @property
    def durable_writes(self) -> int:
        return len(self.made_durable)

    def allowed(self, sector: int) -> list[int]:
        """The sequence numbers this sector may hold (INITIAL: the initial content)."""
        versions = self.versions.get(sector, [])
        floor = self.durable.get(sector, INITIAL)
        if floor == INITIAL:
            return [INITIAL, *versions]
        return [v for v in versions if v >= floor]


@dataclass
class Verdict:
    sectors: int = 0
    lost: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.torn or self.misplaced)

    def summary(self) -> str:
        parts = [f"{self.sectors} sectors checked"]
        for name in ("lost", "torn", "misplaced"):
            items = getattr(self, name)
            if items:
                parts.append(f"{len(items)} {name} (first: {items[0]})")
        return ", ".join(parts)


def verify(model: Model, region_offset: int, data: bytes | memoryview,
           initial: bytes | memoryview) -> Verdict:
    """Judge ``data`` (the region as read after the crash) against the model;
    ``initial`` is what the region held before the trial (same length)."""
    verdict = Verdict()
    first = region_offset // SECTOR
    view, init = memoryview(data), memoryview(initial)
    for i in range(len(view) // SECTOR):
        sector = first + i
        raw = view[i * SECTOR:(i + 1) * SECTOR]
        allowed = model.allowed(sector)
        verdict.sectors += 1
        if raw == init[i * SECTOR:(i + 1) * SECTOR]:
            if INITIAL in allowed:
                continue
            verdict.lost.append(f"sector {sector} holds its initial content; durable write "
                                f"{model.durable[sector]} lost")
            continue
        found = identify(raw, model.seed)
        if found is None:
            verdict.torn.append(f"sector {sector} matches no version")
            continue
        seq, named = found
        if named != sector:
            verdict.misplaced.append(f"sector {sector} holds write {seq}'s sector {named}")
        elif seq not in allowed:
            why = (f"durable write {model.durable[sector]} lost" if sector in model.durable
                   else "never written there")
            verdict.lost.append(f"sector {sector} holds write {seq}: {why}")
    return verdict
