"""Inflight I/O tracking (PROTOCOL_F_INFLIGHT_SHMFD) for split virtqueues.

The front-end keeps a shared memory region for us across our restarts: if tapdisk is
killed with requests in flight, the next instance finds which chains the guest is still
waiting for, and submits them again, so nothing the guest issued is lost or completed
twice. Layout (the vhost-user spec's, one region per queue, each 64-byte aligned):

    QueueRegionSplit: le64 features, le16 version (1), le16 desc_num,
                      le16 last_batch_head, le16 used_idx, then desc_num DescStateSplit
    DescStateSplit:   u8 inflight, u8 padding[5], le16 next, le64 counter

Per chain: taken from the avail ring -> counter, inflight = 1; returned -> linked into
the last batch (next, last_batch_head); batch published (used idx written) -> inflight
= 0 for the batch, used_idx = used idx. On reconnect: if used_idx differs from the used
ring's idx the last batch was published but not cleared, so it is cleared now; the
chains still marked are resubmitted in counter order, and the next avail index is the
used index plus their number.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from typing import TYPE_CHECKING

from blktap.errors import BlktapError

if TYPE_CHECKING:
    from blktap.transport.vhost_user.virtqueue import Virtqueue

log = logging.getLogger("blktap.vhost")

QUEUE_HEADER = struct.Struct("<QHHHH")
DESC_STATE = struct.Struct("<B5xHQ")
VERSION = 1
ALIGN = 64


def queue_region_size(queue_size: int) -> int:
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGN - 1) // ALIGN * ALIGN


class InflightQueue:
    """One queue's part of the region."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.size = queue_size
        self.counter = 0
        self.batch: list[int] = []
        self.last_batch_head = 0

    def _desc(self, head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def init(self) -> None:
        """A fresh region (version 0): ours to set up."""
        QUEUE_HEADER.pack_into(self.view, 0, 0, VERSION, self.size, 0, 0)

    def attach(self, vq: Virtqueue) -> list[int]:
        """The ring starts: put the region straight (see the module doc), set the
        queue's next avail index, return the heads to submit again, oldest first."""
        view = self.view
        _, version, desc_num, last_batch_head, used_idx = QUEUE_HEADER.unpack_from(view)
        if version == 0:
            self.init()
            return []
        if version != VERSION or desc_num != vq.num:
            log.warning("%s: inflight region of version %d for %d descriptors (the ring "
                        "has %d): not used", vq.name, version, desc_num, vq.num)
            vq.inflight = None
            return []
        used = vq.used_idx
        pending = (used - used_idx) & 0xFFFF
        if pending:
            if pending > desc_num:
                log.warning("%s: inflight region's used index %d is %d behind the ring's",
                            vq.name, used_idx, pending)
                pending = desc_num
            head = last_batch_head
            for _ in range(pending):
                if head >= desc_num:
                    break
                off = self._desc(head)
                view[off] = 0
                (head,) = struct.unpack_from("<H", view, off + 6)
            struct.pack_into("<H", view, 14, used)
        heads: list[tuple[int, int]] = []
        top = 0
        for i in range(desc_num):
            flag, _, counter = DESC_STATE.unpack_from(view, self._desc(i))
            if flag:
                heads.append((counter, i))
            top = max(top, counter)
        heads.sort()
        self.counter = top + 1
        self.last_batch_head = last_batch_head
        self.batch.clear()
        vq.last_avail = (used + len(heads)) & 0xFFFF
        if heads:
            log.warning("%s: %d request%s in flight when the last back-end stopped: "
                        "submitting again", vq.name, len(heads),
                        "s were" if len(heads) > 1 else " was")
        return [h for _, h in heads]

    def start(self, head: int) -> None:
        off = self._desc(head)
        struct.pack_into("<Q", self.view, off + 8, self.counter)
        self.counter += 1
        self.view[off] = 1

    def end(self, head: int) -> None:
        struct.pack_into("<H", self.view, self._desc(head) + 6, self.last_batch_head)
        self.last_batch_head = head
        struct.pack_into("<H", self.view, 12, head)
        self.batch.append(head)

    def published(self, used_idx: int) -> None:
        view = self.view
        for head in self.batch:
            view[self._desc(head)] = 0
        self.batch.clear()
        struct.pack_into("<H", view, 14, used_idx)


class InflightRegion:
    """The whole shared region: one :class:`InflightQueue` per queue."""

    def __init__(self, mem: mmap.mmap, offset: int, size: int, num_queues: int,
                 queue_size: int, fd: int = -1) -> None:
        self.mem = mem
        self.fd = fd
        self.size = size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.view = memoryview(mem)[offset : offset + size]
        step = queue_region_size(queue_size)
        self.queues = [InflightQueue(self.view[i * step : (i + 1) * step], queue_size)
                       for i in range(num_queues)]

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightRegion:
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("blktap-vhost-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        region = cls(mem, 0, size, num_queues, queue_size, fd)
        for q in region.queues:
            q.init()
        return region

    @classmethod
    def open(cls, fd: int, size: int, offset: int, num_queues: int,
             queue_size: int) -> InflightRegion:
        """Map a region the front-end hands back (the fd stays the caller's)."""
        if not 0 < num_queues <= 256 or not 0 < queue_size <= 32768:
            raise BlktapError(f"{num_queues} queues of {queue_size}", errno.EINVAL)
        if size < num_queues * queue_region_size(queue_size) or size > 1 << 30:
            raise BlktapError(f"a region of {size} bytes for {num_queues} queues of "
                              f"{queue_size}", errno.EINVAL)
        try:
            mem = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise BlktapError(f"cannot map the inflight region: {exc}", errno.EINVAL) \
                from None
        return cls(mem, offset, size, num_queues, queue_size)

    def queue(self, index: int) -> InflightQueue | None:
        return self.queues[index] if index < len(self.queues) else None

    def close(self) -> None:
        for q in self.queues:
            q.view.release()
        self.view.release()
        try:
            self.mem.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
