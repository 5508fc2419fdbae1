"""The gateway against slow, idle and too many clients: raw sockets on 127.0.0.1, small timeouts."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from netfly import ConfigurationError, OpenAICompatible
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.connections import ConnectionLimits
from netfly.gateway.server import Runner

from .conftest import ScriptedServer, chunk, sse, stream_bytes

TOKEN = "gw-token-limits-41d7"
FAST = ConnectionLimits(header_timeout=0.5, body_timeout=0.5, keepalive_timeout=0.6, max_connections=50)
SLACK = 0.5  # scheduling slack on top of a timeout

Scripted = Callable[..., Awaitable[ScriptedServer]]
Launch = Callable[..., Awaitable[int]]


ON_BOTH_LOOPS = True  # every test here runs on asyncio's loop and on uvloop (see conftest)


@pytest.fixture
async def launch(scripted: Scripted) -> AsyncIterator[Launch]:
    """Start the gateway (production ``start``) over a scripted upstream; returns its port."""
    runners: list[Runner] = []

    async def go(*script: Any, limits: ConnectionLimits = FAST) -> int:
        upstream = await scripted(*(script or (_answer_slowly(1, 0.0),)))
        app = create_app(upstream.provider(OpenAICompatible), auth_token=TOKEN)
        runner = await start(app, "127.0.0.1", 0, limits=limits)
        runners.append(runner)
        return bound_port(runner)

    yield go
    for runner in runners:
        await runner.cleanup()


def _answer_slowly(pieces: int, delay: float) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        slices = [sse(chunk(role="assistant"), done=False)]
        slices += [sse(chunk(f"p{i} "), done=False) for i in range(pieces)]
        slices.append(sse(chunk(finish="stop")))
        return await stream_bytes(request, *slices, delay=delay)

    return handler


def _request(body: bytes, *, path: str = "/v1/chat/completions", token: bytes = TOKEN.encode()) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token +
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


async def _read_until_closed(reader: asyncio.StreamReader, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(-1), limit)
    return data, time.monotonic() - started


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _status_and_json(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# -- slow request heads and bodies ------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(launch: Launch) -> None:
    reader, writer = await _connect(await launch())
    data, took = await _read_until_closed(reader)
    writer.close()
    assert data == b""  # nothing was asked, so nothing is answered
    assert FAST.header_timeout - 0.05 <= took <= FAST.header_timeout + SLACK


@pytest.mark.parametrize("partial", [b"POST /v1/chat/compl", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["request-line-unfinished", "headers-unfinished"])
async def test_an_unfinished_head_gets_408_and_is_closed(
    launch: Launch, partial: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    reader, writer = await _connect(await launch())
    writer.write(partial)
    data, took = await _read_until_closed(reader)
    writer.close()
    status, body = _status_and_json(data)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert body["error"]["message"] == "request head not received within 0.5 s"
    assert b"Connection: close" in data
    assert took <= FAST.header_timeout + SLACK
    assert "request head from 127.0.0.1:" in caplog.text and "(header_timeout)" in caplog.text


async def test_a_head_sent_one_byte_at_a_time_is_cut_at_the_header_timeout(launch: Launch) -> None:
    reader, writer = await _connect(await launch())
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    data, took = await _read_until_closed(reader)
    sender.cancel()
    writer.close()
    assert _status_and_json(data)[0] == 408
    assert took <= FAST.header_timeout + SLACK


async def test_a_body_sent_one_byte_at_a_time_gets_408_within_the_body_timeout(
    launch: Launch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    reader, writer = await _connect(await launch())
    request = _request(CHAT)
    head, body = request[: request.index(b"\r\n\r\n") + 4], request[request.index(b"\r\n\r\n") + 4 :]
    writer.write(head)

    async def trickle() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    data, took = await _read_until_closed(reader)
    sender.cancel()
    writer.close()
    status, error = _status_and_json(data)
    assert status == 408
    assert error["error"]["message"] == "request body not received within 0.5 s"
    assert error["error"]["code"] == "request_timeout"
    assert took <= FAST.body_timeout + SLACK
    assert "POST /v1/chat/completions 408 " in caplog.text
    assert "unexpected error" not in caplog.text and "Unhandled exception" not in caplog.text


async def test_a_body_whose_deadline_passed_while_the_loop_stalled_still_gets_408(launch: Launch) -> None:
    # One loop timer serves the head's deadline (0.5 s from the connection) and then the body's (0.6 s):
    # it fires for the first, finds the second ahead and re-arms. A loop stalled past both (a GC pause,
    # a CPU hog) re-arms for a time already past, which on uvloop gives a plain Handle without when().
    limits = ConnectionLimits(header_timeout=0.5, body_timeout=0.5, keepalive_timeout=5, max_connections=5)
    reader, writer = await _connect(await launch(limits=limits))
    await asyncio.sleep(0.1)
    writer.write(_request(CHAT)[:-1])  # all but the body's last byte
    await asyncio.sleep(0.3)
    time.sleep(0.4)  # the loop stalls from 0.4 s to 0.8 s
    data, _ = await _read_until_closed(reader, limit=5)
    writer.close()
    status, error = _status_and_json(data)
    assert status == 408 and error["error"]["code"] == "request_timeout"


async def test_a_body_that_arrives_in_time_in_pieces_is_served(launch: Launch) -> None:
    reader, writer = await _connect(await launch())
    request = _request(CHAT)
    for piece in (request[:40], request[40:200], request[200:]):
        writer.write(piece)
        await asyncio.sleep(0.1)  # 0.2 s in all: within both timeouts
    data = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n"), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"p0 " in data


# -- slow readers and idle keep-alive ---------------------------------------------------------------


async def test_a_slow_honest_reader_of_a_long_stream_is_never_cut(launch: Launch) -> None:
    # The answer takes about 2 s (four times every limit) and is read in small sips with pauses.
    port = await launch(_answer_slowly(20, 0.1))
    reader, writer = await _connect(port)
    writer.write(_request(CHAT))
    received = b""
    started = time.monotonic()
    while b"data: [DONE]" not in received:
        piece = await asyncio.wait_for(reader.read(64), 5)
        assert piece, f"the stream was cut after {time.monotonic() - started:.1f} s"
        received += piece
        await asyncio.sleep(0.02)
    writer.close()
    assert time.monotonic() - started > 4 * FAST.header_timeout
    assert all(f"p{i} ".encode() in received for i in range(20))


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(launch: Launch) -> None:
    reader, writer = await _connect(await launch())
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    data, took = await _read_until_closed(reader)
    writer.close()
    assert data == b""
    assert FAST.keepalive_timeout - 0.05 <= took <= FAST.keepalive_timeout + SLACK


async def test_a_second_request_on_a_kept_alive_connection_gets_its_own_header_timeout(launch: Launch) -> None:
    # aiohttp's idle timer runs from the end of the last answer, whatever arrives after: make it long here.
    reader, writer = await _connect(await launch(limits=ConnectionLimits(0.5, 0.5, 5.0, 50)))
    ask = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    for _ in range(2):
        writer.write(ask)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        await asyncio.sleep(0.3)  # idle, under the keep-alive timeout
    writer.write(b"GET /health HTTP/1.1\r\n")  # a third head that never ends
    data, took = await _read_until_closed(reader)
    writer.close()
    assert _status_and_json(data)[0] == 408
    assert took <= FAST.header_timeout + SLACK


# -- the connection cap -----------------------------------------------------------------------------


async def test_connections_over_the_cap_get_503_and_a_freed_slot_is_reused(
    launch: Launch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(header_timeout=5, body_timeout=5, keepalive_timeout=5, max_connections=3)
    port = await launch(limits=limits)
    held = [await _connect(port) for _ in range(3)]
    await asyncio.sleep(0.05)
    refused = []
    for _ in range(2):
        reader, writer = await _connect(port)
        data, _ = await _read_until_closed(reader, 5)
        writer.close()
        refused.append(_status_and_json(data))
        assert b"\r\nDate: " in data.partition(b"\r\n\r\n")[0]  # every answer has a Date, this one too
    assert [status for status, _ in refused] == [503, 503]
    assert refused[0][1]["error"]["code"] == "too_many_connections"
    assert caplog.text.count("refusing new ones with 503") == 1  # warned once, not per connection
    held[0][1].close()
    await asyncio.sleep(0.1)
    reader, writer = await _connect(port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    for _, other in held[1:]:
        other.close()


@pytest.mark.parametrize(("field", "bad"), [
    ("header_timeout", 0), ("body_timeout", -1.0), ("keepalive_timeout", float("inf")),
    ("header_timeout", float("nan")), ("body_timeout", "60"), ("max_connections", 0), ("max_connections", 2.5),
    ("max_connections", True),
])
def test_limits_are_checked(field: str, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{field} must be a positive (number of seconds|whole number), "):
        ConnectionLimits(**{field: bad})


def test_default_limits_follow_nginx() -> None:
    assert ConnectionLimits() == ConnectionLimits(60.0, 60.0, 75.0, 512)


async def test_serve_command_rejects_a_bad_limit_without_a_traceback(free_port: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netfly", "serve", "--port", str(free_port), "--url", "http://127.0.0.1:9/v1",
        "--header-timeout", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "header_timeout must be a positive number of seconds, got 0.0" in err.decode()
    assert "Traceback" not in err.decode()

