"""netfly's HTTP/1.1 server, the wire side: one ``asyncio.Protocol`` per connection, httptools (llhttp).

Each request runs in one task of its own (its handler's), cancelled at once when the client goes
away. The head is parsed by llhttp, which rejects the shapes that smuggle requests (Content-Length
with Transfer-Encoding, two Content-Lengths, bad chunk sizes, bare LFs); it is bounded here to
:data:`MAX_LINE` bytes a line (aiohttp's limit), :data:`MAX_HEAD` in all and :data:`MAX_HEADERS`
fields, and in time by the :class:`~.connections.ConnectionLimits`. A body is kept up to the app's
limit, and only while its whole arrives within the body timeout. Keep-alive is HTTP/1.1's default
(HTTP/1.0's on request); pipelined requests are answered in order, reading paused while one waits.
An answer to a slow reader holds its handler back (``pause_writing``, past :data:`_WRITE_HIGH`
bytes unsent), never piling up in memory; a client that sends requests but reads no answers is not
read either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from .._http1 import MAX_HEAD, MAX_LINE
from .connections import RequestBodyTimeout, date_line, peer_of, raw_response
from .errors import ErrorInfo
from .web import REASONS, Headers, HTTPError, Request, Response, StreamResponse, text_response

if TYPE_CHECKING:
    from .server import Listener

logger = logging.getLogger("netfly.gateway")

MAX_HEADERS = 128
MAX_PIPELINED = 16  # requests parsed ahead of their turn; past that, the connection ends after them
LINGER_BYTES = 16 * 1024 * 1024  # an unread body drained after the answer (so the client sees it), at most
_WRITE_HIGH, _WRITE_LOW = 128 * 1024, 32 * 1024  # unsent bytes of a connection (aiohttp's: ~64 + 64 KiB)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY = frozenset((204, 304))
# What a timer of the connection is waiting for.
_HEAD, _BODY, _IDLE = 1, 2, 3


class _Refusal(Exception):
    """A request the protocol answers itself, and then closes the connection."""

    def __init__(self, status: int, message: str, code: str = "malformed_request") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Connection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, handled and answered in turn."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.app = listener.app
        self.limits = listener.limits
        self.loop = listener.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "a client"
        self.paused = False  # writing: the client reads slower than we write
        self.task: asyncio.Task[None] | None = None
        self.current: Request | None = None  # the request being handled
        self.response: StreamResponse | None = None  # its streamed answer, once prepared
        self._answered = False  # the current request's head is fixed
        self._entered = False  # the current request's task has started
        self._keep = False  # the current answer leaves the connection open
        self._drain: asyncio.Future[None] | None = None
        self._reading = True
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # when the loop timer fires
        self._timer_kind = 0  # what the deadline is for (0: nothing)
        self._deadline = 0.0
        self._incoming: Request | None = None  # the request whose body is arriving
        self._lingering: Request | None = None  # answered, its unread body drained before closing
        self._queue: deque[Request] = deque()
        self._stalled: Request | None = None  # answered, but the client has not read the answer yet
        self._stopped = False  # nothing more is parsed on this connection
        self._fault: _Refusal | None = None  # why a parser callback stopped the parser
        self._closing = False  # close after the current answer
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._fields: dict[str, str] = {}
        self._field_count = 0
        self._head_size = 0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        # A stream waits for its client only past HIGH bytes unsent, and goes on at LOW: a buffer that
        # never runs dry while the upstream is read (uvloop's own low mark is 16 bytes: a stall per pause).
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        self.peer = peer_of(transport)
        self.listener.connections.add(self)
        self._arm(self.limits.header_timeout, _HEAD)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._timer_kind == _IDLE:
            self._cancel_timer()  # the next request's first bytes: its head is timed from here
        if self._incoming is None:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop()  # the request before the upgrade is answered; what follows is not HTTP/1.1
        except httptools.HttpParserError as exc:
            if self._fault is not None and not self._fault.status:
                self._stop()  # parsed far enough ahead: nothing more is read on this connection
            else:
                self._malformed(self._fault or _Refusal(400, f"malformed HTTP request: {exc}"))
            return
        if self._in_head:
            if self._head_bytes > MAX_HEAD:
                self._malformed(_Refusal(431, f"request head larger than {MAX_HEAD} bytes", "head_too_large"))
            elif self.task is None and self._timer_kind != _HEAD:
                self._arm(self.limits.header_timeout, _HEAD)
        elif self._incoming is not None and self._incoming is self.current and self._timer_kind != _BODY:
            self._arm(self.limits.body_timeout, _BODY)  # a body still arriving after this read

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
        self.listener.closed(self)
        self.transport = None
        if self.task is not None:
            self.task.cancel()  # the client went away: its handler, and so its upstream request, stop now
            if not self._entered and self.current is not None:  # cancelled before it ran: no finally to run
                self._done(self.current)
        for request in (self._incoming, *self._queue):
            if request is not None:
                request.fail(ConnectionResetError("the client closed the connection"))
        self._queue.clear()
        self._wake_writer(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writer(None)
        stalled, self._stalled = self._stalled, None
        if stalled is not None:
            self._proceed(stalled)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url, self._fields, self._field_count, self._head_size = b"", {}, 0, 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            self._refuse(414, f"request target longer than {MAX_LINE} bytes", "head_too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_count += 1
        size = len(name) + len(value)
        self._head_size += size
        if size > MAX_LINE:
            self._refuse(431, f"header field longer than {MAX_LINE} bytes", "head_too_large")
        if self._field_count > MAX_HEADERS:
            self._refuse(431, f"more than {MAX_HEADERS} header fields", "head_too_large")
        if self._head_size > MAX_HEAD:  # a head that arrived in one read: counted here, not in data_received
            self._refuse(431, f"request head larger than {MAX_HEAD} bytes", "head_too_large")
        if self._incoming is not None:
            return  # a trailer field, after a chunked body: counted and bounded, not kept
        # aiohttp's decoding: bytes that are not UTF-8 survive as the bytes they are (a token compares right).
        self._fields.setdefault(name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._timer_kind == _HEAD:
            self._cancel_timer()
        if len(self._queue) >= MAX_PIPELINED:  # answer those, then close: the client sends the rest again
            self._refuse(0, "too many pipelined requests", "")
        request = self._request()
        self._incoming = request
        if self.current is None and not self._queue:
            self._dispatch(request)
            return
        self._queue.append(request)
        self._pause_reading()  # one request waits its turn: read no further ahead

    def on_body(self, body: bytes) -> None:
        request = self._incoming
        assert request is not None
        request.feed(body)
        if request is self._lingering and request.received > LINGER_BYTES:
            self.close()

    def on_message_complete(self) -> None:
        request, self._incoming = self._incoming, None
        assert request is not None
        request.finish()
        if self._timer_kind == _BODY:
            self._cancel_timer()
        if request is self._lingering:
            self.close()  # its answer said "Connection: close"

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._fault = _Refusal(status, message, code)
        raise self._fault  # stops the parser: feed_data raises HttpParserCallbackError

    def _request(self) -> Request:
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(505, f"HTTP/{version} is not supported: HTTP/1.1 only", "http_version_not_supported")
        fields = self._fields
        length = fields.get("content-length")
        target = self._url.decode("utf-8", "surrogateescape")
        if not target.startswith("/") and "://" in target:  # absolute-form: the path is what routes
            target = "/" + target.partition("://")[2].partition("/")[2]
        request = Request(self, parser.get_method().decode("ascii"), target, Headers(fields),
                          http10=version == "1.0", keep_alive=parser.should_keep_alive(),
                          content_length=int(length) if length is not None and "transfer-encoding" not in fields
                          else None, body_limit=self.app.client_max_size)
        if version == "1.1" and fields.get("expect", "").lower() == "100-continue":
            request.expect_continue = True
        return request

    # -- handling one request ----------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.current, self.response, self._answered, self._keep = request, None, False, False
        self._entered = False
        self.listener.started()
        self.task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        self._entered = True
        try:
            try:
                response = await self.app.resolve(request)(request)
            except HTTPError as exc:  # an app without the gateway's error middleware (the metrics app)
                response = text_response(f"{exc.status}: {exc.reason}", status=exc.status, headers=exc.headers)
            except Exception:
                logger.exception("unexpected error handling %s %s", request.method, request.raw_path)
                response = text_response("500: Internal Server Error", status=500)
            self._answer(request, response)
        except Exception:  # a response header with a line break, say: a bug, never sent
            logger.exception("unexpected error answering %s %s", request.method, request.raw_path)
            self.close()
        except asyncio.CancelledError:
            self.close()  # cut by the client's disconnect or by shutdown: whatever was written goes out first
            raise
        finally:
            self._done(request)

    def _answer(self, request: Request, response: StreamResponse) -> None:
        if response.prepared:
            if not response.finished:
                self._end_stream(response)
        elif not self._answered and self.transport is not None and not self.transport.is_closing():
            self.write_whole(request, response)

    def _end_stream(self, response: StreamResponse) -> None:
        with contextlib.suppress(ConnectionResetError):
            response.end()

    def write_whole(self, request: Request, response: StreamResponse) -> None:
        """Answer ``request`` with ``response`` (hooks run first): head and body in one write."""
        self.app.prepare(request, response)
        self._answered = True
        body = response.body if isinstance(response, Response) else b""
        status = response.status
        length = None if status in _NO_BODY or status < 200 else len(body)
        head = self._head(request, response, length, chunked=False)
        self.send(head if request.method == "HEAD" or length is None else head + body)

    def stream_head(self, request: Request, response: StreamResponse) -> tuple[bytes, bool]:
        """The head of a streamed answer (hooks run first), and whether its body goes in chunks."""
        self.app.prepare(request, response)
        self._answered = True
        self.response = response
        chunked = not request.http10  # HTTP/1.0 has no chunks: the body ends with the connection
        return self._head(request, response, None, chunked=chunked), chunked

    def _head(self, request: Request, response: StreamResponse, length: int | None, *, chunked: bool) -> bytes:
        keep = self._keep = (request.keep_alive and request.complete and not self._closing
                             and not self.listener.closing and (length is not None or chunked)
                             and not (self._stopped and not self._queue))
        status = response.status
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"]
        for name, value in response.headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"a line break in the value of response header {name!r}")
            lines.append(f"{name}: {value}\r\n")
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append(date_line())
        if not keep:
            lines.append("Connection: close\r\n")
        elif request.http10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _done(self, request: Request) -> None:
        """The handler ended: on to the next request, or idle, or closed."""
        self.task, self.current, self.response = None, None, None
        self.listener.finished()
        if self.paused and self._keep:  # a client that does not read its answers is not read either
            self._stalled = request
            self._pause_reading()
        else:
            self._proceed(request)

    def _proceed(self, request: Request) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not request.complete:
            self._linger(request)
        elif not self._keep:
            self.close()
        elif self._queue:
            self._next()
        elif self._stopped or self._closing:
            self.close()
        else:
            self._resume_reading()
            self._arm(*((self.limits.header_timeout, _HEAD) if self._in_head else
                        (self.limits.keepalive_timeout, _IDLE)))

    def _next(self) -> None:
        request = self._queue.popleft()
        if not self._queue and not self._stopped:
            self._resume_reading()
        if not request.complete:  # its body was cut off by the pause: timed from now
            self._arm(self.limits.body_timeout, _BODY)
        self._dispatch(request)

    def _linger(self, request: Request) -> None:
        """The answer went out before the body arrived: take the rest unread, then close (bounded)."""
        timed_out = isinstance(request.error, RequestBodyTimeout)
        told_to_send = not request.expect_continue  # a client waiting for "100 Continue" sends nothing
        remaining = None if request.content_length is None else request.content_length - request.received
        if timed_out or not told_to_send or (remaining or 0) > LINGER_BYTES or self._stopped:
            self.close()
            return
        request.discarding = True
        self._lingering = request
        self._resume_reading()
        if self._timer_kind != _BODY:
            self._arm(self.limits.body_timeout, _BODY)

    # -- what handlers call --------------------------------------------------------------------

    def want_body(self, request: Request) -> None:
        """A handler waits for the body: a client that asked first is told to send it."""
        if request.expect_continue and not self._answered:
            request.expect_continue = False
            self.send(_CONTINUE)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write: the connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        """Until the client has read enough of what was written."""
        if not self.paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def _wake_writer(self, error: BaseException | None) -> None:
        waiter = self._drain
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # -- faults, timers, closing -------------------------------------------------------------

    def _malformed(self, fault: _Refusal) -> None:
        """A request that cannot be parsed: answered and the connection closed; the requests before it
        are answered first, and then the connection closes."""
        self._stop()
        logger.info("bad request from %s: %s (status %d)", self.peer, fault.message, fault.status)
        incoming = self._incoming
        if incoming is not None and not incoming.complete:  # a body broken half-way: its handler gets the error
            incoming.fail(HTTPError(fault.status, fault.message))
        elif self.task is None and not self._queue:
            self._answer_fault(fault)

    def _answer_fault(self, fault: _Refusal) -> None:
        info = ErrorInfo(fault.status, fault.message, "invalid_request_error", code=fault.code)
        shape = self.app.error_shape
        error = shape(self._url.decode("latin-1"), info) if shape is not None else None  # the target read so far
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw_response(info, error))
        self.close()

    def _stop(self) -> None:
        self._stopped = True
        self._pause_reading()

    def _arm(self, delay: float, kind: int) -> None:
        """Time ``kind`` out ``delay`` seconds from now. One loop timer serves every deadline of the
        connection: it is moved only to an earlier time, so a kept-alive connection does not schedule
        (and cancel) a timer per request; one that fires early re-arms for the deadline."""
        deadline = self._deadline = self.loop.time() + delay
        self._timer_kind = kind
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._schedule(deadline)

    def _schedule(self, when: float) -> None:
        # The time is kept here: uvloop's call_at for a time already past returns a plain Handle,
        # which has no when().
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._expired)

    def _cancel_timer(self) -> None:
        self._timer_kind = 0  # the loop timer may still fire: it finds nothing to do

    def _expired(self) -> None:
        when, self._timer = self._timer_at, None
        kind = self._timer_kind
        if not kind or self.transport is None:
            return
        if self._deadline > when:  # moved on since this timer was set
            self._schedule(self._deadline)
            return
        self._timer_kind = 0
        if kind == _BODY:
            self._body_late()
        elif kind == _IDLE or self.task is None:
            self._head_late()

    def _head_late(self) -> None:
        if self._in_head:
            seconds = self.limits.header_timeout
            logger.info("request head from %s not received within %g s (header_timeout): closing", self.peer, seconds)
            self._answer_fault(_Refusal(408, f"request head not received within {seconds:g} s", "request_timeout"))
        else:
            self.close()  # nothing asked (or idle after an answer): nothing to answer

    def _body_late(self) -> None:
        request = self._incoming
        if request is None:
            return
        if request is self._lingering or request is not self.current:
            self.close()
            return
        logger.info("request body from %s not received within %g s (body_timeout): answering 408",
                    self.peer, self.limits.body_timeout)
        request.fail(RequestBodyTimeout(self.limits.body_timeout))

    def _pause_reading(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()

    def close_when_idle(self) -> None:
        self._closing = True
        if self.task is None:
            self.close()

    def close(self, *, abort: bool = False) -> None:
        """Close after what was written (or drop it: ``abort``)."""
        transport = self.transport
        if transport is not None:
            transport.abort() if abort else transport.close()

