"""A lean HTTP/1.1 client for direct (proxy-less) requests: ``asyncio.Protocol`` + httptools (llhttp).

aiohttp's client costs about a quarter of the gateway's CPU per request (benchmarks/lean_relay.py);
this one does what netfly needs and no more: keep-alive connections pooled per origin, one write per
request, no task per request, a future and a timer only when a read has to wait. Failures are raised
as the aiohttp exceptions that ``transport.translate_client_error`` already turns into netfly errors,
so both clients fail with the same messages. :mod:`netfly.transport` decides which client a call uses.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import aiohttp
import httptools
from aiohttp.http import SERVER_SOFTWARE

# aiohttp's limits for a head's first line and a header field: a hostile peer cannot make netfly
# buffer an endless head (an upstream's, here; a client's, in the gateway's server). The whole head is
# bounded too (aiohttp allows 32768 fields of 8190 bytes).
MAX_LINE = 8190
MAX_HEAD = 64 * 1024
_PAUSE_AT = 128 * 1024  # unread body bytes that stop reading from the socket (aiohttp: 2 x 64 KiB)
_KEEP_IDLE = 15.0  # aiohttp's keepalive_timeout: servers drop idle connections, so do not trust old ones
_HAPPY_EYEBALLS_DELAY = 0.25  # aiohttp's: a broken IPv6 route must not eat the connect timeout
_BIG_BODY = 64 * 1024

Origin = tuple[str, str, int]  # scheme, host, port


class ConnectError(aiohttp.ClientConnectionError):
    """DNS, TCP or TLS failed; ``os_error`` says how (like aiohttp's ClientConnectorError)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error)
        self.os_error = os_error


class InvalidResponseError(aiohttp.ClientError):
    """The upstream's response is not valid HTTP/1.1: a malformed or too large head, an upgrade, a
    malformed chunked body."""


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # loading the CA store takes milliseconds: once per process


def _eyeballs(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """Happy eyeballs where the loop has it: asyncio's does, uvloop's ``create_connection`` rejects the
    arguments (it tries the addresses in turn)."""
    if isinstance(loop, asyncio.BaseEventLoop):
        return {"happy_eyeballs_delay": _HAPPY_EYEBALLS_DELAY, "interleave": 1}
    return {}


def request_head(method: str, target: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and headers, with aiohttp's defaults for what the caller did not set."""
    return _head_before_length(method, target, host, tuple(headers.items())) + b"Content-Length: %d\r\n\r\n" % length


@functools.lru_cache(maxsize=64)  # a provider sends the same headers every time: built once
def _head_before_length(method: str, target: str, host: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    given = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: {host}")
    if "accept" not in given:
        lines.append("Accept: */*")
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: gzip, deflate")  # what _Decoder can undo
    if "user-agent" not in given:
        lines.append(f"User-Agent: {SERVER_SOFTWARE}")
    if "content-type" not in given:
        lines.append("Content-Type: application/octet-stream")
    lines.extend(f"{name}: {value}" for name, value in headers if name.lower() != "content-length")
    lines.append("")
    return "\r\n".join(lines).encode("utf-8")


class _Decoder:
    """Undoes ``Content-Encoding: gzip`` / ``deflate`` a bounded slice at a time (no zip bombs)."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: zlib._Decompress | None = None
        self.tail = b""

    def feed(self, raw: bytes, size: int) -> bytes:
        if self._zlib is None:
            # aiohttp's rule: "deflate" is zlib-wrapped when it says so, raw deflate otherwise.
            wbits = 16 + zlib.MAX_WBITS if self.encoding == "gzip" else (
                zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS)
            self._zlib = zlib.decompressobj(wbits=wbits)
        try:
            out = self._zlib.decompress(raw, size)
        except zlib.error as exc:
            raise aiohttp.ClientPayloadError(f"Can not decode content-encoding: {self.encoding}: {exc}") from None
        self.tail = self._zlib.unconsumed_tail
        return out

    def flush(self) -> bytes:
        return self._zlib.flush() if self._zlib is not None else b""


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.loop = pool.loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = self.busy = self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._idle: float | None = None
        self._deadline: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.status, self.reason, self.headers = 0, b"", cast(dict[str, str], {})
        self.head_done = self.complete = self.keep_alive = self._interim = False
        self.sized = False  # Content-Length or chunked: an early close cuts the body off
        self.error: BaseException | None = None
        self.body: deque[bytes] = deque()
        self.buffered = self.head_bytes = 0
        self.decoder: _Decoder | None = None
        self._fault: BaseException | None = None
        self._flushed = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: a confused server, not to be reused
            self.close(abort=True)
            return
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidResponseError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(self._fault or InvalidResponseError(f"invalid HTTP response: {exc}"))
        if not self.head_done and self.head_bytes > MAX_HEAD:
            self._fail(InvalidResponseError(f"response head larger than {MAX_HEAD} bytes"))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.busy and not self.complete and self.error is None:
            self.error = self._loss(exc)
        self._wake()

    def pause_writing(self) -> None:
        pass  # requests are written whole; the transport buffers a large one

    def resume_writing(self) -> None:
        pass

    def _loss(self, exc: Exception | None) -> BaseException | None:
        """What the end of the connection means for the response under way (None: its body ended)."""
        if not self.head_done:
            if isinstance(exc, OSError):
                return aiohttp.ClientOSError(*exc.args)
            return aiohttp.ServerDisconnectedError()
        if not self.sized and self.status not in (204, 304):  # a body that ends with the connection
            self.complete = True
            return None
        kind = "TransferEncodingError" if self.headers.get("transfer-encoding") else "ContentLengthError"
        what = "transfer" if kind == "TransferEncodingError" else "content"
        message = (f"Response payload is not completed: <{kind}: 400, "
                   f"message='Not enough data to satisfy {what} length header.'>")
        if exc is not None:
            message += f". {exc!r}"
        return aiohttp.ClientPayloadError(message)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self.complete:
            self._refuse("a second response to one request")
        self.reason, self.headers = b"", {}

    def on_status(self, status: bytes) -> None:
        self.reason += status
        if len(self.reason) > MAX_LINE:
            self._refuse(f"status line longer than {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_LINE:
            self._refuse(f"header field longer than {MAX_LINE} bytes")
        key = name.decode("latin-1").lower()
        self.headers[key] = value.decode("latin-1")
        if key in ("content-length", "transfer-encoding"):
            self.sized = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the real response follows
            return
        self.status, self.head_done = status, True
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "deflate"):
            self.decoder = _Decoder(encoding)

    def on_body(self, body: bytes) -> None:
        if body:
            self.body.append(body)
            self.buffered += len(body)
            if self.buffered > _PAUSE_AT and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete, self.keep_alive = True, self.parser.should_keep_alive()

    def _refuse(self, why: str) -> None:
        self._fault = InvalidResponseError(why)
        raise self._fault  # stops the parser: feed_data raises HttpParserCallbackError

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.close(abort=True)

    # -- waiting, bounded by the idle and total limits --

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the next bytes, the end or a failure; raises aiohttp's idle or a total timeout."""
        now = self.loop.time()
        idle_at = None if self._idle is None else now + self._idle
        deadline = self._deadline
        waiter = self._waiter = self.loop.create_future()
        timer = None
        if idle_at is not None or deadline is not None:
            total_first = idle_at is None or (deadline is not None and deadline <= idle_at)
            when = cast(float, deadline if total_first else idle_at)
            timer = self.loop.call_at(when, _expire, waiter, total_first)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    # -- one exchange --

    async def send(self, head: bytes, body: bytes, idle: float | None, deadline: float | None) -> None:
        """Write the request and wait for the final response head."""
        assert self.transport is not None
        self._reset()
        self.busy, self._idle, self._deadline = True, idle, deadline
        if len(body) < _BIG_BODY:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_raw(self, size: int) -> bytes:
        """Up to ``size`` body bytes as sent; b"" at the end."""
        while not self.body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        piece = self._take(size)
        self.buffered -= len(piece)
        if self.paused and self.buffered <= _PAUSE_AT // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return piece

    def _take(self, size: int) -> bytes:
        """Up to ``size`` of the buffered body bytes: every piece that has arrived, as aiohttp's reads
        do, so a burst of small chunks (an event each, from most servers) is handed on in one read."""
        body = self.body
        piece = body.popleft()
        if len(piece) >= size or not body:
            if len(piece) > size:
                body.appendleft(piece[size:])
                piece = piece[:size]
            return piece
        parts, taken = [piece], len(piece)
        while body and taken < size:
            piece = body.popleft()
            if taken + len(piece) > size:
                body.appendleft(piece[size - taken:])
                piece = piece[: size - taken]
            parts.append(piece)
            taken += len(piece)
        return b"".join(parts)

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, decoded; b"" at the end."""
        decoder = self.decoder
        if decoder is None:
            return await self.read_raw(size)
        while True:
            raw = decoder.tail or await self.read_raw(size)
            if not raw:
                if self._flushed:
                    return b""
                self._flushed = True
                return decoder.flush()
            out = decoder.feed(raw, size)
            if out:
                return out

    @property
    def at_end(self) -> bool:
        return self.complete and not self.body and (self.decoder is None or not self.decoder.tail)

    def release(self) -> None:
        """Back to the pool when its response was read to the end and it may be kept; else closed."""
        self.busy = False
        if self.at_end and self.keep_alive and not self.closed and self.error is None:
            self.pool.keep(self)
        else:
            self.close()

    def close(self, *, abort: bool = False) -> None:
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def _expire(waiter: asyncio.Future[None], total: bool) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError() if total else aiohttp.SocketTimeoutError())


class Pool:
    """Idle keep-alive connections per origin, for one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle: dict[Origin, list[Connection]] = {}
        self.live: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self, origin: Origin, head: bytes, body: bytes, *, connect: float | None, idle: float | None,
        remaining: float | None,
    ) -> Connection:
        """Send one request; the connection, its response head read, once the final head arrived."""
        deadline = None if remaining is None else self.loop.time() + remaining
        connection = self._idle_connection(origin) or await self._connect(origin, connect, deadline)
        try:
            await connection.send(head, body, idle, deadline)
        except BaseException:
            connection.close()
            raise
        return connection

    def _idle_connection(self, origin: Origin) -> Connection | None:
        idle = self.idle.get(origin)
        oldest = self.loop.time() - _KEEP_IDLE
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > oldest:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, connect: float | None, deadline: float | None) -> Connection:
        """A new connection; ``connect`` bounds DNS, TCP and TLS together."""
        now = self.loop.time()
        connect_at = None if connect is None else now + connect
        total_first = connect_at is None or (deadline is not None and deadline < connect_at)
        limit = deadline if total_first else connect_at
        try:
            connection = await asyncio.wait_for(self._open(origin), None if limit is None else limit - now)
        except asyncio.TimeoutError:
            raise (asyncio.TimeoutError() if total_first else aiohttp.ConnectionTimeoutError()) from None
        self.live.add(connection)
        return connection

    async def _open(self, origin: Origin) -> Connection:
        scheme, host, port = origin
        context = _default_ssl_context() if scheme == "https" else None
        try:
            _, connection = await self.loop.create_connection(
                lambda: Connection(self, origin), host, port, ssl=context,
                server_hostname=host if context is not None else None, **_eyeballs(self.loop),
            )
        except OSError as exc:  # socket.gaierror, refusals, TLS failures (ssl.SSLError is an OSError)
            raise ConnectError(exc) from None
        return connection

    def keep(self, connection: Connection) -> None:
        connection.idle_since = self.loop.time()
        self.idle.setdefault(connection.origin, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_KEEP_IDLE, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than a server is likely to keep them."""
        self._sweeper = None
        oldest = self.loop.time() - _KEEP_IDLE
        for idle in self.idle.values():
            for connection in [c for c in idle if c.idle_since <= oldest or c.closed]:
                idle.remove(connection)
                connection.close()
        if any(self.idle.values()):
            self._sweeper = self.loop.call_later(_KEEP_IDLE, self._sweep)

    def forget(self, connection: Connection) -> None:
        self.live.discard(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or in use (like closing an aiohttp session)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        connections, self.live, self.idle = list(self.live), set(), {}
        for connection in connections:
            connection.close(abort=True)
        if connections:
            await asyncio.sleep(0)  # let the transports finish closing before the loop may close
