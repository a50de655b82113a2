"""A minimal HTTP/1.0 endpoint for Prometheus scrapes: ``GET /metrics`` (and ``/``).

One request per connection, a bounded request head, a deadline per client: a scraper
gets the exposition, anything else a short error, and a stranger who connects and says
nothing is dropped after a few seconds without holding anything else up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from blktap.errors import UsageError
from blktap.metrics.prometheus import CONTENT_TYPE

log = logging.getLogger("blktap.metrics")

HEAD_LIMIT = 8192
CLIENT_DEADLINE = 5.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (loopback) or ``PORT``; ``[::1]:PORT`` for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid metrics address {text!r} (use HOST:PORT, e.g. "
                         "127.0.0.1:9797)")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """Serves ``collect()``'s text on every scrape."""

    def __init__(self, collect: Callable[[], Awaitable[str]]) -> None:
        self.collect = collect
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._client, host, port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            async with asyncio.timeout(CLIENT_DEADLINE):
                await self._answer(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _reply(writer, 400, "Bad Request", "bad request line\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await _reply(writer, 405, "Method Not Allowed", "GET only\n")
            return
        if target not in ("/metrics", "/"):
            await _reply(writer, 404, "Not Found", "try /metrics\n")
            return
        try:
            body = await self.collect()
        except Exception as exc:  # a scrape that fails says why; the server stays up
            log.error("metrics: collecting failed: %s", exc)
            await _reply(writer, 500, "Internal Server Error", f"{exc}\n")
            return
        await _reply(writer, 200, "OK", body, CONTENT_TYPE, head_only=method == "HEAD")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        chunk = await reader.read(1024)
        if not chunk:
            break
        head += chunk
        if len(head) > HEAD_LIMIT:
            raise asyncio.LimitOverrunError("request head too long", len(head))
    return head


async def _reply(writer: asyncio.StreamWriter, code: int, reason: str, body: str,
                 ctype: str = "text/plain; charset=utf-8", *, head_only: bool = False) -> None:
    data = body.encode()
    writer.write(f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
    if not head_only:
        writer.write(data)
    await writer.drain()


__all__ = ["MetricsServer", "parse_listen"]
