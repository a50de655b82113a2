"""A guest stand-in for the live storage migration test: writes a known pattern through
an NBD export, one 64 KiB write at a time, and moves to another export when told.

Run with the system's python3 (the libnbd bindings live there):

    /usr/bin/python3 migrating_writer.py SOCKET LOG STOPFILE SWITCHFILE [BLOCKS]

Write ``i`` puts ``pattern(i)`` (live_writer's) at block ``i % BLOCKS``; after each
acknowledged write a line ``i`` is appended to LOG. When SWITCHFILE appears (written
whole, by a rename) holding a socket path, the writer drops its connection, connects
there (then creates SWITCHFILE.done) and sends again the write it had in flight, which
was never acknowledged: the consumer's switch at the end of a migration (the source is
paused: that write is held there and never reaches its disk). It stops when STOPFILE
appears; any error prints a line and exits 1.
"""

from __future__ import annotations

import os
import sys
import time

from live_writer import BLOCK, pattern


def connect(sock: str):  # type: ignore[no-untyped-def]
    import nbd  # type: ignore[import-not-found]

    h = nbd.NBD()
    h.connect_unix(sock)
    return h


def main() -> int:
    import nbd  # type: ignore[import-not-found]

    sock, log_path, stop_path, switch_path = sys.argv[1:5]
    blocks = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    h = connect(sock)
    switched = False
    i = 0
    with open(log_path, "a", buffering=1) as log:
        try:
            while not os.path.exists(stop_path):
                buf = nbd.Buffer.from_bytearray(bytearray(pattern(i)))
                offset = (i % blocks) * BLOCK
                cookie = h.aio_pwrite(buf, offset)
                while not h.aio_command_completed(cookie):
                    if not switched and os.path.exists(switch_path):
                        with open(switch_path) as f:
                            target = f.read().strip()
                        switched = True
                        del h  # the write in flight was not acknowledged: send it again
                        h = connect(target)
                        print(f"switched to {target} at write {i}", file=sys.stderr)
                        with open(switch_path + ".done", "w"):
                            pass
                        cookie = h.aio_pwrite(buf, offset)
                        continue
                    h.poll(100)
                log.write(f"{i}\n")
                log.flush()
                i += 1
                time.sleep(0.002)
            h.flush()
        except nbd.Error as exc:
            print(f"write {i} failed: {exc}", file=sys.stderr)
            return 1
    h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
