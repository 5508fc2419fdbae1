"""Streaming one answer to the client: events through an API adapter, onto a server-sent-events body.

The head (status 200) goes out with the first bytes the adapter produces, so an upstream that fails
before any output is still reported with its own status. While the upstream is silent, a comment
line is sent every ``keepalive`` seconds so proxies and load balancers keep the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Protocol

from ..chunks import Item, only_texts, runs
from ..events import Event
from .errors import ErrorInfo
from .web import Request, StreamResponse

KEEPALIVE_COMMENT = b": keepalive\n\n"
DEFAULT_KEEPALIVE = 15.0
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tells nginx-style proxies in front not to buffer the stream
}


class StreamEncoder(Protocol):
    """What every API adapter provides to stream an answer."""

    def start(self) -> bytes: ...  # sent with the head
    def encode(self, event: Event) -> bytes: ...  # empty when the event shows nothing yet
    def encode_texts(self, texts: list[str]) -> bytes: ...  # encode() of a text-only delta of each
    def finish(self) -> bytes: ...
    def error(self, info: ErrorInfo) -> bytes: ...


class SSEChannel:
    """The streamed response of one request, opened by its first write."""

    def __init__(self, request: Request, head: bytes, keepalive: float | None) -> None:
        self.request = request
        self.response: StreamResponse | None = None
        self._head = head
        self._keepalive = keepalive
        self._clock = asyncio.get_running_loop().time
        self._last = self._clock()
        self._opening = False
        self._timer: asyncio.TimerHandle | None = None
        self._comment: asyncio.Task[None] | None = None  # a keep-alive comment being sent

    @property
    def started(self) -> bool:
        return self.response is not None or self._opening

    async def send(self, data: bytes) -> None:
        response = self.response
        if response is None:
            response = await self._open()
            data = self._head + data
        await response.write(data)
        self._last = self._clock()

    async def _open(self) -> StreamResponse:
        # The head goes out with the first bytes of the body, in one write.
        self._opening = True
        response = StreamResponse(headers=SSE_HEADERS)
        await response.prepare(self.request)
        self.response = response
        self._opening = False
        return response

    async def close(self, data: bytes = b"") -> None:
        """End the body with ``data``, in one write (with the head too, when it has not gone out)."""
        response = self.response
        if response is None:
            if not data:
                return
            response = await self._open()
            data = self._head + data
        await response.write_eof(data)

    async def __aenter__(self) -> SSEChannel:
        if self._keepalive:
            # A timer, not a task per stream: most answers end long before the first keep-alive is due.
            self._timer = asyncio.get_running_loop().call_at(self._last + self._keepalive, self._tick)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._comment is not None:
            self._comment.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._comment

    def _tick(self) -> None:
        assert self._keepalive is not None
        due = self._last + self._keepalive
        now = self._clock()
        if now >= due:
            if self._comment is None and not self._opening:
                self._comment = asyncio.get_running_loop().create_task(self._send_comment())
            due = now + self._keepalive
        self._timer = asyncio.get_running_loop().call_at(due, self._tick)

    async def _send_comment(self) -> None:
        try:
            with contextlib.suppress(ConnectionResetError):
                await self.send(KEEPALIVE_COMMENT)
        finally:
            self._comment = None


async def relay(channel: SSEChannel, reads: AsyncIterator[list[Item]], encoder: StreamEncoder,
                ended: Callable[[], bool] = lambda: False) -> None:
    """Send the items of every upstream read (see :meth:`ChatStream.reads`) in one write, then the end;
    errors before the first byte propagate, later ones are sent in-band by the caller
    (``channel.started`` tells which).

    ``ended()`` tells whether a read is the answer's last, with nothing more to wait for: it then goes
    out with the end of the body, once the stream has ended (a short answer, head and all, in a single
    write)."""
    send = channel.send
    last = b""
    async with channel:
        async for read in reads:
            data = encode_read(encoder, read)
            if ended():
                last += data
            elif data:
                await send(data)
    await channel.close(last + encoder.finish())


def encode_read(encoder: StreamEncoder, read: list[Item]) -> bytes:
    """The bytes of one read's items: each run of plain texts (nearly every read is one) encoded at once."""
    if only_texts(read):
        return encoder.encode_texts(read)
    parts: list[bytes] = []
    for texts, events in runs(read):
        parts.append(encoder.encode_texts(texts) if texts else b"".join(map(encoder.encode, events)))
    return b"".join(parts)
