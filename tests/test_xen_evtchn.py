"""EventChannel.clear against a stand-in descriptor: what fired is read and written back
(unmasked) in as few system calls as the device allows (each one goes through Xen in a
PV dom0)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from blktap.transport.xen import evtchn
from blktap.transport.xen.evtchn import EventChannel


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EventChannel, socket.socket,
                                                                  list[int]]]:
    """An EventChannel whose descriptor is one end of a socket pair (the device's queue of
    fired ports is what the other end sends; what clear() writes back arrives there), and
    the sizes of the reads clear() makes."""
    ours, device = socket.socketpair()
    ours.setblocking(False)
    ch = EventChannel.__new__(EventChannel)
    ch.fd = ours.fileno()
    ch.port = 7
    reads: list[int] = []
    real_read = os.read

    def counted(fd: int, n: int) -> bytes:
        if fd == ch.fd:
            reads.append(n)
        return real_read(fd, n)
    monkeypatch.setattr(evtchn.os, "read", counted)
    try:
        yield ch, device, reads
    finally:
        ch.fd = -1  # the socket closes it
        ours.close()
        device.close()


def ports(*numbers: int) -> bytes:
    return b"".join(struct.pack("=I", n) for n in numbers)


def unmasked(device: socket.socket) -> bytes:
    device.setblocking(False)
    try:
        return device.recv(1 << 16)
    except BlockingIOError:
        return b""


def test_one_read_when_the_device_had_less_than_asked(channel) -> None:  # noqa: ANN001
    ch, device, reads = channel
    device.sendall(ports(7, 7))
    ch.clear()
    assert len(reads) == 1  # no second read only to hear EAGAIN
    assert unmasked(device) == ports(7, 7)


def test_nothing_queued_reads_once_and_writes_nothing(channel) -> None:  # noqa: ANN001
    ch, device, reads = channel
    ch.clear()
    assert len(reads) == 1
    assert unmasked(device) == b""


def test_a_full_read_reads_again_until_drained(channel) -> None:  # noqa: ANN001
    ch, device, reads = channel
    queued = ports(*([7] * 75))  # more than one read takes (64 ports)
    device.sendall(queued)
    ch.clear()
    assert len(reads) == 2
    assert unmasked(device) == queued


def test_a_full_read_then_nothing(channel) -> None:  # noqa: ANN001
    ch, device, reads = channel
    queued = ports(*([7] * 64))
    device.sendall(queued)
    ch.clear()
    assert len(reads) == 2  # a full read may have left more: asked again, EAGAIN
    assert unmasked(device) == queued
