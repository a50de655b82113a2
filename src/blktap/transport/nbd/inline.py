"""The compiled inline path of the NBD transport (``_inline.c``), when it was built.

At QD1 a request served by the Python side door costs about a hundred Python calls
(parse, validate, admit, VBD.read_now, the driver, the engine, the reply, the send
queue) for two system calls' worth of work; the compiled pass does the same for the
requests the disk can serve at once, in one call per batch. It takes only what the
Python path would serve the same way and stops at anything else, so the Python path
stays the reference: every error, flag and policy is decided there.

The extension is optional: ``pip install`` builds it where a C compiler and Python's
headers are present and goes on without it where they are not. ``BLKTAP_INLINE=0`` in
the environment turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import os
from collections.abc import Callable

# Replies gathered before they are sent (a read's data travels in it): one buffer per
# loop thread, big enough for a batch of small reads or one large one.
SCRATCH_BYTES = (1 << 20) + (64 << 10)
# The largest request the compiled path takes (larger ones gain nothing from it).
MAX_LENGTH = 1 << 20

# A connection's requests in flight through the compiled pass to a disk that answers
# later (AsyncPass), and the bytes their buffers may hold together: beyond, the Python
# path takes them.
ASYNC_SLOTS = 64
ASYNC_BYTES = 8 << 20

Pump = Callable[..., tuple[int, int, int, int, int, int, int, int, int]]

try:
    from blktap.transport.nbd import _inline
except ImportError:  # not built (no compiler at install time)
    _inline = None  # type: ignore[assignment]


def turned_off() -> bool:
    """Whether ``BLKTAP_INLINE=0`` turns the compiled paths off (this pass and the
    handshake's, handshake.compiled_take)."""
    return os.environ.get("BLKTAP_INLINE", "1") == "0"


def compiled() -> Pump | None:
    """The compiled pass (``nbd_pump``), or None when it is not built or turned off."""
    if _inline is None or turned_off():
        return None
    return _inline.nbd_pump


def async_pass(on_done: Callable[[], None]) -> object | None:
    """A connection's compiled pass to a disk whose requests complete later
    (``_inline.AsyncPass``: an ``rbd`` disk), or None when the extension is not built."""
    if _inline is None:
        return None
    return _inline.AsyncPass(on_done, ASYNC_SLOTS, ASYNC_BYTES)


# Why a link was handed back (AsyncPass.unlink's reason): the stream ended or broke.
BACK_STREAM = 2 if _inline is None else _inline.BACK_STREAM


def links() -> bool:
    """Whether a connection to a disk that answers later may be served in the selector's
    wait (the pass linked to its socket: ``_inline_link.h``): the extension built with
    the wait's hooks, not turned off (``BLKTAP_INLINE=0``, or ``BLKTAP_INLINE_LINK=0``
    for this alone: to compare, or to rule it out)."""
    return (_inline is not None and bool(_inline.HOOKS) and not turned_off()
            and os.environ.get("BLKTAP_INLINE_LINK", "1") != "0")


def _reap_unbuilt(calls: tuple[int, ...], image: int, eventfd: int
                  ) -> tuple[list[tuple[int, int]], int]:
    raise RuntimeError("the compiled pass is not built")  # (no pass: never given)


# Given to the VBD with :meth:`VBD.inline_async`: the driver reaps its completions through
# it (``_inline.reap``, itself: one Python call less a completion; the passes' own are
# taken back there, the driver's returned).
reap_async: Callable[[tuple[int, ...], int, int], tuple[list[tuple[int, int]], int]] = (
    _reap_unbuilt if _inline is None else _inline.reap)


def available() -> bool:
    """Whether the extension was built (whatever the environment says)."""
    return _inline is not None
