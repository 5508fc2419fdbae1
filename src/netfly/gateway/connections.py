"""Guarding the gateway's connections against slow, idle and too many clients.

aiohttp.web reads a request head and body for as long as the client likes, and accepts every
connection. :class:`ConnectionGuard` sits between the listening socket and aiohttp's protocol:

- **header timeout**: a request head (request line and headers) must arrive within
  ``header_timeout`` of the connection, or of its first byte on a kept-alive connection; else the
  client gets a 408 (a silent close if it sent nothing) and the connection is closed;
- **body timeout**: the whole request body must arrive within ``body_timeout`` of the end of the
  head; else the handler reading it gets a 408 error and the connection is closed after it;
- **idle timeout**: aiohttp's own ``keepalive_timeout`` closes a connection idle between requests;
- **connection cap**: past ``max_connections`` open connections, a new one gets a 503 and is closed.

Nothing times out once a request has been read: an answer streamed to a slow reader is never cut.
Unlike nginx's ``client_body_timeout`` (a limit between two reads), the body limit covers the whole
body, so a client sending one byte a second cannot hold a connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from .. import _json
from ..errors import ConfigurationError
from .errors import ErrorInfo, GatewayError

logger = logging.getLogger("netfly.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_HEADER_TIMEOUT = 60.0  # nginx: client_header_timeout 60s
DEFAULT_BODY_TIMEOUT = 60.0  # nginx: client_body_timeout 60s (there between reads; here the whole body)
DEFAULT_KEEPALIVE_TIMEOUT = 75.0  # nginx: keepalive_timeout 75s
# Each streaming client also holds an upstream connection: 512 stays under the common 1024 file limit.
DEFAULT_MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request, and how many may be connected at once."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
        count = self.max_connections
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"max_connections must be a positive whole number, got {count!r}")


class RequestBodyTimeout(GatewayError, asyncio.TimeoutError):
    """Set on a request body that did not arrive in time; the handler reading it answers 408.

    An ``asyncio.TimeoutError`` so that aiohttp, draining the unread body after the answer, stops
    quietly and closes the connection.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s", code="request_timeout")


class ConnectionGuard:
    """The protocol factory of a listening socket, and the middleware that tells it a head was read."""

    def __init__(self, limits: ConnectionLimits, make_protocol: Callable[[], asyncio.Protocol]) -> None:
        self.limits = limits
        self._make_protocol = make_protocol
        self._connections: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self._count = 0  # counted in the factory: several connections can be accepted in one loop turn
        self._warned_full = False

    @property
    def open_connections(self) -> int:
        return self._count

    def __call__(self) -> asyncio.Protocol:
        if self._count >= self.limits.max_connections:
            if not self._warned_full:
                self._warned_full = True
                logger.warning("%d connections open (max_connections): refusing new ones with 503 until one closes",
                               self._count)
            return _Refused()
        self._count += 1
        return _GuardedConnection(self, self._make_protocol())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The head is read: stop its timer, and time the body until it has all arrived."""
        connection = self._connections.get(request.transport) if request.transport else None
        if connection is not None:
            connection.head_received()
        timer = None
        if not request.content.is_eof():
            timer = asyncio.get_running_loop().call_later(self.limits.body_timeout, self._body_late, request)
        try:
            return await handler(request)
        finally:
            if timer is not None:
                timer.cancel()
            if connection is not None:
                connection.request_done()

    def _body_late(self, request: web.Request) -> None:
        if request.content.is_eof():
            return
        logger.info("request body from %s not received within %g s (body_timeout): answering 408",
                    _peer(request.transport), self.limits.body_timeout)
        request.content.set_exception(RequestBodyTimeout(self.limits.body_timeout))

    def _opened(self, transport: asyncio.BaseTransport, connection: _GuardedConnection) -> None:
        self._connections[transport] = connection

    def _closed(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._connections.pop(transport, None)
        self._count -= 1
        if self._count < self.limits.max_connections:
            self._warned_full = False


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a timer on the request head."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._partial = False  # bytes of a head not yet complete have arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not always an asyncio.Transport subclass (uvloop's is not).
        self._transport = transport = cast(asyncio.Transport, transport)
        self._guard._opened(transport, self)
        self._start_head_timer()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_request:
            if self._timer is None:
                self._start_head_timer()  # first byte after an idle keep-alive period
            self._partial = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._guard._closed(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def head_received(self) -> None:
        self._cancel_timer()
        self._in_request = True
        self._partial = False

    def request_done(self) -> None:
        # Idle until the next request's first byte: aiohttp's keepalive_timeout applies meanwhile.
        self._in_request = False

    def _start_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.header_timeout, self._head_late)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        transport = self._transport
        if self._in_request or transport is None or transport.is_closing():
            return
        seconds = self._guard.limits.header_timeout
        if self._partial:
            logger.info("request head from %s not received within %g s (header_timeout): closing",
                        _peer(transport), seconds)
            info = ErrorInfo(408, f"request head not received within {seconds:g} s", "invalid_request_error",
                             code="request_timeout")
            transport.write(_raw_response(info, "Request Timeout"))
        transport.close()


class _Refused(asyncio.Protocol):
    """A connection over the cap: told 503 at once, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        info = ErrorInfo(503, "too many open connections to this gateway; retry shortly", "server_error",
                         code="too_many_connections", retry_after=1)
        transport.write(_raw_response(info, "Service Unavailable"))
        transport.close()


def _raw_response(info: ErrorInfo, reason: str) -> bytes:
    """A whole HTTP/1.1 answer, for a connection aiohttp never handles."""
    body = _json.dumps(info.body())
    head = [f"HTTP/1.1 {info.status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in info.headers().items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _peer(transport: Any) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"
