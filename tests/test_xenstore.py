"""The XenStore client against a small xenstored speaking the wire protocol (xen_fakes)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from blktap.errors import XenStoreError
from blktap.tapback import xs_wire
from blktap.tapback.xenstore import XenStore, default_path
from xen_fakes import XS_READ, XS_TRANSACTION_END, XS_WRITE, FakeXenstored


def run(tmp_path, body, timeout=20.0):
    """Run ``body(fake, xs)`` against a fresh fake xenstored and a connected client."""
    async def main():
        fake = await FakeXenstored(str(tmp_path / "xs.sock")).start()
        try:
            xs = await XenStore.open(fake.path)
            try:
                return await asyncio.wait_for(body(fake, xs), timeout)
            finally:
                await xs.close()
        finally:
            await fake.stop()
    return asyncio.run(main())


def test_read_write_directory_rm(tmp_path):
    async def body(fake, xs):
        await xs.write("/a/b/c", "hello")
        assert await xs.read("/a/b/c") == "hello"
        assert fake.read("/a/b") == ""  # parents are created
        await xs.write("/a/b/d", b"")
        await xs.mkdir("/a/e")
        assert await xs.directory("/a") == ["b", "e"]
        assert await xs.directory("/a/b") == ["c", "d"]
        assert await xs.read("/a/b/d") == ""
        await xs.rm("/a/b")
        assert await xs.directory("/a") == ["e"]
        assert await xs.read_or("/a/b/c") is None
        assert await xs.exists("/a/e")
        with pytest.raises(XenStoreError) as e:
            await xs.read("/a/b/c")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(XenStoreError) as e:
            await xs.rm("/nothing/here")
        assert e.value.errno == errno.ENOENT
    run(tmp_path, body)


def test_values_are_bytes_on_the_wire(tmp_path):
    async def body(fake, xs):
        await xs.write("/v", b"\x00\xffbinary\n")
        assert await xs.read_bytes("/v") == b"\x00\xffbinary\n"
        await xs.write("/u", "é")
        assert fake.tree["/u"] == "é".encode()
    run(tmp_path, body)


def test_relative_paths_are_under_the_domain_home(tmp_path):
    async def body(fake, xs):
        await xs.write("backend/vbd/1/768/state", "1")
        assert fake.read("/local/domain/0/backend/vbd/1/768/state") == "1"
        assert await xs.read("/local/domain/0/backend/vbd/1/768/state") == "1"
    run(tmp_path, body)


def test_permissions(tmp_path):
    async def body(fake, xs):
        await xs.write("/p", "x")
        await xs.set_perms("/p", ["n0", "r5"])
        assert await xs.get_perms("/p") == ["n0", "r5"]
    run(tmp_path, body)


def test_bad_paths_never_reach_the_wire(tmp_path):
    async def body(fake, xs):
        before = len(fake.requests)
        for bad in ("", "/a//b", "/a/b/", "/a\0b", "/a b", "/" + "x" * 3100):
            with pytest.raises(ValueError):
                await xs.read(bad)
        with pytest.raises(ValueError):
            await xs.write("/big", b"x" * 5000)
        assert len(fake.requests) == before
    run(tmp_path, body)


def test_many_requests_in_flight(tmp_path):
    async def body(fake, xs):
        for i in range(50):
            fake.write(f"/n/{i}", str(i * i))
        got = await asyncio.gather(*(xs.read(f"/n/{i}") for i in range(50)),
                                   *(xs.read_or(f"/missing/{i}") for i in range(50)))
        assert got[:50] == [str(i * i) for i in range(50)]
        assert got[50:] == [None] * 50
    run(tmp_path, body)


def test_watch_fires_at_once_then_on_changes(tmp_path):
    async def body(fake, xs):
        w = await xs.watch("/be", "tok")
        assert await w.get() == "/be"  # the initial event, though /be does not exist yet
        fake.write("/be/1/768/state", "1")
        assert await w.get() == "/be/1/768/state"
        await xs.write("/be/1/768/frontend", "/fe")  # our own writes fire too
        assert await w.get() == "/be/1/768/frontend"
        fake.write("/elsewhere", "x")  # not under the watch
        fake.write("/be", "")  # the node itself
        assert await w.get() == "/be"
        assert w.pending() == []
    run(tmp_path, body)


def test_watch_below_a_removed_directory_fires(tmp_path):
    async def body(fake, xs):
        fake.write("/fe/1/device/vbd/768/state", "4")
        w = await xs.watch("/fe/1/device/vbd/768/state", "front")
        assert await w.get() == "/fe/1/device/vbd/768/state"
        fake.rm("/fe/1")
        assert await w.get() == "/fe/1/device/vbd/768/state"
        assert await xs.read_or("/fe/1/device/vbd/768/state") is None
    run(tmp_path, body)


def test_watch_callbacks_and_unwatch(tmp_path):
    async def body(fake, xs):
        seen = []
        w1 = await xs.watch("/x", "one", lambda p, t: seen.append((p, t)))
        w2 = await xs.watch("/x/y", "two", lambda p, t: seen.append((p, t)))
        await xs.write("/x/y", "1")
        await xs.read("/x/y")  # a round trip: the events came before this reply
        assert ("/x/y", "one") in seen and ("/x/y", "two") in seen
        with pytest.raises(XenStoreError) as e:
            await xs.watch("/z", "one")
        assert e.value.errno == errno.EEXIST
        await w2.close()
        seen.clear()
        await xs.write("/x/y", "2")
        await xs.read("/x/y")
        assert seen == [("/x/y", "one")]
        await w1.close()
        await xs.write("/x/y", "3")
        await xs.read("/x/y")
        assert seen == [("/x/y", "one")]
    run(tmp_path, body)


def test_a_failing_callback_does_not_stop_the_reader(tmp_path):
    async def body(fake, xs):
        def bad(path, token):
            raise RuntimeError("boom")
        await xs.watch("/q", "bad", bad)
        await xs.write("/q", "1")
        assert await xs.read("/q") == "1"
    run(tmp_path, body)


def test_transaction_commits_atomically(tmp_path):
    async def body(fake, xs):
        w = await xs.watch("/t", "t")
        await w.get()

        async def work(tx):
            await tx.write("/t/a", "1")
            await tx.write("/t/b", "2")
            assert fake.read("/t/a") is None  # nothing visible before the commit
            assert await tx.read("/t/a") == "1"  # but the transaction sees its writes
            return "done"
        assert await xs.transact(work) == "done"
        assert fake.read("/t/a") == "1" and fake.read("/t/b") == "2"
        assert sorted([await w.get(), await w.get()]) == ["/t/a", "/t/b"]
    run(tmp_path, body)


def test_transaction_body_failure_aborts(tmp_path):
    async def body(fake, xs):
        async def work(tx):
            await tx.write("/t/a", "1")
            raise RuntimeError("no")
        with pytest.raises(RuntimeError):
            await xs.transact(work)
        assert fake.read("/t/a") is None
        assert fake.tx == {}  # ended (aborted), not left open
    run(tmp_path, body)


def test_transaction_conflict_is_retried(tmp_path):
    async def body(fake, xs):
        fake.write("/c", "0")
        attempts = []

        async def increment(tx):
            value = int(await tx.read("/c"))
            attempts.append(value)
            if len(attempts) == 1:
                fake.write("/c", "10")  # another writer commits meanwhile
            await tx.write("/c", str(value + 1))
        await xs.transact(increment)
        assert attempts == [0, 10]
        assert fake.read("/c") == "11"  # the conflicting write was not lost
    run(tmp_path, body)


def test_transaction_gives_up_after_its_attempts(tmp_path):
    async def body(fake, xs):
        fake.fail_next[XS_TRANSACTION_END] = ["EAGAIN"] * 3

        async def work(tx):
            await tx.write("/g", "1")
        with pytest.raises(XenStoreError) as e:
            await xs.transact(work, attempts=3)
        assert e.value.errno == errno.EAGAIN
        assert fake.read("/g") is None
    run(tmp_path, body)


def test_error_names_map_to_errno(tmp_path):
    async def body(fake, xs):
        fake.fail_next[XS_WRITE] = ["EACCES", "EQUOTA", "EWHATEVER"]
        codes = []
        for _ in range(3):
            with pytest.raises(XenStoreError) as e:
                await xs.write("/e", "1")
            codes.append(e.value.errno)
        assert codes == [errno.EACCES, errno.EDQUOT, errno.EIO]
        await xs.write("/e", "1")  # the connection is still good
    run(tmp_path, body)


def test_lost_connection_fails_requests_and_ends_watches(tmp_path):
    async def body(fake, xs):
        w = await xs.watch("/w", "w")
        await w.get()
        fake.fail_next[XS_READ] = []
        fake.drop_connections()
        with pytest.raises(XenStoreError) as e:
            await w.get()
        assert e.value.errno == errno.EPIPE
        with pytest.raises(XenStoreError) as e:
            await xs.read("/w")
        assert e.value.errno == errno.EPIPE
        assert [p async for p in w] == []
    run(tmp_path, body)


def test_open_reports_a_missing_xenstored(tmp_path, monkeypatch):
    async def main():
        with pytest.raises(XenStoreError) as e:
            await XenStore.open(str(tmp_path / "none"))
        assert e.value.errno == errno.ENOENT
    asyncio.run(main())
    monkeypatch.setenv("XENSTORED_PATH", "/somewhere/socket")
    assert default_path() == "/somewhere/socket"


def test_wire_helpers():
    assert xs_wire.HEADER.size == 16
    assert xs_wire.fields("a", "b") == b"a\0b\0"
    assert xs_wire.fields("p", b"v", terminate_last=False) == b"p\0v"
    assert xs_wire.split(b"x\0y\0") == [b"x", b"y"]
    assert xs_wire.error_code(b"ENOENT\0") == errno.ENOENT
    assert xs_wire.error_name(errno.EAGAIN) == "EAGAIN"
    assert xs_wire.error_name(errno.ENOTTY) == "EIO"
    packed = xs_wire.pack(xs_wire.Op.READ, 7, 3, b"/a\0")
    assert packed[:16] == (2).to_bytes(4, "little") + (7).to_bytes(4, "little") + \
        (3).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert os.path.basename(xs_wire.__file__) == "xs_wire.py"


def test_the_reply_to_a_cancelled_request_goes_to_no_one_else(tmp_path):
    async def body(fake, xs):
        fake.write("/a", "A")
        fake.write("/b", "B")
        for _ in range(5):
            first = asyncio.get_running_loop().create_task(xs.read("/a"))
            await asyncio.sleep(0)  # sent; its reply is on the way
            first.cancel()
            assert await xs.read("/b") == "B"
    run(tmp_path, body)


def test_a_mute_xenstored_times_out(tmp_path):
    async def body(fake, xs):
        xs.timeout = 0.2
        fake._handle = lambda *a: None  # reads requests, never answers
        with pytest.raises(XenStoreError) as e:
            await xs.read("/a")
        assert e.value.errno == errno.ETIMEDOUT
    run(tmp_path, body)


# Through /dev/xen/xenbus the kernel answers WATCH and UNWATCH inside the write, holding
# the lock its xenstore thread needs to hand over any other answer: written while another
# request is unanswered, they deadlock dom0's xenstore (xenstore.py's docstring). Here the
# test plays the device's far side on a socket pair, answering when it chooses.
def _device_pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours.detach(), theirs


def _take(peer) -> list[tuple[int, int]]:
    """The (op, req_id) of every whole message the client has written so far."""
    data = b""
    while True:
        try:
            data += peer.recv(65536)
        except BlockingIOError:
            break
    out = []
    while data:
        op, req_id, _tx, length = xs_wire.HEADER.unpack_from(data)
        out.append((op, req_id))
        data = data[xs_wire.HEADER.size + length:]
    return out


def _answer(peer, op: int, req_id: int, payload: bytes = b"OK\0") -> None:
    peer.send(xs_wire.pack(op, req_id, 0, payload))


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("device", [True, False])
def test_a_watch_through_the_device_waits_for_every_answer(device):
    async def main():
        fd, peer = _device_pair()
        xs = XenStore(fd, "test", device=device)
        try:
            loop = asyncio.get_running_loop()
            read = loop.create_task(xs.read("/a"))
            await _settle()
            [(op, read_id)] = _take(peer)
            assert op == XS_READ
            watch = loop.create_task(xs.watch("/b", "tok"))
            await _settle()
            written = _take(peer)
            if not device:  # a socket pipelines as ever
                assert [op for op, _ in written] == [xs_wire.Op.WATCH]
            else:  # held back until the read is answered
                assert written == []
                _answer(peer, XS_READ, read_id, b"A")
                assert await read == "A"
                await _settle()
                written = _take(peer)
                assert [op for op, _ in written] == [xs_wire.Op.WATCH]
                # ...and what comes after it waits for it to be written, then goes
                later = loop.create_task(xs.read("/c"))
                await _settle()
                assert [op for op, _ in _take(peer)] == [XS_READ]
                later.cancel()
            _answer(peer, xs_wire.Op.WATCH, written[0][1])
            await watch
            if not device:
                _answer(peer, XS_READ, read_id, b"A")
                assert await read == "A"
        finally:
            await xs.close()
            peer.close()
    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_watch_through_the_device_gives_up_on_an_answer_that_never_comes():
    async def main():
        fd, peer = _device_pair()
        xs = XenStore(fd, "test", device=True)
        xs.timeout = 0.2
        try:
            read = asyncio.get_running_loop().create_task(xs.read("/a"))
            await _settle()
            read.cancel()  # given up on: its answer is still on its way
            with pytest.raises(XenStoreError) as e:
                await xs.watch("/b", "tok")
            assert e.value.errno == errno.ETIMEDOUT
            assert "outstanding" in str(e.value)
            assert [op for op, _ in _take(peer)] == [XS_READ]  # the watch never went
        finally:
            await xs.close()
            peer.close()
    asyncio.run(asyncio.wait_for(main(), 10))
