"""The rate group's wire format (ours; td-rated's idea, not its bytes).

A valve connects to the group's UNIX stream socket and sends, whenever what it waits for
changes, a :data:`REPORT`: ``need`` (bytes its held requests still lack credit for, a
level, not an increment) and ``done`` (credit it hands back unused: when it closes or is
paused). The daemon sends :data:`GRANT` words: bytes of credit, added to what the valve
holds. Little-endian unsigned 64-bit integers.
"""

from __future__ import annotations

import struct

REPORT = struct.Struct("<QQ")  # need, done
GRANT = struct.Struct("<Q")  # credit
MAX_VALUE = (1 << 63) - 1  # larger reports are refused (the peer is broken)
