"""One front-end's session: the vhost-user messages of one connection, in order.

    socket ──► read a message whole (header, payload, fds) ──► check its size ──►
    handler ──► reply (GET_*) or REPLY_ACK (u64 0/1 when asked) ──► next message

The session owns everything the front-end gave it: guest memory regions, eventfds, the
virtqueues (and their request tasks). It ends at EOF, when a queue is found broken (the
socket is shut down, so QEMU sees the disconnect and the guest's disk is gone until it
reconnects), or when the server stops; then the rings stop, the requests in flight
finish into the used rings, memory is unmapped and every fd closed.

Errors: a malformed message (bad version, a payload of the wrong size, an index out of
range, fds missing) drops the front-end; a well-formed request we refuse (a config write
to a read-only field, features we did not offer) gets a REPLY_ACK of 1 when the
front-end asked for one, else a log line and the connection is dropped too (it would go
on with a device it thinks is set up).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from blktap.errors import BlktapError
from blktap.transport.vhost_user import proto as p
from blktap.transport.vhost_user.blk import BlkDevice
from blktap.transport.vhost_user.inflight import InflightRegion
from blktap.transport.vhost_user.memory import MAX_REGIONS, GuestMemory, close_fds
from blktap.transport.vhost_user.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC
from blktap.transport.vhost_user.virtqueue import BadRing, RingState, Virtqueue

log = logging.getLogger("blktap.vhost")

PROTOCOL_FEATURES = (
    p.bit(p.ProtocolFeature.MQ) | p.bit(p.ProtocolFeature.REPLY_ACK)
    | p.bit(p.ProtocolFeature.CONFIG) | p.bit(p.ProtocolFeature.INFLIGHT_SHMFD)
    | p.bit(p.ProtocolFeature.CONFIGURE_MEM_SLOTS))


class ProtocolError(BlktapError):
    """A message that breaks the protocol: the front-end is dropped."""

    default_errno = errno.EPROTO


class Refused(BlktapError):
    """A valid request we do not carry out (REPLY_ACK 1)."""

    default_errno = errno.EINVAL


class Phase(enum.Enum):
    CONNECTED = "connected"  # messages flow
    BROKEN = "broken"  # a queue broke the rules: disconnecting
    CLOSED = "closed"  # torn down


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def take_fd(self) -> int:
        if not self.fds:
            raise ProtocolError(f"{_name(self.request)} without its file descriptor")
        return self.fds.pop(0)


def _inflight(payload: bytes) -> tuple[int, int, int, int]:
    """The inflight description (QEMU pads it to 24 bytes; 20 are meaningful)."""
    return p.INFLIGHT.unpack_from(payload.ljust(p.INFLIGHT.size, b"\0"))


def _name(request: int) -> str:
    try:
        return p.Req(request).name
    except ValueError:
        return f"request {request}"


class Session:
    def __init__(self, sock: socket.socket, blk: BlkDevice, *, name: str,
                 inflight_ok: bool = True) -> None:
        self.sock = sock
        self.blk = blk
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.phase = Phase.CONNECTED
        self.memory = GuestMemory()
        self.queues = [Virtqueue(i, self.memory, blk.handle, self._on_broken,
                                 name=f"{name} vq{i}", batch=blk.vbd.batch)
                       for i in range(blk.options.num_queues)]
        self.offered_protocol = PROTOCOL_FEATURES
        if not inflight_ok:
            self.offered_protocol &= ~p.bit(p.ProtocolFeature.INFLIGHT_SHMFD)
        self.features = 0
        self.protocol_features = 0
        self.backend_fd = -1
        self.inflight: InflightRegion | None = None
        self.messages = 0
        self.problem: BaseException | None = None
        self._handlers: dict[int, Callable[[Message], object]] = {
            p.Req.GET_FEATURES: self._get_features,
            p.Req.SET_FEATURES: self._set_features,
            p.Req.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            p.Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.Req.SET_OWNER: self._nothing,
            p.Req.RESET_OWNER: self._nothing,  # deprecated; the spec says ignore it
            p.Req.SET_MEM_TABLE: self._set_mem_table,
            p.Req.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            p.Req.ADD_MEM_REG: self._add_mem_reg,
            p.Req.REM_MEM_REG: self._rem_mem_reg,
            p.Req.SET_VRING_NUM: self._set_vring_num,
            p.Req.SET_VRING_ADDR: self._set_vring_addr,
            p.Req.SET_VRING_BASE: self._set_vring_base,
            p.Req.SET_VRING_KICK: self._set_vring_kick,
            p.Req.SET_VRING_CALL: self._set_vring_call,
            p.Req.SET_VRING_ERR: self._set_vring_err,
            p.Req.SET_VRING_ENABLE: self._set_vring_enable,
            p.Req.GET_QUEUE_NUM: self._get_queue_num,
            p.Req.GET_CONFIG: self._get_config,
            p.Req.SET_CONFIG: self._set_config,
            p.Req.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            p.Req.GET_INFLIGHT_FD: self._get_inflight_fd,
            p.Req.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        # GET_VRING_BASE waits for the queue's requests: a coroutine.
        self._async_handlers = {p.Req.GET_VRING_BASE: self._get_vring_base}

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Serve messages until EOF, a broken queue, a protocol error or disconnect()."""
        self.sock.setblocking(False)
        try:
            while self.phase is Phase.CONNECTED:
                msg = await self._receive()
                if msg is None:
                    break
                self.messages += 1
                try:
                    await self._dispatch(msg)
                finally:
                    close_fds(msg.fds)  # whatever the handler did not keep
        except (ProtocolError, BadRing) as exc:
            self.problem = exc
            log.error("%s: %s; disconnecting the front-end", self.name, exc)
        except (ConnectionError, OSError) as exc:
            self.problem = exc
            log.info("%s: connection lost: %s", self.name, exc)
        finally:
            await self._teardown()

    def disconnect(self) -> None:
        """End the session (server stop): the loop sees EOF and tears down."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _on_broken(self, exc: BaseException) -> None:
        if self.phase is Phase.CONNECTED:
            self.phase = Phase.BROKEN
            self.problem = exc
            self.disconnect()

    async def _dispatch(self, msg: Message) -> None:
        req = msg.request
        want_ack = bool(msg.flags & p.FLAG_NEED_REPLY) and bool(
            self.protocol_features & p.bit(p.ProtocolFeature.REPLY_ACK))
        handler = self._handlers.get(req)
        async_handler = self._async_handlers.get(req)
        if handler is None and async_handler is None:
            raise ProtocolError(f"unsupported {_name(req)} ({msg.flags=:#x})")
        self._check_size(msg)
        try:
            if async_handler is not None:
                reply = await async_handler(msg)
            else:
                reply = handler(msg)  # type: ignore[misc]
        except Refused as exc:
            if not want_ack:
                raise ProtocolError(f"{_name(req)} refused: {exc}") from None
            log.warning("%s: %s refused: %s", self.name, _name(req), exc)
            await self._send(req, p.U64.pack(1))
            return
        if isinstance(reply, tuple):
            await self._send(req, reply[0], reply[1])
        elif reply is not None:
            await self._send(req, reply)
        elif want_ack:
            await self._send(req, p.U64.pack(0))

    def _check_size(self, msg: Message) -> None:
        size = len(msg.payload)
        exact = p.PAYLOAD_SIZE.get(msg.request)
        if exact is not None and size != exact:
            raise ProtocolError(f"{_name(msg.request)} with {size} bytes of payload "
                                f"(expected {exact})")
        least = p.PAYLOAD_MIN.get(msg.request)
        if least is not None and size < least:
            raise ProtocolError(f"{_name(msg.request)} with {size} bytes of payload "
                                f"(expected at least {least})")

    # ------------------------------------------------------------------ socket
    async def _receive(self) -> Message | None:
        head = await self._recv_exact(p.HEADER.size)
        if head is None:
            return None
        data, fds = head
        request, flags, size = p.HEADER.unpack(data)
        if flags & p.VERSION_MASK != p.VERSION:
            close_fds(fds)
            raise ProtocolError(f"message version {flags & p.VERSION_MASK} (flags {flags:#x})")
        if size > p.MAX_PAYLOAD:
            close_fds(fds)
            raise ProtocolError(f"{_name(request)} with a payload of {size} bytes")
        payload = b""
        if size:
            body = await self._recv_exact(size)
            if body is None:
                close_fds(fds)
                return None
            payload, more = body
            fds += more
        return Message(request, flags, payload, fds)

    async def _recv_exact(self, n: int) -> tuple[bytes, list[int]] | None:
        buf = b""
        fds: list[int] = []
        while len(buf) < n:
            try:
                data, got, mflags, _ = socket.recv_fds(self.sock, n - len(buf), p.MAX_FDS,
                                                       socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await self._wait(False)
                continue
            fds += got
            if mflags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise ProtocolError(f"more than {p.MAX_FDS} file descriptors in a message")
            if not data:
                close_fds(fds)
                if buf:
                    log.warning("%s: EOF inside a message", self.name)
                return None
            buf += data
        return buf, fds

    async def _send(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = p.HEADER.pack(request, p.VERSION | p.FLAG_REPLY, len(payload)) + payload
        sent = 0
        while sent < len(data):
            try:
                if fds and not sent:
                    n = socket.send_fds(self.sock, [data], fds)
                else:
                    n = self.sock.send(data[sent:])
            except BlockingIOError:
                await self._wait(True)
                continue
            sent += n

    async def _wait(self, writable: bool) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        add, remove = ((self.loop.add_writer, self.loop.remove_writer) if writable
                       else (self.loop.add_reader, self.loop.remove_reader))

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        try:
            await fut
        finally:
            remove(fd)

    # ------------------------------------------------------------------ teardown
    async def _teardown(self) -> None:
        """Stop every ring, let requests in flight finish, unmap, close."""
        if self.phase is Phase.CLOSED:
            return
        for vq in self.queues:
            vq.halt()
        for vq in self.queues:
            await vq.drain()
            vq.flush()
            vq.close()
        self.memory.clear()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.backend_fd >= 0:
            close_fds([self.backend_fd])
            self.backend_fd = -1
        self.phase = Phase.CLOSED
        self.sock.close()

    # ------------------------------------------------------------------ handlers
    def _nothing(self, msg: Message) -> None:
        return None

    def _get_features(self, msg: Message) -> bytes:
        return p.U64.pack(self.offered_features())

    def offered_features(self) -> int:
        return self.blk.features() | p.bit(p.F_PROTOCOL_FEATURES)

    def _set_features(self, msg: Message) -> None:
        (features,) = p.U64.unpack(msg.payload)
        extra = features & ~self.offered_features()
        if extra:
            raise Refused(f"features {extra:#x} were not offered")
        self.features = features
        event_idx = bool(features & p.bit(F_RING_EVENT_IDX))
        indirect = bool(features & p.bit(F_RING_INDIRECT_DESC))
        protocol = bool(features & p.bit(p.F_PROTOCOL_FEATURES))
        for vq in self.queues:
            vq.event_idx = event_idx
            vq.indirect = indirect
            if not protocol:  # rings start enabled without protocol features
                vq.set_enabled(True)
        log.debug("%s: features %#x", self.name, features)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return p.U64.pack(self.offered_protocol)

    def _set_protocol_features(self, msg: Message) -> None:
        (features,) = p.U64.unpack(msg.payload)
        extra = features & ~self.offered_protocol
        if extra:
            raise ProtocolError(f"protocol features {extra:#x} were not offered")
        self.protocol_features = features

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self.queues):
            raise ProtocolError(f"queue {index} (the device has {len(self.queues)})")
        return self.queues[index]

    # memory
    def _set_mem_table(self, msg: Message) -> None:
        count, _ = p.MEM_TABLE_HEADER.unpack_from(msg.payload)
        if count > p.MAX_MEM_REGIONS or len(msg.payload) < (
                p.MEM_TABLE_HEADER.size + count * p.MEM_REGION.size):
            raise ProtocolError(f"memory table of {count} regions in {len(msg.payload)} bytes")
        if len(msg.fds) < count:
            raise ProtocolError(f"memory table of {count} regions with {len(msg.fds)} fds "
                                "(guest RAM must be shared: memory-backend-memfd,share=on)")
        self.memory.clear()
        for i in range(count):
            gpa, size, uva, offset = p.MEM_REGION.unpack_from(
                msg.payload, p.MEM_TABLE_HEADER.size + i * p.MEM_REGION.size)
            self._map_region(msg.take_fd(), gpa, size, uva, offset)
        self._remap()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return p.U64.pack(MAX_REGIONS)

    def _add_mem_reg(self, msg: Message) -> None:
        _, gpa, size, uva, offset = p.SINGLE_MEM_REGION.unpack(msg.payload)
        self._map_region(msg.take_fd(), gpa, size, uva, offset)
        self._remap()

    def _map_region(self, fd: int, gpa: int, size: int, uva: int, offset: int) -> None:
        """Map one region of guest RAM; the fd is ours to close either way (the mapping
        keeps the memory)."""
        try:
            self.memory.add(fd, gpa, size, uva, offset)
        except BlktapError as exc:
            raise ProtocolError(str(exc)) from None
        finally:
            close_fds([fd])

    def _rem_mem_reg(self, msg: Message) -> None:
        _, gpa, size, uva, _ = p.SINGLE_MEM_REGION.unpack(msg.payload)
        if not self.memory.remove(gpa, size, uva):
            raise Refused(f"no memory region at {gpa:#x} of {size:#x} bytes to remove")
        self._remap()

    def _remap(self) -> None:
        """Ring views follow the memory table. A running ring that no longer translates
        is broken; a stopped one is mapped again when it starts."""
        for vq in self.queues:
            try:
                vq.map()
            except BadRing:
                if vq.state is not RingState.STOPPED:
                    raise

    # rings
    def _set_vring_num(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        self._queue(index).set_num(num)

    def _set_vring_addr(self, msg: Message) -> None:
        index, flags, desc, used, avail, _log = p.VRING_ADDR.unpack(msg.payload)
        if flags & p.VRING_F_LOG:
            raise Refused("dirty logging of the used ring (we do not offer LOG_ALL)")
        self._queue(index).set_addr(desc, avail, used)

    def _set_vring_base(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        self._queue(index).set_base(num)

    async def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = p.VRING_STATE.unpack(msg.payload)
        vq = self._queue(index)
        base = await vq.stop()
        return p.VRING_STATE.pack(index, base)

    def _ring_fd(self, msg: Message) -> tuple[Virtqueue, int]:
        (value,) = p.U64.unpack(msg.payload)
        if value & ~(p.VRING_INDEX_MASK | p.VRING_NOFD):
            raise ProtocolError(f"{_name(msg.request)} with {value:#x}")
        vq = self._queue(value & p.VRING_INDEX_MASK)
        return vq, (-1 if value & p.VRING_NOFD else msg.take_fd())

    def _set_vring_kick(self, msg: Message) -> None:
        vq, fd = self._ring_fd(msg)
        if fd < 0:
            raise ProtocolError(f"{vq.name}: no kick eventfd (polling is not supported)")
        vq.set_kick(fd)

    def _set_vring_call(self, msg: Message) -> None:
        vq, fd = self._ring_fd(msg)
        vq.set_call(fd)

    def _set_vring_err(self, msg: Message) -> None:
        vq, fd = self._ring_fd(msg)
        vq.set_err(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        if num > 1:
            raise ProtocolError(f"SET_VRING_ENABLE {num}")
        self._queue(index).set_enabled(bool(num))

    def _get_queue_num(self, msg: Message) -> bytes:
        return p.U64.pack(len(self.queues))

    # config space
    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = p.CONFIG_HEADER.unpack_from(msg.payload)
        if size > p.MAX_CONFIG_SIZE or offset > p.MAX_CONFIG_SIZE - size:
            log.warning("%s: GET_CONFIG of %d bytes at %d refused", self.name, size, offset)
            return p.CONFIG_HEADER.pack(offset, 0, flags)
        space = self.blk.config().ljust(p.MAX_CONFIG_SIZE, b"\0")
        return p.CONFIG_HEADER.pack(offset, size, flags) + space[offset : offset + size]

    def _set_config(self, msg: Message) -> None:
        offset, size, flags = p.CONFIG_HEADER.unpack_from(msg.payload)
        data = msg.payload[p.CONFIG_HEADER.size :]
        if size != len(data):
            raise ProtocolError(f"SET_CONFIG of {size} bytes with {len(data)}")
        if flags == p.CONFIG_FLAG_MIGRATION:
            raise Refused("config writes for live migration are not supported")
        try:
            self.blk.set_config(offset, data)
        except BlktapError as exc:
            raise Refused(str(exc)) from None

    def _set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        if self.backend_fd >= 0:
            close_fds([self.backend_fd])
        self.backend_fd = fd  # kept for its lifetime; we send nothing on it

    # inflight tracking
    def _get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        _, _, num_queues, queue_size = _inflight(msg.payload)
        if not 0 < num_queues <= len(self.queues) or not 0 < queue_size <= 32768:
            raise ProtocolError(f"GET_INFLIGHT_FD for {num_queues} queues of {queue_size}")
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = InflightRegion.create(num_queues, queue_size)
        self._attach_inflight()
        return (p.INFLIGHT.pack(self.inflight.size, 0, num_queues, queue_size),
                [self.inflight.fd])

    def _set_inflight_fd(self, msg: Message) -> None:
        size, offset, num_queues, queue_size = _inflight(msg.payload)
        fd = msg.take_fd()
        try:
            region = InflightRegion.open(fd, size, offset, num_queues, queue_size)
        except BlktapError as exc:
            raise ProtocolError(f"SET_INFLIGHT_FD: {exc}") from None
        finally:
            close_fds([fd])
        if num_queues > len(self.queues):
            region.close()
            raise ProtocolError(f"SET_INFLIGHT_FD for {num_queues} queues")
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        self._attach_inflight()

    def _attach_inflight(self) -> None:
        assert self.inflight is not None
        for vq in self.queues:
            vq.inflight = self.inflight.queue(vq.index)
