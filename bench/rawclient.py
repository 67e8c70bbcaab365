"""A lean HTTP/1.1 load client: pre-built requests over keep-alive connections, responses parsed just enough
(status line, Content-Length). Far cheaper per request than an aiohttp client, so on a small machine the
client steals less CPU from the server it measures; used when wrk is not installed."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit


def build(url: str, body: bytes, signed: list[tuple[str, str, str]]) -> list[bytes]:
    """One complete POST per signed triple (webhook-id, timestamp, signature)."""
    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    return [
        head + f"webhook-id: {i}\r\nwebhook-timestamp: {t}\r\nwebhook-signature: {s}\r\n\r\n".encode() + body
        for i, t, s in signed
    ]


class _Conn(asyncio.Protocol):
    """One keep-alive connection that sends the next request as soon as the previous answer is complete."""

    def __init__(self, shared: _Shared) -> None:
        self.shared, self.buffer, self.transport, self.started = shared, b"", None, 0.0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next()

    def _next(self) -> None:
        request = self.shared.take()
        if request is None:
            assert self.transport is not None
            self.transport.close()
            return
        self.started = time.perf_counter()
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            at = head.lower().find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            status = int(head[9:12])
            self.buffer = self.buffer[end + 4 + length :]
            self.shared.answered(status, time.perf_counter() - self.started)
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Shared:
    def __init__(self, requests: list[bytes], seconds: float) -> None:
        self.requests, self.index = requests, 0
        self.deadline = time.monotonic() + seconds
        self.latencies: list[float] = []
        self.errors = 0

    def take(self) -> bytes | None:
        if self.index >= len(self.requests) or time.monotonic() >= self.deadline:
            return None
        self.index += 1
        return self.requests[self.index - 1]

    def answered(self, status: int, seconds: float) -> None:
        self.errors += status >= 300
        self.latencies.append(seconds * 1000)


async def run(
    host: str, port: int, requests: list[bytes], seconds: float, connections: int
) -> tuple[list[float], int, float]:
    """Send `requests` (or as many as fit in `seconds`); (sorted latencies in ms, errors, elapsed s)."""
    loop = asyncio.get_running_loop()
    shared = _Shared(requests, seconds)
    begun = time.monotonic()
    conns = []
    for _ in range(connections):
        _, conn = await loop.create_connection(lambda: _Conn(shared), host, port)
        conns.append(conn)
    await asyncio.gather(*(c.done for c in conns))
    elapsed = time.monotonic() - begun
    shared.latencies.sort()
    return shared.latencies, shared.errors, elapsed
