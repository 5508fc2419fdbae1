"""Guarding the gateway's connections against slow, idle and too many clients.

:class:`ConnectionLimits` are enforced by the server's protocol (:mod:`.http1`), per connection:

- **header timeout**: a request head (request line and headers) must arrive within
  ``header_timeout`` of the connection, or of its first byte on a kept-alive connection; else the
  client gets a 408 (a silent close if it sent nothing) and the connection is closed;
- **body timeout**: the whole request body must arrive within ``body_timeout`` of the end of the
  head; else the handler reading it gets a 408 error and the connection is closed after it;
- **idle timeout**: a connection idle between requests for ``keepalive_timeout`` is closed;
- **connection cap**: past ``max_connections`` open connections, a new one gets a 503 and is closed.

Nothing times out once a request has been read: an answer streamed to a slow reader is never cut.
Unlike nginx's ``client_body_timeout`` (a limit between two reads), the body limit covers the whole
body, so a client sending one byte a second cannot hold a connection.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from .. import _json
from ..errors import ConfigurationError
from .errors import ErrorInfo, GatewayError

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


class RequestBodyTimeout(GatewayError):
    """Set on a request body that did not arrive in time; the handler reading it answers 408."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s", code="request_timeout")


def raw_response(info: ErrorInfo, error: dict[str, Any] | None = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for a request no handler sees; ``error``:
    its JSON body (default: OpenAI's error object)."""
    body = _json.dumps(info.body() if error is None else error)
    head = [f"HTTP/1.1 {info.status} {HTTPStatus(info.status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", date_line().rstrip(), "Connection: close"]
    head += [f"{name}: {value}" for name, value in info.headers().items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _DateLine:
    """The ``Date`` header line of every answer (RFC 9110 6.6.1), made once a second."""

    second = 0
    line = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.line = second, f"Date: {formatdate(second, usegmt=True)}\r\n"
        return cls.line


date_line = _DateLine.now


def peer_of(transport: asyncio.BaseTransport | Any) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"
