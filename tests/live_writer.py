"""A guest stand-in for the live-snapshot tests: writes a known pattern through an NBD
export, one 64 KiB write at a time, until a stop file appears.

Run with the system's python3 (the libnbd bindings live there):

    /usr/bin/python3 live_writer.py SOCKET LOG STOPFILE [BLOCKS]

Write ``i`` puts ``pattern(i)`` at block ``i % BLOCKS``; after each acknowledged write a
line ``i`` is appended to LOG (flushed), so the test knows which writes the client saw
complete. Any error is printed and the exit status is 1; a clean stop exits 0.
"""

from __future__ import annotations

import os
import sys
import time

BLOCK = 64 << 10


def pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * BLOCK


def main() -> int:
    import nbd  # type: ignore[import-not-found]

    sock, log_path, stop_path = sys.argv[1:4]
    blocks = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    h = nbd.NBD()
    h.connect_unix(sock)
    i = 0
    with open(log_path, "a", buffering=1) as log:
        try:
            while not os.path.exists(stop_path):
                h.pwrite(pattern(i), (i % blocks) * BLOCK)
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
