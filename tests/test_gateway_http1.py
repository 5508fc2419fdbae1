"""netfly's HTTP/1.1 server at the edges: raw sockets on 127.0.0.1 against the real gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from aiohttp import web

from netfly import OpenAICompatible
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.connections import ConnectionLimits
from netfly.gateway.server import Runner
from netfly.gateway.web import Request, Response

from .conftest import ScriptedServer, answer, chunk, sse, stream_bytes

TOKEN = "gw-token-http1-20b7"
AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()

Scripted = Callable[..., Awaitable[ScriptedServer]]


ON_BOTH_LOOPS = True  # every test here runs on asyncio's loop and on uvloop (see conftest)


class Served:
    def __init__(self, runner: Runner, upstream: ScriptedServer) -> None:
        self.runner = runner
        self.port = bound_port(runner)
        self.upstream = upstream

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


Launch = Callable[..., Awaitable[Served]]


@pytest.fixture
async def launch(scripted: Scripted) -> AsyncIterator[Launch]:
    runners: list[Runner] = []

    async def go(*script: Any, **options: Any) -> Served:
        upstream = await scripted(*(script or (_replying(answer("Hello ", "there.")),)))
        app = create_app(upstream.provider(OpenAICompatible), auth_token=TOKEN, **options)
        runner = await start(app, "127.0.0.1", 0, limits=ConnectionLimits(2, 2, 2, 50))
        runners.append(runner)
        return Served(runner, upstream)

    yield go
    for runner in runners:
        await runner.cleanup()


def _replying(body: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)
    return handler


def _post(body: bytes, *, path: bytes = b"/v1/chat/completions", version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/" + version + b"\r\nHost: 127.0.0.1\r\n" + AUTH + extra +
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _get(path: bytes, *, method: bytes = b"GET", version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/" + version + b"\r\nHost: 127.0.0.1\r\n" + AUTH + extra + b"\r\n"


async def _response(reader: asyncio.StreamReader, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One whole response: status, headers (lower-case names) and the body, de-chunked."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:] if line)}
    if method == "HEAD":
        return int(lines[0].split()[1]), headers, b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    else:
        body = await asyncio.wait_for(reader.read(-1), 10)  # the body ends with the connection
    return int(lines[0].split()[1]), headers, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 5) == b""


def _texts(events: bytes) -> str:
    out = ""
    for line in events.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                out += choice["delta"].get("content") or ""
    return out


# -- keep-alive, pipelining, HTTP/1.0, HEAD ---------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_on_one_connection(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(_get(b"/health") + _post(CHAT) + _get(b"/static/netfly.css") + _get(b"/nowhere"))
    health, stream, page, missing = [await _response(reader) for _ in range(4)]
    writer.close()
    assert (health[0], json.loads(health[2])["status"]) == (200, "ok")
    assert (stream[0], stream[1]["transfer-encoding"], _texts(stream[2])) == (200, "chunked", "Hello there.")
    assert stream[2].endswith(b"data: [DONE]\n\n")
    assert (page[0], page[1]["content-type"]) == (200, "text/css; charset=utf-8")
    assert (missing[0], json.loads(missing[2])["error"]["message"]) == (404, "Not Found: GET /nowhere")


async def test_requests_pipelined_too_far_ahead_are_left_unanswered_and_the_connection_closes(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(_get(b"/health") * 40)
    answers = [await _response(reader) for _ in range(17)]  # the one in flight and 16 read ahead
    assert [status for status, _, _ in answers] == [200] * 17
    assert answers[-1][1]["connection"] == "close" and "connection" not in answers[-2][1]
    assert await _closed(reader)
    writer.close()


_CHUNKED = {
    "three-chunks-in-pieces": [b"%x\r\n%s\r\n" % (len(p), p) for p in (CHAT[:10], CHAT[10:30], CHAT[30:])]
                              + [b"0\r\n\r\n"],
    "one-byte-chunks-and-a-trailer": [b"".join(b"1\r\n%c\r\n" % byte for byte in CHAT)
                                      + b"0\r\nX-Api-Key: forged\r\n\r\n"],
}


@pytest.mark.parametrize("pieces", list(_CHUNKED.values()), ids=list(_CHUNKED))
async def test_a_chunked_request_body_is_read_whole(launch: Launch, pieces: list[bytes]) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n")
    for piece in pieces:
        writer.write(piece)
        await asyncio.sleep(0.05)
    status, _, body = await _response(reader)
    writer.close()
    assert (status, _texts(body)) == (200, "Hello there.")
    assert served.upstream.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


async def test_expect_100_continue_is_answered_when_the_body_is_wanted(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    request = _post(CHAT, extra=b"Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    writer.write(head + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    status, _, events = await _response(reader)
    writer.close()
    assert (status, _texts(events)) == (200, "Hello there.")


@pytest.mark.parametrize(("extra", "status"), [(b"", 413), (b"bad-token", 401)], ids=["too-large", "bad-token"])
async def test_expect_100_continue_refused_before_the_body_is_sent(launch: Launch, extra: bytes, status: int) -> None:
    served = await launch(max_body_bytes=1000)
    reader, writer = await served.connect()
    head = _post(b"x" * (2000 if status == 413 else 10), extra=b"Expect: 100-continue\r\n").split(b"\r\n\r\n")[0]
    if extra:
        head = head.replace(TOKEN.encode(), extra)
    writer.write(head + b"\r\n\r\n")
    got, headers, _ = await _response(reader)  # the final answer at once: no "100 Continue" before it
    assert got == status and headers["connection"] == "close"
    assert await _closed(reader)  # the body the client was never told to send is not waited for
    writer.close()
    assert served.upstream.requests == []


async def test_http10_closes_after_the_answer_unless_asked_to_keep_it(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(_get(b"/health", version=b"1.0"))
    status, headers, _ = await _response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await _closed(reader)
    writer.close()
    reader, writer = await served.connect()
    for _ in range(2):
        writer.write(_get(b"/health", version=b"1.0", extra=b"Connection: keep-alive\r\n"))
        status, headers, _ = await _response(reader)
        assert (status, headers["connection"]) == (200, "keep-alive")
    writer.close()


async def test_a_stream_to_an_http10_client_is_not_chunked_and_ends_with_the_connection(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(_post(CHAT, version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    status, headers, events = await _response(reader)
    writer.close()
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert (status, _texts(events)) == (200, "Hello there.")
    assert events.endswith(b"data: [DONE]\n\n")


async def test_head_gets_the_head_of_get_without_a_body(launch: Launch) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(_get(b"/health", method=b"HEAD") + _get(b"/health"))
    status, headers, _ = await _response(reader, method="HEAD")
    assert status == 200 and int(headers["content-length"]) > 0 and "date" in headers
    status, headers, body = await _response(reader)  # right after the head: no body was sent
    assert status == 200 and json.loads(body)["status"] == "ok"
    writer.write(_get(b"/v1/chat/completions", method=b"HEAD"))
    assert (await _response(reader, method="HEAD"))[0] == 405
    writer.close()


async def test_a_response_header_with_a_line_break_is_never_sent(
    scripted: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await scripted(_replying(answer("Hello ", "there.")))
    app = create_app(upstream.provider(OpenAICompatible))

    async def forged(request: Request) -> Response:  # a bug that would let a value add a header of its own
        return Response(b"{}", headers={"X-Fine": "yes", "X-Note": "a\r\nSet-Cookie: forged=1"})

    app.add_get("/forged", forged)
    runner = await start(app, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bound_port(runner))
        writer.write(_get(b"/forged"))
        assert await asyncio.wait_for(reader.read(-1), 5) == b""  # nothing, the connection closed
        writer.close()
    finally:
        await runner.cleanup()
    assert "a line break in the value of response header 'X-Note'" in caplog.text


# -- malformed and oversized requests ---------------------------------------------------------------

_MALFORMED = {
    "not-http": b"HELLO THERE\r\n\r\n",
    "bare-lf": b"GET /health HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "space-in-name": b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n",
    "content-length-and-chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
    "two-content-lengths": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                           b"Content-Length: 50\r\n\r\nhello",
    "negative-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "folded-header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(_MALFORMED.values()), ids=list(_MALFORMED))
async def test_a_malformed_request_gets_400_and_the_connection_closes(
    launch: Launch, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly")
    served = await launch()
    reader, writer = await served.connect()
    writer.write(raw)
    status, headers, body = await _response(reader)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["message"].startswith("malformed HTTP request: ")
    assert await _closed(reader)  # nothing after it is read as a request: no smuggling
    writer.close()
    assert served.upstream.requests == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "bad request from 127.0.0.1:" in caplog.text


async def test_a_bad_chunk_size_fails_the_body_with_400(launch: Launch, caplog: pytest.LogCaptureFixture) -> None:
    served = await launch()
    reader, writer = await served.connect()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                 b"5\r\n{\"a\":\r\nzz\r\n")
    status, headers, body = await _response(reader)
    assert status == 400 and headers["connection"] == "close"
    assert "Invalid character in chunk size" in json.loads(body)["error"]["message"]
    assert await _closed(reader)
    writer.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_unsupported_http_version_gets_505(launch: Launch) -> None:
    reader, writer = await (await launch()).connect()
    writer.write(b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
    status, _, body = await _response(reader)
    writer.close()
    assert status == 505 and json.loads(body)["error"]["code"] == "http_version_not_supported"


_OVERSIZED = {
    "long-field": (_get(b"/health", extra=b"X-Long: " + b"a" * 8200 + b"\r\n"), 431,
                   "header field longer than 8190 bytes"),
    "many-fields": (_get(b"/health", extra=b"".join(b"X-F%d: v\r\n" % i for i in range(130))), 431,
                    "more than 128 header fields"),
    "large-head": (_get(b"/health", extra=b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))), 431,
                   "request head larger than 65536 bytes"),
    "long-target": (_get(b"/" + b"a" * 8200), 414, "request target longer than 8190 bytes"),
}


@pytest.mark.parametrize(("raw", "status", "message"), list(_OVERSIZED.values()), ids=list(_OVERSIZED))
async def test_an_oversized_head_is_refused_and_the_connection_closes(
    launch: Launch, raw: bytes, status: int, message: str
) -> None:
    reader, writer = await (await launch()).connect()
    writer.write(raw)
    got, _, body = await _response(reader)
    assert (got, json.loads(body)["error"]["message"]) == (status, message)
    assert await _closed(reader)
    writer.close()


_REFUSED_BEFORE_ANY_HANDLER = {
    "malformed": (_MALFORMED["content-length-and-chunked"], 400),
    "http-2": (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    **{name: (raw, status) for name, (raw, status, _) in _OVERSIZED.items()},
}


@pytest.mark.parametrize(("raw", "status"), list(_REFUSED_BEFORE_ANY_HANDLER.values()),
                         ids=list(_REFUSED_BEFORE_ANY_HANDLER))
async def test_a_request_refused_before_any_handler_is_answered_with_a_date(
    launch: Launch, raw: bytes, status: int
) -> None:
    reader, writer = await (await launch()).connect()
    writer.write(raw)
    got, headers, _ = await _response(reader)
    writer.close()
    assert got == status
    sent = parsedate_to_datetime(headers["date"])  # README: "every answer has a Date"
    assert abs(sent.timestamp() - time.time()) < 5


async def test_a_head_without_end_is_cut_at_the_head_limit_not_buffered(launch: Launch) -> None:
    served = await launch()
    _, writer = await served.connect()
    writer.write(b"GET /health HTTP/1.1\r\nX-Endless: ")
    sent = 0
    with pytest.raises(ConnectionError):  # the gateway stops reading and closes long before 4 MiB
        while sent < 4 * 1024 * 1024:
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536
            await asyncio.sleep(0.001)  # the gateway's turn to read
    assert sent < 1024 * 1024
    writer.close()


# -- answers to slow and vanishing readers ----------------------------------------------------------

_PIECE = "y" * 16384
_PIECES = 4000  # 64 MiB of text: more than the kernel's socket buffers on the way can hold


def _flood(progress: list[int]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), done=False))
        event = sse(chunk(_PIECE), done=False)
        for _ in range(_PIECES):
            await response.write(event)
            progress[0] += 1
        await response.write(sse(chunk(finish="stop")))
        await response.write_eof()
        return response
    return handler


async def _stalled(served: Served, progress: list[int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream whose client reads nothing, once the gateway has stopped sending it more."""
    reader, writer = await served.connect()
    writer.write(_post(CHAT))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    before = -1
    while before != progress[0]:  # until the upstream's writes stall too
        before = progress[0]
        await asyncio.sleep(0.3)
    return reader, writer


async def test_a_reader_that_stops_holds_the_upstream_back_in_bounded_memory(launch: Launch) -> None:
    progress = [0]
    served = await launch(_flood(progress))
    reader, writer = await _stalled(served, progress)
    assert progress[0] < _PIECES // 2  # held back by the client, not read ahead into the gateway
    (connection,) = served.runner.listener.connections
    assert connection.paused
    assert connection.transport is not None and connection.transport.get_write_buffer_size() < 1024 * 1024
    received = 0
    tail = b""
    while piece := await asyncio.wait_for(reader.read(1 << 20), 10):
        received += len(piece)
        tail = (tail + piece)[-64:]
        if tail.endswith(b"0\r\n\r\n"):
            break
    writer.close()
    assert progress[0] == _PIECES and received > _PIECES * len(_PIECE)
    assert b"data: [DONE]" in tail


async def test_a_reader_that_vanishes_while_held_back_cancels_the_upstream(
    launch: Launch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    progress = [0]
    served = await launch(_flood(progress))
    _, writer = await _stalled(served, progress)
    writer.transport.abort()
    started = time.monotonic()
    while served.upstream.disconnects == 0:
        assert time.monotonic() - started < 2, "the upstream request was never cancelled"
        await asyncio.sleep(0.01)
    assert progress[0] < _PIECES
    while "POST /v1/chat/completions 499 " not in caplog.text:
        assert time.monotonic() - started < 2, caplog.text
        await asyncio.sleep(0.01)
    assert "client disconnected" in caplog.text


async def test_a_client_that_sends_requests_but_reads_no_answers_is_not_read_either(
    launch: Launch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    served = await launch()
    reader, writer = await served.connect()
    ask = _get(b"/static/vendor/marked.umd.js")  # ~52 KiB an answer: 2,000 are ~100 MiB
    for _ in range(125):
        if writer.transport.is_closing():  # the server closed it (uvloop refuses a write then)
            break
        writer.write(ask * 16)
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.3)
    # Stalled (or, past 16 requests read ahead at once, closed after answering those): either way
    # no pile of answers in memory.
    unsent = [c.transport.get_write_buffer_size() for c in served.runner.listener.connections if c.transport]
    assert all(size < 1024 * 1024 for size in unsent), unsent
    assert caplog.text.count("GET /static/vendor/marked.umd.js 200 ") < 1000  # the rest wait, unread
    writer.transport.abort()
    assert reader is not None


async def test_clients_that_reset_right_after_asking_leave_nothing_in_flight(launch: Launch) -> None:
    served = await launch()
    for _ in range(20):
        _, writer = await served.connect()
        writer.write(_post(CHAT) + _get(b"/health"))
        writer.transport.abort()
    listener = served.runner.listener
    started = time.monotonic()
    while listener.in_flight or listener.connections:
        assert time.monotonic() - started < 2, (listener.in_flight, len(listener.connections))
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await served.runner.cleanup()  # nothing to wait for: not the 10 s grace
    assert time.monotonic() - started < 1
