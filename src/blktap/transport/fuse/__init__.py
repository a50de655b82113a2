"""FUSE: one disk as one regular file (``blktap serve --fuse FILE``); see docs/attach.md."""

from blktap.transport.fuse.mount import FuseUnavailable
from blktap.transport.fuse.server import FuseServer

__all__ = ["FuseServer", "FuseUnavailable"]
