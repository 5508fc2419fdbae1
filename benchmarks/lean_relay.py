"""The least a gateway can do without aiohttp: a yardstick for ``netfly serve`` in benchmarks/gateway.py.

    python benchmarks/lean_relay.py --port PORT --upstream http://127.0.0.1:UPSTREAM [--uvloop]

What benchmarks/aiohttp_relay.py does — each POST sent on to the upstream with the same path, body,
Content-Type and Authorization, the answer passed back unread as it arrives, keep-alive on both
sides — with the HTTP layer cut to the bone: an ``asyncio.Protocol`` server, a pool of keep-alive
``asyncio.Protocol`` connections to the upstream, HTTP/1.1 parsed by httptools (llhttp in C, what
uvicorn uses), no task or future per request, one write to the client per upstream read (the head
goes with the first body bytes, so a short answer is one write). No parsing of the answer, no
validation, no accounting, no logs. What this costs over talking to the upstream directly is the
floor of a gateway with a lean HTTP layer; its gap to the aiohttp relay is what aiohttp costs.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections import deque
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

import httptools

_PASSED_ON = (b"content-type", b"authorization")


class Request:
    """One request from a client, read whole: what the upstream is sent."""

    __slots__ = ("method", "target", "headers", "body", "keep_alive")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool) -> None:
        self.method, self.target, self.headers, self.body, self.keep_alive = method, target, headers, body, keep_alive


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


class Upstream:
    """Where requests go, and the idle keep-alive connections to it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"--upstream must be an http:// or https:// URL, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.encode()
        self.host_header = parts.netloc.encode()
        self.idle: list[UpstreamConnection] = []
        self.connecting: set[asyncio.Task[None]] = set()  # referenced, so not collected half-way

    def send(self, request: Request, client: ClientConnection) -> None:
        """On an idle connection at once; on a new one when none is idle."""
        while self.idle:
            connection = self.idle.pop()
            if connection.usable():
                connection.exchange(request, client)
                return
        task = asyncio.get_running_loop().create_task(self.connect_and_send(request, client))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def connect_and_send(self, request: Request, client: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port,
                                                         ssl=self.ssl)
        except OSError as exc:
            client.answer_error(502, f"upstream unreachable: {exc.strerror or exc}")
            return
        if client.open:
            connection.exchange(request, client)
        else:
            self.idle.append(connection)

    def request_bytes(self, request: Request) -> bytes:
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n" % (
            self.prefix + request.target, self.host_header, len(request.body))
        return b"".join((head, *(b"%s: %s\r\n" % header for header in request.headers), b"\r\n", request.body))


class ClientConnection(asyncio.Protocol):
    """One client's connection: requests parsed and answered in turn, answers written as they come."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.waiting: deque[Request] = deque()  # pipelined requests behind the one being answered
        self.answering: UpstreamConnection | None = None
        self.busy = False
        self.keep_alive = True
        self.head = b""  # the answer's head, not yet written: it goes out with the first body bytes
        self.started = False  # some of the answer is written
        self.chunked = False
        self.http10 = False
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.open = cast(asyncio.Transport, transport), True  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.answering is not None:  # the answer is half sent: that upstream connection cannot be reused
            self.answering.abandon()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep_alive = False
            if self.busy and self.transport is not None:  # mid-answer: no room for a 400
                self.transport.close()
            else:
                self.answer_error(400, "malformed HTTP request")

    # -- httptools callbacks for the request --

    def on_message_begin(self) -> None:
        self.target, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _PASSED_ON:
            self.headers.append((name, value))
        elif name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it otherwise

    def on_headers_complete(self) -> None:
        self.http10 = self.parser.get_http_version() == "1.0"

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.waiting.append(Request(self.parser.get_method(), self.target, self.headers, b"".join(self.body),
                                    self.parser.should_keep_alive()))
        if not self.busy:
            self.next_request()

    # -- the answer, driven by the upstream connection --

    def next_request(self) -> None:
        if not self.waiting or not self.open:
            return
        request = self.waiting.popleft()
        self.busy, self.keep_alive = True, request.keep_alive
        if request.method != b"POST":
            self.answer_error(405, "only POST is relayed")
        else:
            self.upstream.send(request, self)

    def begin(self, status: int, content_type: bytes, length: int | None) -> None:
        """The upstream's head: its length passed on, or the body re-chunked as it comes."""
        self.chunked = length is None and not self.http10
        if length is None and self.http10:  # no chunks in HTTP/1.0: the body ends with the connection
            self.keep_alive = False
        self.head = b"".join((
            status_line(status),
            b"Content-Type: %s\r\n" % content_type if content_type else b"",
            b"Content-Length: %d\r\n" % length if length is not None else
            b"Transfer-Encoding: chunked\r\n" if self.chunked else b"",
            b"" if self.keep_alive else b"Connection: close\r\n",
            b"\r\n",
        ))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if self.chunked:
            self.transport.write(b"".join((self.head, b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            self.transport.write(self.head + data if self.head else data)
        self.head, self.started = b"", True

    def end(self) -> None:
        assert self.transport is not None
        tail = b"0\r\n\r\n" if self.chunked else b""
        if self.head or tail:
            self.transport.write(self.head + tail)
        self.head = b""
        self.finished()

    def upstream_lost(self) -> None:
        """The upstream went away: a 502 if nothing was sent yet, else the client's connection is cut."""
        self.answering = None
        if not self.started:
            self.keep_alive = False
            self.answer_error(502, "upstream closed the connection")
        elif self.transport is not None:
            self.transport.close()

    def answer_error(self, status: int, message: str) -> None:
        if not self.open:
            return
        body = b'{"error":{"message":"%s","type":"relay_error"}}' % message.encode().replace(b'"', b"'")
        self.begin(status, b"application/json", len(body))
        self.send(body)
        self.finished()

    def finished(self) -> None:
        self.answering, self.busy, self.head, self.started = None, False, b"", False
        if not self.keep_alive:
            if self.transport is not None:
                self.transport.close()
        else:
            self.next_request()

    # -- backpressure: a slow client slows the upstream read --

    def pause_writing(self) -> None:
        if self.answering is not None:
            self.answering.pause()

    def resume_writing(self) -> None:
        if self.answering is not None:
            self.answering.resume()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream, answering one client request at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.closed = False
        self.paused = False
        self.pieces: list[bytes] = []
        self.content_type = b""
        self.length: int | None = None
        self.chunked = self.headed = self.complete = self.keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def exchange(self, request: Request, client: ClientConnection) -> None:
        assert self.transport is not None
        self.client, client.answering = client, self
        self.transport.write(self.upstream.request_bytes(request))

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nothing was asked: a confused upstream, not to be reused
            self.abandon()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abandon()
            client.upstream_lost()
            return
        if self.pieces:  # all the body bytes of this read in one write
            client.send(b"".join(self.pieces))
            self.pieces.clear()
        if self.complete:
            self.release()  # before the client goes on, so its next request can take this connection
            client.end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client, self.client = self.client, None
        if client is None:
            return
        if self.headed and self.length is None and not self.chunked:  # a body that ends with the connection
            if self.pieces:
                client.send(b"".join(self.pieces))
            client.end()
        else:
            client.upstream_lost()

    # -- httptools callbacks for the response --

    def on_message_begin(self) -> None:
        self.content_type, self.length, self.chunked = b"", None, False
        self.headed = self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name == b"content-length":
            self.length = int(value)
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.headed = True
        if self.client is not None:
            self.client.begin(self.parser.get_status_code(), self.content_type, self.length)

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete, self.keep_alive = True, self.parser.should_keep_alive()

    # -- the pool --

    def release(self) -> None:
        self.client, self.complete = None, False
        self.resume()
        if self.keep_alive and self.usable():
            self.upstream.idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        self.client, self.closed = None, True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()


async def serve(host: str, port: int, upstream: str) -> None:
    target = Upstream(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientConnection(target), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (libuv) instead of asyncio's loop")
    args = parser.parse_args()
    try:
        if args.uvloop:
            import uvloop

            uvloop.run(serve(args.host, args.port, args.upstream))
        else:
            asyncio.run(serve(args.host, args.port, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
