"""A torture writer over vhost-user: a virtio-blk driver (:mod:`vhost_user_frontend`) with
random writes and flushes in flight, against a server to be killed.

    python vhost_writer.py SOCKET SEED REGION_OFFSET REGION_LENGTH [--depth N] [--seconds S]

Its event lines are :mod:`writer`'s (``S seq offset length fua``, ``A seq``, ``E seq
status``, ``FS id`` / ``FA id`` / ``FE id``, ``X reason``), each printed and flushed before
the driver goes on, so the harness's model (:mod:`model`) sees every acknowledgement the
guest saw. virtio-blk has no FUA: a write the guest wants durable is followed, once it has
completed, by a flush (15% of the writes), and flushes also come at random (6%). A
completion counts once the device put it in the used ring; after the server's death the
used ring is read one last time (what the device completed before dying, the guest would
see too). Writes in flight never overlap.

Standard library and :mod:`vhost_user_frontend` only (the front-end is ours, not the
back-end's: it does not import blktap).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model import SECTOR, write_bytes  # noqa: E402
from plan import MAX_WRITE, Events, WritePlan  # noqa: E402
from vhost_user_frontend import (  # noqa: E402
    OUTHDR,
    S_OK,
    T_FLUSH,
    T_OUT,
    BlkClient,
    Buf,
    Dropped,
)


class Slot:
    """The guest memory of one request in flight: header, data, status."""

    def __init__(self, client: BlkClient) -> None:
        self.header = client.mem.alloc(OUTHDR.size, align=16)
        self.data: Buf = client.mem.alloc(MAX_WRITE, align=SECTOR)
        self.status = client.mem.alloc(1)
        self.what: tuple[str, int, tuple[int, int] | None] = ("", 0, None)
        self.fua = False  # a write to follow with a flush once it has completed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("seed", type=int)
    ap.add_argument("offset", type=int)
    ap.add_argument("length", type=int)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    say = Events()
    plan = WritePlan(args.seed, args.offset, args.length)

    try:
        client = BlkClient(args.socket, queue_size=64, mem_size=8 << 20).connect()
    except (OSError, Dropped, AssertionError) as exc:
        say("X", "connect", getattr(exc, "errno", 0) or 0)
        return 0
    q = client.queues[0]
    free = [Slot(client) for _ in range(args.depth)]
    inflight: dict[int, Slot] = {}  # head -> slot
    seq = 1
    flush_id = 0
    want_flush = False  # a "FUA" write completed: flush next
    deadline = time.monotonic() + args.seconds

    def submit_flush() -> None:
        nonlocal flush_id
        slot = free.pop()
        flush_id += 1
        slot.header.write(OUTHDR.pack(T_FLUSH, 0, 0))
        slot.status.write(b"\xff")
        slot.what = ("F", flush_id, None)
        say("FS", flush_id)
        head = q.add_chain([(slot.header.gpa, OUTHDR.size, False),
                            (slot.status.gpa, 1, True)])
        inflight[head] = slot
        q.publish([head])

    def complete() -> None:
        nonlocal want_flush
        for used in q.reap():
            slot = inflight.pop(used.head)
            kind, ident, span = slot.what
            ok = slot.status.read(1)[0] == S_OK
            if kind == "W":
                say("A" if ok else "E", ident, *(() if ok else (slot.status.read(1)[0],)))
                plan.finished(span)
                if ok and slot.fua:
                    want_flush = True
            else:
                say("FA" if ok else "FE", ident)
            free.append(slot)

    try:
        while time.monotonic() < deadline or inflight:
            while time.monotonic() < deadline and free:
                if want_flush or plan.flush_next():
                    want_flush = False
                    submit_flush()
                    continue
                span = plan.next_span()
                if span is None:
                    break
                a, b = span
                fua = plan.durable_next()
                slot = free.pop()
                slot.header.write(OUTHDR.pack(T_OUT, 0, a // SECTOR))
                slot.fua = fua
                slot.data.write(write_bytes(args.seed, seq, a, b - a))
                slot.status.write(b"\xff")
                slot.what = ("W", seq, span)
                say("S", seq, a, b - a, 0)
                head = q.add_chain([(slot.header.gpa, OUTHDR.size, False),
                                    (slot.data.gpa, b - a, False), (slot.status.gpa, 1, True)])
                inflight[head] = slot
                q.publish([head])
                seq += 1
            if not inflight:
                break
            r, _, _ = select.select([q.call_fd, client.fe.sock], [], [], 0.05)
            if q.call_fd in r:
                try:
                    os.eventfd_read(q.call_fd)
                except BlockingIOError:
                    pass
            complete()  # (also without a signal: the device may suppress them)
            if client.fe.sock in r and client.fe.eof():
                complete()  # what it finished before it died
                say("X", "error", 0)
                return 0
    except (Dropped, OSError) as exc:
        say("X", "error", getattr(exc, "errno", 0) or 0)
        return 0
    say("X", "done", 0)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
