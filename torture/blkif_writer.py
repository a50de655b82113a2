"""A torture writer over the Xen ring, without Xen: our tapdisk (the ``Tapdisk`` of the
daemon, opening the image as XENBLKIF_CONNECT's OPEN does) serves a blkif ring to a
stand-in guest (:mod:`xen_guest`: ring and granted pages in this process's memory, a pipe
for the event channel) whose blkfront writes at random in the same process.

    python blkif_writer.py SPEC RUNDIR SEED REGION_OFFSET REGION_LENGTH
                           [--depth N] [--seconds S] [--order N] [--abi 64|32]

The harness kill -9s this whole process (backend and guest die together, as dom0's
tapdisk and a guest's view of it end at once) and judges the image against the event
lines printed here, each written and flushed the moment the guest sees the response and
before it goes on: :mod:`writer`'s ``S``/``A``/``E``/``FS``/``FA``/``FE``/``X``, and ``R``
once the ring is connected. Operations, as a Linux blkfront uses them: WRITE (direct, or
INDIRECT past 11 segments); FLUSH_DISKCACHE and WRITE_BARRIER, without data (a flush) or
with data (15% of the writes: the write, then a flush, which makes it durable with
whatever was acknowledged before it was sent, as a FUA write plus a flush in the model).
Segments start anywhere in their page. Writes in flight never overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from blktap.control.message import Blkif  # noqa: E402
from blktap.daemon.tapdisk import OpenParams, Tapdisk  # noqa: E402
from model import SECTOR, write_bytes  # noqa: E402
from plan import Events, WritePlan  # noqa: E402
from xen_guest import (  # noqa: E402
    OKAY,
    OP_BARRIER,
    OP_FLUSH,
    OP_WRITE,
    PAGE,
    SEG,
    X32,
    X64,
    Devices,
    Guest,
)

DIRECT_SEGMENTS = 11
SECTORS_PER_PAGE = PAGE // SECTOR


def segments(guest: Guest, data: bytes, first: int) -> list[tuple[int, int, int]]:
    """Grant ``data`` in pages, the first part starting at sector ``first`` of its page:
    (gref, first_sect, last_sect) per page."""
    out = []
    pos, sect = 0, first
    while pos < len(data):
        n = min(len(data) - pos, (SECTORS_PER_PAGE - sect) * SECTOR)
        page = bytes(sect * SECTOR) + data[pos:pos + n]
        out.append((guest.grant(page), sect, sect + n // SECTOR - 1))
        pos += n
        sect = 0
    return out


async def run(args: argparse.Namespace) -> None:
    say = Events()
    plan = WritePlan(args.seed, args.offset, args.length)
    rng = plan.rng  # (segment placement and opcodes: one stream, one seed)

    guest = Guest(X64 if args.abi == 64 else X32, order=args.order, domid=7)
    os.makedirs(args.rundir, exist_ok=True)
    td = Tapdisk(args.rundir, threads=4, xen=Devices(guest))
    await td.attach(0, hold=False)
    await td.open(0, OpenParams(args.spec))
    refs = tuple(guest.ring_grefs) + (0,) * (16 - len(guest.ring_grefs))
    await td.xen_connect(0, Blkif(guest.domid, 51712, refs, args.order, guest.L.proto,
                                  "torture", 9))
    say("R")
    depth = min(args.depth, guest.size)
    inflight: dict[int, tuple[list[str], tuple[int, int] | None, list[int]]] = {}
    seq, flush_id, rid = 1, 0, 0
    deadline = time.monotonic() + args.seconds

    while time.monotonic() < deadline or inflight:
        pushed = False
        while time.monotonic() < deadline and len(inflight) < depth:
            rid += 1
            if plan.flush_next():  # a flush: FLUSH_DISKCACHE or a barrier, no data
                flush_id += 1
                op = rng.choice((OP_FLUSH, OP_BARRIER))
                say("FS", flush_id)
                guest.put_rw(op, rid, 0, [])
                inflight[rid] = ([f"FA {flush_id}"], None, [])
                pushed = True
                continue
            durable = plan.durable_next()
            # (a write with a flush goes direct: at most 11 segments, starting anywhere)
            span = plan.next_span((DIRECT_SEGMENTS - 1) * SECTORS_PER_PAGE if durable else None)
            if span is None:
                rid -= 1
                break
            a, b = span
            segs = segments(guest, write_bytes(args.seed, seq, a, b - a),
                            rng.randrange(SECTORS_PER_PAGE))
            grefs = [g for g, _, _ in segs]
            say("S", seq, a, b - a, int(durable))
            done = [f"A {seq}"]
            if durable:  # the write, then a flush (FLUSH_DISKCACHE or barrier with data)
                flush_id += 1
                say("FS", flush_id)
                done.append(f"FA {flush_id}")
                guest.put_rw(rng.choice((OP_FLUSH, OP_BARRIER)), rid, a // SECTOR, segs)
            elif len(segs) <= DIRECT_SEGMENTS and rng.random() < 0.8:
                guest.put_rw(OP_WRITE, rid, a // SECTOR, segs)
            else:  # indirect: the segment list in a granted page of its own
                table = guest.grant(b"".join(SEG.pack(*s) for s in segs))
                grefs.append(table)
                guest.put_indirect(OP_WRITE, rid, a // SECTOR, len(segs), [table])
            inflight[rid] = (done, span, grefs)
            seq += 1
            pushed = True
        if pushed:
            guest.push()
        if not inflight:
            break
        await asyncio.sleep(0.0005)
        for r, _op, status in guest.responses():
            done, span, grefs = inflight.pop(r)
            for line in done:
                if status == OKAY:
                    say(line)
                else:  # A seq -> E seq status, FA id -> FE id
                    say("E" if line[0] == "A" else "FE", line.split()[1], status)
            if span is not None:
                plan.finished(span)
            for g in grefs:
                guest.pages.pop(g, None)
    say("X", "done", 0)
    await td.shutdown()
    guest.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("rundir")
    ap.add_argument("seed", type=int)
    ap.add_argument("offset", type=int)
    ap.add_argument("length", type=int)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--order", type=int, default=0)
    ap.add_argument("--abi", type=int, choices=(32, 64), default=64)
    asyncio.run(run(ap.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
