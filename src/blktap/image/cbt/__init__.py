"""Changed-block tracking logs (cbt-util's files): the layout (structs), reading,
creating, growing and coalescing them (log), and runs of changed blocks (bits).
docs/cbt.md."""

from blktap.image.cbt.bits import bit_string, changed_extents, runs
from blktap.image.cbt.log import (
    check_size,
    coalesce,
    create,
    grow_fd,
    read_bitmap_fd,
    read_header,
    read_header_fd,
    read_log,
    update,
)
from blktap.image.cbt.structs import (
    BLOCK,
    HEADER,
    HEADER_SIZE,
    MAX_SIZE,
    NIL,
    LogHeader,
    bitmap_size,
    blocks,
)

__all__ = ["BLOCK", "HEADER", "HEADER_SIZE", "MAX_SIZE", "NIL", "LogHeader", "bit_string",
           "bitmap_size", "blocks", "changed_extents", "check_size", "coalesce", "create",
           "grow_fd", "read_bitmap_fd", "read_header", "read_header_fd", "read_log", "runs",
           "update"]
