"""The back end of a blkif shared ring (``xen/include/public/io/ring.h``).

The frontend produces requests (``req_prod``) and we consume them (``req_cons``, ours);
we produce responses (``rsp_prod_pvt``, published as ``rsp_prod``). The discipline:

- read ``req_prod``, then the slots before it (each slot is copied out once and decoded
  from the copy: the guest can rewrite the page at any time);
- write the responses, then publish ``rsp_prod`` (stores stay in order on x86, so no
  fence is needed between them); then, after a full barrier, compare with ``rsp_event``
  to know whether the frontend asked to be notified (PUSH_RESPONSES_AND_CHECK_NOTIFY);
- before sleeping, set ``req_event = req_cons + 1`` and, after a full barrier, look at
  ``req_prod`` again (FINAL_CHECK_FOR_REQUESTS), so that a request queued meanwhile is
  not left waiting for an event that will never come.

A frontend may never have more than the ring's size outstanding: a ``req_prod`` more
than that past our oldest unanswered request (RING_REQUEST_PROD_OVERFLOW) is a corrupt or
hostile ring, reported as :class:`RingCorrupt`; the caller disconnects that ring only.
Indices are free-running u32 and compared modulo 2**32.
"""

from __future__ import annotations

import threading

from blktap.errors import BlktapError
from blktap.transport.xen.structs import (
    INDEX,
    REQ_EVENT,
    REQ_PROD,
    RING_HEADER,
    RSP_EVENT,
    RSP_PROD,
    Abi,
    Request,
    parse_request,
    ring_size,
)

MASK = 0xFFFFFFFF

_fence_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (xen_mb): the store before it is visible before the load
    after it. Python has no fence of its own; taking and releasing a lock executes an
    atomic read-modify-write (a ``lock``-prefixed instruction on x86), which orders
    every earlier store before every later load."""
    _fence_lock.acquire()
    _fence_lock.release()


class RingCorrupt(BlktapError):
    """The frontend broke the ring's invariants; the ring cannot be trusted any more."""


class BackRing:
    """Our half of one shared ring laid out in ``mem`` (``1 << order`` pages)."""

    def __init__(self, mem: memoryview, abi: Abi, order: int) -> None:
        self.mem = mem
        self.abi = abi
        self.size = ring_size(abi, order)
        if len(mem) < RING_HEADER + self.size * abi.slot:
            raise ValueError(f"{len(mem)} bytes cannot hold a ring of {self.size} slots")
        self.req_cons = 0
        self.rsp_prod_pvt = 0
        # The frontend initialises the ring (SHARED_RING_INIT) before it hands the grant
        # over; we attach at its current indices, as BACK_RING_INIT does at 0: a fresh
        # ring has req_prod == rsp_prod == 0.
        self._published = 0  # rsp_prod as we last wrote it (the guest's copy may lie)
        self.requests = 0  # consumed so far
        self.responses = 0  # published so far
        self.notifications = 0  # times the frontend asked to be told

    # ------------------------------------------------------------------ indices
    def _get(self, offset: int) -> int:
        return INDEX.unpack_from(self.mem, offset)[0]

    def _put(self, offset: int, value: int) -> None:
        INDEX.pack_into(self.mem, offset, value & MASK)

    @property
    def outstanding(self) -> int:
        """Requests consumed and not answered yet."""
        return (self.req_cons - self.rsp_prod_pvt) & MASK

    def unconsumed(self) -> int:
        """Requests waiting in the ring (RING_HAS_UNCONSUMED_REQUESTS), after checking
        that the producer index is sane."""
        prod = self._get(REQ_PROD)
        waiting = (prod - self.req_cons) & MASK
        # More than the free slots: req_prod ran past the ring's size from the oldest
        # unanswered request (RING_REQUEST_PROD_OVERFLOW), or went backwards (which reads
        # as nearly 2**32 waiting).
        if waiting > self.size - self.outstanding:
            raise RingCorrupt(f"req_prod {prod} is not within {self.size} requests of the "
                              f"oldest unanswered one ({self.rsp_prod_pvt}; req_cons "
                              f"{self.req_cons})")
        return waiting

    # ------------------------------------------------------------------ requests
    def take(self, limit: int | None = None) -> list[Request]:
        """Consume the requests the frontend has published (at most ``limit``)."""
        n = self.unconsumed()
        if limit is not None:
            n = min(n, limit)
        # (The slots are read after req_prod: loads are not reordered with loads on x86.)
        out = []
        abi, mem, size = self.abi, self.mem, self.size
        for _ in range(n):
            off = RING_HEADER + (self.req_cons & (size - 1)) * abi.slot
            out.append(parse_request(abi, bytes(mem[off:off + abi.slot])))
            self.req_cons = (self.req_cons + 1) & MASK
        self.requests += n
        return out

    def final_check(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting; otherwise ask
        for an event on the next one, and look once more."""
        if self.unconsumed():
            return True
        self._put(REQ_EVENT, self.req_cons + 1)
        full_barrier()
        return bool(self.unconsumed())

    def advance(self, req_cons: int, rsp_prod_pvt: int, published: int,
                notified: bool) -> int:
        """Take over the indices a compiled pass (``blkif_pump``) left: it consumed and
        answered requests, published responses (``notified``: the frontend asked for an
        event for them) and maybe asked for an event on the next request. How many it
        consumed."""
        consumed = (req_cons - self.req_cons) & MASK
        self.req_cons = req_cons
        self.rsp_prod_pvt = rsp_prod_pvt
        self.requests += consumed
        self.responses += (published - self._published) & MASK
        self._published = published
        if notified:
            self.notifications += 1
        return consumed

    @property
    def published(self) -> int:
        """``rsp_prod`` as we last wrote it."""
        return self._published

    # ------------------------------------------------------------------ responses
    def put_response(self, rid: int, op: int, status: int) -> None:
        """Write one response into the next slot (published by :meth:`push`)."""
        if not self.outstanding:
            raise RingCorrupt("a response with no request outstanding")
        off = RING_HEADER + (self.rsp_prod_pvt & (self.size - 1)) * self.abi.slot
        self.abi.response.pack_into(self.mem, off, rid, op, status)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK

    def push(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish the responses written; True if
        the frontend wants an event for them."""
        old = self._published
        new = self.rsp_prod_pvt
        if old == new:
            return False
        self._put(RSP_PROD, new)  # after the response slots: stores stay in order
        self._published = new
        full_barrier()
        self.responses += (new - old) & MASK
        notify = ((new - self._get(RSP_EVENT)) & MASK) < ((new - old) & MASK)
        if notify:
            self.notifications += 1
        return notify


__all__ = ["BackRing", "RingCorrupt", "full_barrier"]
