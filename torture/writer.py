"""A torture writer: random writes with FUA and flushes over NBD, many in flight.

Runs under the system Python, whose libnbd binding (python3-libnbd) is the real peer:

    python3 writer.py URI SEED REGION_OFFSET REGION_LENGTH [--depth N] [--seconds S]

It prints one line per event, flushed at once, for the harness to build its model
(:mod:`model`): ``S seq offset length fua`` when a write is sent, ``A seq`` when it is
acknowledged, ``E seq errno`` when it fails, ``FS id`` / ``FA id`` / ``FE id`` for a flush
sent / acknowledged / failed, and ``X reason`` when the connection is gone (the server was
killed). Writes in flight never overlap, so the order of each sector's versions is known.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbd  # noqa: E402  (python3-libnbd, system Python)

from model import write_bytes  # noqa: E402
from plan import Events, WritePlan  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("seed", type=int)
    ap.add_argument("offset", type=int)
    ap.add_argument("length", type=int)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--first-seq", type=int, default=1)
    args = ap.parse_args()
    say = Events()
    plan = WritePlan(args.seed, args.offset, args.length)

    h = nbd.NBD()
    try:
        h.connect_uri(args.uri)
    except nbd.Error as exc:
        say("X", "connect", exc.errno or 0)
        return 0
    inflight: dict[int, tuple[str, int, tuple[int, int] | None]] = {}  # cookie -> what
    seq = args.first_seq
    flush_id = 0
    deadline = time.monotonic() + args.seconds

    try:
        while time.monotonic() < deadline or inflight:
            while time.monotonic() < deadline and len(inflight) < args.depth:
                if plan.flush_next():
                    flush_id += 1
                    say("FS", flush_id)
                    inflight[h.aio_flush()] = ("F", flush_id, None)
                    continue
                span = plan.next_span()
                if span is None:
                    break
                a, b = span
                fua = plan.durable_next()
                say("S", seq, a, b - a, int(fua))
                buf = nbd.Buffer.from_bytearray(bytearray(write_bytes(args.seed, seq, a, b - a)))
                cookie = h.aio_pwrite(buf, a, flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[cookie] = ("W", seq, span)
                seq += 1
            if not inflight:
                break
            h.poll(-1)
            while inflight and (cookie := h.aio_peek_command_completed()) != 0:
                kind, ident, span = inflight.pop(cookie)
                try:
                    h.aio_command_completed(cookie)
                    say("A" if kind == "W" else "FA", ident)
                except nbd.Error as exc:
                    say("E" if kind == "W" else "FE", ident, exc.errno or 0)
                if span is not None:
                    plan.finished(span)
    except nbd.Error as exc:
        say("X", "error", exc.errno or 0)
        return 0
    try:
        h.shutdown()
    except nbd.Error:
        pass
    say("X", "done", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
