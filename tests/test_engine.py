"""The engine end to end against real loopback servers: retries, timeouts, faults, pooling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from netfly import (
    AuthenticationError,
    BadRequestError,
    FreeNetfly,
    NetflyTimeoutError,
    OpenAICompatible,
    RateLimitError,
    ServerError,
    StreamDecodeError,
    StreamInterruptedError,
    Timeout,
    TransportError,
    UpstreamError,
)

from .conftest import ScriptedServer, answer, chunk, sse, stream_bytes

Start = Callable[..., Awaitable[ScriptedServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MESSAGES = [{"role": "user", "content": "hi"}]


# -- server-side building blocks -----------------------------------------------------------------


def ok(*pieces: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer(*pieces))

    return handler


def status(code: int, error: Any = None, **headers: str) -> Handler:
    """An error status with an OpenAI-style JSON body (or ``error`` verbatim when it is a string)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = error if isinstance(error, str) else json.dumps({"error": error or {"message": f"status {code}"}})
        return web.Response(status=code, text=body, content_type="application/json", headers=headers)

    return handler


def reset_connection(request: web.Request) -> None:
    """Reset the TCP connection (RST, not a polite FIN)."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def reset_before_first_byte(request: web.Request) -> web.StreamResponse:
    reset_connection(request)
    await asyncio.sleep(5)  # cancelled by the server once it notices the connection is gone
    raise AssertionError("unreachable")


class Watch:
    """What a handler saw: the disconnect of its client, the peers it served."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.peers: list[tuple[str, int]] = []

    def peer(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))

    def endless(self, period: float = 0.02) -> Handler:
        """A stream that never ends on its own: one chunk every ``period`` until the client leaves."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                n = 0
                while True:
                    await response.write(sse(chunk(f"t{n} "), done=False))
                    n += 1
                    await asyncio.sleep(period)
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnected.set()
                raise

        return handler

    def stall_after(self, prefix: bytes, seconds: float = 10.0) -> Handler:
        """Send ``prefix`` then go silent (headers are sent either way)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                if prefix:
                    await response.write(prefix)
                await asyncio.sleep(seconds)
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            return response

        return handler


async def collect(stream: AsyncIterator[str], into: list[str]) -> str:
    async for text in stream:
        into.append(text)
    return "".join(into)


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "netfly" and "retrying in" in r.getMessage()]


# -- the happy path, stats and result ------------------------------------------------------------


async def test_stream_yields_each_piece_and_reports_stats_and_result(scripted: Start) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    m = "served-model"
    body = sse(chunk(role="assistant", model=m), chunk("Hel", model=m), chunk("lo, ", model=m),
               chunk("мир", model=m), chunk(finish="stop", model=m), chunk(choices=False, usage=usage, model=m))

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)

    server = await scripted(handler)
    provider = server.provider()
    received: list[str] = []
    async with provider.stream("gpt-4", MESSAGES) as stream:
        async for text in stream:
            received.append(text)
    assert received == ["Hel", "lo, ", "мир"]
    assert stream.result is not None
    assert stream.result.text == "Hello, мир"
    assert stream.result.finish_reason == "stop"
    assert stream.result.usage == usage
    assert stream.result.model == "served-model"
    stats = stream.stats
    assert stats.provider == "FreeNetfly"
    assert stats.model == "served-model"
    assert [a.error for a in stats.attempts] == [None]
    assert (stats.chunks, stats.characters) == (3, len("Hello, мир"))
    assert stats.time_to_first_token is not None and stats.duration is not None
    assert 0 <= stats.time_to_first_token <= stats.duration
    assert server.requests[0]["model"] == "gpt-4"


async def test_complete_and_create_async(scripted: Start) -> None:
    server = await scripted(ok("Whole ", "answer"))
    provider = server.provider()
    result = await provider.complete(None, MESSAGES)
    assert (result.text, result.finish_reason, result.model) == ("Whole answer", "stop", "test-model")
    assert await provider.create_async(None, MESSAGES) == "Whole answer"


async def test_last_event_without_final_blank_line_or_done_is_delivered(scripted: Start) -> None:
    tail = b"data: " + json.dumps(chunk("end", finish="stop")).encode() + b"\n"  # then EOF

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, sse(chunk("start "), done=False), tail)

    server = await scripted(handler)
    result = await server.provider().complete(None, MESSAGES)
    assert (result.text, result.finish_reason) == ("start end", "stop")


async def test_split_writes_and_crlf_stream(scripted: Start) -> None:
    body = sse(chunk("Приве"), chunk("т 👋"), chunk(finish="stop"), eol="\r\n")

    async def handler(request: web.Request) -> web.StreamResponse:
        # One byte per write: CRLF pairs and UTF-8 characters are cut between TCP reads.
        return await stream_bytes(request, *(body[i : i + 1] for i in range(len(body))))

    server = await scripted(handler)
    assert await server.provider().create_async(None, MESSAGES) == "Привет 👋"


async def test_a_long_answer_is_exact_in_pieces_text_and_result(scripted: Start) -> None:
    # Thousands of pieces, so the stream keeps them as joined blocks: every view must stay exact.
    pieces = [f"{i}й{'.' * (i % 7)} " for i in range(1000)]
    server = await scripted(ok(*pieces))
    received: list[str] = []
    midway: list[str] = []
    async with server.provider().stream(None, MESSAGES) as stream:
        async for text in stream:
            received.append(text)
            if len(received) in (127, 128, 129, 500):
                midway.append(stream.text)
    expected = "".join(pieces)
    assert received == pieces
    assert midway == ["".join(pieces[:n]) for n in (127, 128, 129, 500)]
    assert stream.text == expected
    assert stream.result is not None and stream.result.text == expected
    assert (stream.stats.chunks, stream.stats.characters) == (1000, len(expected))


# -- retries before any text ---------------------------------------------------------------------


async def test_refused_port_is_retried_then_raises_transport_error(
    free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="netfly")
    provider = FreeNetfly.configure(url=f"http://127.0.0.1:{free_port}", retry_delay=0.01, max_retries=3)
    stream = provider.stream(None, MESSAGES)
    with pytest.raises(TransportError) as info:
        await collect(stream, [])
    assert not isinstance(info.value, NetflyTimeoutError)
    assert "cannot connect" in str(info.value)
    assert len(stream.stats.attempts) == 3
    assert all(a.error and "TransportError" in a.error for a in stream.stats.attempts)
    assert len(retry_warnings(caplog)) == 2


async def test_reset_before_first_byte_then_success(scripted: Start) -> None:
    server = await scripted(reset_before_first_byte, reset_before_first_byte, ok("recovered"))
    provider = server.provider(max_retries=3)
    stream = provider.stream(None, MESSAGES)
    assert await collect(stream, []) == "recovered"
    assert len(server.requests) == 3
    assert [a.error is not None for a in stream.stats.attempts] == [True, True, False]


async def test_reset_every_time_gives_up_with_transport_error(scripted: Start) -> None:
    server = await scripted(reset_before_first_byte)
    with pytest.raises(TransportError):
        await server.provider(max_retries=2).create_async(None, MESSAGES)
    assert len(server.requests) == 2


async def test_429_waits_for_retry_after_then_succeeds(scripted: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netfly")
    server = await scripted(status(429, {"message": "slow down"}, **{"Retry-After": "1"}), ok("after wait"))
    stream = server.provider(max_retries=3).stream(None, MESSAGES)
    started = time.monotonic()
    assert await collect(stream, []) == "after wait"
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 3.0  # retry_delay is 0.01 s: the wait is the server's
    assert len(server.requests) == 2
    assert [a.status for a in stream.stats.attempts] == [429, None]
    (warning,) = retry_warnings(caplog)
    assert "retrying in 1.00 s" in warning and "RateLimitError" in warning


async def test_429_with_retry_after_ms(scripted: Start) -> None:
    server = await scripted(status(429, None, **{"retry-after-ms": "300", "Retry-After": "30"}), ok("ok"))
    started = time.monotonic()
    assert await server.provider().create_async(None, MESSAGES) == "ok"
    assert 0.28 <= time.monotonic() - started < 2.0
    assert len(server.requests) == 2


async def test_429_with_retry_after_over_the_cap_is_not_waited_for(scripted: Start) -> None:
    server = await scripted(status(429, {"message": "quota exhausted"}, **{"Retry-After": "3600"}))
    started = time.monotonic()
    with pytest.raises(RateLimitError) as info:
        await server.provider().create_async(None, MESSAGES)
    assert time.monotonic() - started < 1.0
    assert (info.value.status, info.value.retry_after, info.value.message) == (429, 3600.0, "quota exhausted")
    assert len(server.requests) == 1


async def test_429_every_time_raises_rate_limit_error_after_all_attempts(scripted: Start) -> None:
    server = await scripted(status(429, {"message": "busy"}, **{"Retry-After": "0"}))
    with pytest.raises(RateLimitError, match="busy"):
        await server.provider(max_retries=3).create_async(None, MESSAGES)
    assert len(server.requests) == 3


async def test_503_then_success_logs_the_retry(scripted: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netfly")
    server = await scripted(status(503, {"message": "overloaded, try later"}), ok("fine"))
    assert await server.provider(max_retries=3).create_async(None, MESSAGES) == "fine"
    assert len(server.requests) == 2
    (warning,) = retry_warnings(caplog)
    # The delay and the cause, readable: "FreeNetfly: attempt 1/3 failed (ServerError: ... HTTP 503: ...)".
    assert "attempt 1/3 failed" in warning
    assert "ServerError" in warning and "HTTP 503" in warning and "overloaded, try later" in warning
    assert "retrying in 0.0" in warning


@pytest.mark.parametrize("code", [408, 409, 500, 502, 504])
async def test_other_retryable_statuses(scripted: Start, code: int) -> None:
    server = await scripted(status(code), ok("ok"))
    assert await server.provider().create_async(None, MESSAGES) == "ok"
    assert len(server.requests) == 2


async def test_503_every_time_raises_server_error_after_all_attempts(scripted: Start) -> None:
    server = await scripted(status(503, {"message": "down"}))
    stream = server.provider(max_retries=3).stream(None, MESSAGES)
    with pytest.raises(ServerError) as info:
        await collect(stream, [])
    assert (info.value.status, info.value.message) == (503, "down")
    assert len(server.requests) == 3
    assert [a.status for a in stream.stats.attempts] == [503, 503, 503]


async def test_backoff_doubles_between_attempts(scripted: Start) -> None:
    server = await scripted(status(500), status(500), ok("ok"))
    started = time.monotonic()
    assert await server.provider(retry_delay=0.2, max_retries=3).create_async(None, MESSAGES) == "ok"
    assert time.monotonic() - started >= (0.2 + 0.4) * 0.9  # 0.2 s, then 0.4 s, minus jitter


# -- failures that are not retried ---------------------------------------------------------------


async def test_400_fails_at_once_with_the_server_message(scripted: Start) -> None:
    server = await scripted(status(400, {"message": "model 'nope' does not exist", "type": "invalid_request_error"}))
    with pytest.raises(BadRequestError) as info:
        await server.provider().create_async(None, MESSAGES)
    assert info.value.status == 400
    assert info.value.message == "model 'nope' does not exist"
    assert "model 'nope' does not exist" in str(info.value) and "400" in str(info.value)
    assert len(server.requests) == 1


@pytest.mark.parametrize(("code", "body"), [(404, "Not Found"), (422, '{"detail": "messages: field required"}')])
async def test_other_4xx_fail_at_once(scripted: Start, code: int, body: str) -> None:
    server = await scripted(status(code, body))
    with pytest.raises(BadRequestError) as info:
        await server.provider().create_async(None, MESSAGES)
    assert info.value.status == code
    assert info.value.message == (body if code == 404 else "messages: field required")
    assert len(server.requests) == 1


@pytest.mark.parametrize("code", [401, 403])
async def test_auth_failure_fails_at_once_without_leaking_the_key(scripted: Start, code: int) -> None:
    key = "sk-test-0123456789abcdef"
    server = await scripted(status(code, {"message": f"Incorrect API key provided: {key}"}))
    provider = server.provider(OpenAICompatible, api_key=key)
    with pytest.raises(AuthenticationError) as info:
        await provider.create_async(None, MESSAGES)
    assert info.value.status == code
    assert "Incorrect API key provided" in info.value.message
    assert key not in str(info.value) and key not in info.value.message and key not in repr(info.value.body)
    assert server.headers[0]["Authorization"] == f"Bearer {key}"  # it was sent, just never shown
    assert len(server.requests) == 1


async def test_in_stream_error_before_text_raises_upstream_error(scripted: Start) -> None:
    body = sse(chunk(role="assistant"), {"error": {"message": "upstream model crashed", "code": 500}})

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)

    server = await scripted(handler)
    with pytest.raises(UpstreamError) as info:
        await server.provider().create_async(None, MESSAGES)
    assert info.value.message == "upstream model crashed"
    assert info.value.code == 500
    assert len(server.requests) == 1


async def test_in_stream_error_after_text_is_still_an_upstream_error(scripted: Start) -> None:
    body = sse(chunk("partial "), done=False) + b"event: error\ndata: {\"message\": \"context overflow\"}\n\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)

    server = await scripted(handler)
    received: list[str] = []
    with pytest.raises(UpstreamError, match="context overflow"):
        await collect(server.provider().create_async_generator(None, MESSAGES), received)
    assert received == ["partial "]
    assert len(server.requests) == 1


async def test_json_error_body_with_status_200_raises_upstream_error(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no capacity", "type": "server_error"}})

    server = await scripted(handler)
    with pytest.raises(UpstreamError) as info:
        await server.provider().create_async(None, MESSAGES)
    assert (info.value.message, info.value.type) == ("no capacity", "server_error")
    assert len(server.requests) == 1


async def test_html_page_instead_of_a_stream(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html><body>Just a moment...</body></html>", content_type="text/html")

    server = await scripted(handler)
    with pytest.raises(UpstreamError, match="HTML"):
        await server.provider().create_async(None, MESSAGES)
    assert len(server.requests) == 1


# -- malformed and oversized streams -------------------------------------------------------------


async def test_malformed_json_is_skipped_and_logged(scripted: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netfly")
    body = sse(chunk("a"), '{"choices": [{"delta": {"content": "b', chunk("c"), chunk(finish="stop"))

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)

    server = await scripted(handler)
    result = await server.provider().complete(None, MESSAGES)
    assert result.text == "ac"
    assert result.malformed_chunks == 1
    assert any("malformed" in r.getMessage() for r in caplog.records if r.name == "netfly")


async def test_malformed_json_raises_in_strict_mode(scripted: Start) -> None:
    body = sse(chunk("a"), "{not json", chunk("c"))

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, body)

    server = await scripted(handler)
    received: list[str] = []
    with pytest.raises(StreamDecodeError, match="invalid JSON"):
        await collect(server.provider().create_async_generator(None, MESSAGES, strict=True), received)
    assert received == ["a"]
    assert len(server.requests) == 1


async def test_an_event_over_max_event_bytes_raises_stream_decode_error(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, b"data: xxxxxxxx\n" * 64 + b"\n")

    server = await scripted(handler)
    with pytest.raises(StreamDecodeError, match="more than 256 bytes of data"):
        await server.provider().create_async(None, MESSAGES, max_event_bytes=256)
    assert len(server.requests) == 1


async def test_oversized_line_raises_stream_decode_error(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, b"data: " + b"x" * 4096 + b"\n\n")

    server = await scripted(handler)
    with pytest.raises(StreamDecodeError, match="longer than 1024 bytes"):
        await server.provider().create_async(None, MESSAGES, max_line_bytes=1024)
    assert len(server.requests) == 1


async def test_oversized_line_at_the_default_limit(scripted: Start) -> None:
    watch = Watch()

    async def handler(request: web.Request) -> web.StreamResponse:
        # A server spewing one endless line: the client must stop it at 1 MiB, not buffer it all.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(sse(chunk("ok "), done=False) + b"data: ")
            while True:  # until the client hangs up
                await response.write(b"y" * 65536)
        except (ConnectionResetError, asyncio.CancelledError):
            watch.disconnected.set()
            raise

    server = await scripted(handler)
    received: list[str] = []
    with pytest.raises(StreamDecodeError):
        await collect(server.provider().create_async_generator(None, MESSAGES), received)
    assert received == ["ok "]
    await asyncio.wait_for(watch.disconnected.wait(), 2.0)


# -- non-stream JSON reply -----------------------------------------------------------------------


async def test_whole_json_reply_is_yielded_once(scripted: Start) -> None:
    completion = {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "json-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "All at once."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(completion)

    server = await scripted(handler)
    received: list[str] = []
    async with server.provider().stream(None, MESSAGES) as stream:
        await collect(stream, received)
    assert received == ["All at once."]
    assert stream.result is not None
    assert (stream.result.finish_reason, stream.result.model) == ("stop", "json-model")
    assert stream.result.usage == completion["usage"]


# -- interrupted after text: never retried, never duplicated -------------------------------------


async def test_reset_after_partial_output_raises_interrupted_with_the_partial_text(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), chunk("Hello"), chunk(", wor"), done=False))
        await asyncio.sleep(0.2)  # let the client read those before the reset
        reset_connection(request)
        await asyncio.sleep(5)
        return response

    server = await scripted(handler, ok("SHOULD NOT BE SEEN"))
    received: list[str] = []
    with pytest.raises(StreamInterruptedError) as info:
        await collect(server.provider(max_retries=5).create_async_generator(None, MESSAGES), received)
    assert received == ["Hello", ", wor"]
    assert info.value.partial_text == "Hello, wor"
    assert isinstance(info.value.__cause__, TransportError)
    assert len(server.requests) == 1  # no retry once text was delivered


async def test_clean_close_mid_stream_is_an_interruption_too(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk("one "), chunk("two "), done=False))
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.close()  # FIN without the chunked terminator
        await asyncio.sleep(5)
        return response

    server = await scripted(handler, ok("SHOULD NOT BE SEEN"))
    stream = server.provider().stream(None, MESSAGES)
    received: list[str] = []
    with pytest.raises(StreamInterruptedError) as info:
        await collect(stream, received)
    assert received == ["one ", "two "]
    assert info.value.partial_text == "one two " == stream.text
    assert len(server.requests) == 1
    assert len(stream.stats.attempts) == 1


async def test_text_then_stall_past_idle_timeout_is_interrupted(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.stall_after(sse(chunk("Hello"), done=False)), ok("SHOULD NOT BE SEEN"))
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        await collect(server.provider().create_async_generator(None, MESSAGES, timeout=Timeout(idle=0.3)), received)
    elapsed = time.monotonic() - started
    assert received == ["Hello"]
    assert info.value.partial_text == "Hello"
    assert isinstance(info.value.__cause__, NetflyTimeoutError)
    assert info.value.__cause__.phase == "idle"
    assert 0.3 <= elapsed < 1.5
    assert len(server.requests) == 1
    await asyncio.wait_for(watch.disconnected.wait(), 1.0)


# -- timeouts ------------------------------------------------------------------------------------


async def test_idle_timeout_before_text_is_retried_then_raised(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.stall_after(b""))  # headers, then silence
    started = time.monotonic()
    with pytest.raises(NetflyTimeoutError) as info:
        await server.provider(max_retries=2).create_async(None, MESSAGES, timeout=Timeout(idle=0.3))
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert info.value.phase == "idle"
    assert len(server.requests) == 2
    assert 0.6 <= elapsed < 2.0  # two attempts of 0.3 s each, never a hang


async def test_idle_timeout_waiting_for_the_response_head(scripted: Start) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    server = await scripted(silent, ok("second attempt"))
    started = time.monotonic()
    assert await server.provider().create_async(None, MESSAGES, timeout=Timeout(idle=0.3)) == "second attempt"
    assert 0.3 <= time.monotonic() - started < 1.5
    assert len(server.requests) == 2


async def test_keep_alive_comments_reset_the_idle_timer(scripted: Start) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        pings = [b": ping\n\n"] * 6  # 6 x 0.15 s = 0.9 s in all, far over the 0.4 s idle limit
        return await stream_bytes(request, *pings, answer("patience"), delay=0.15)

    server = await scripted(slow)
    assert await server.provider().create_async(None, MESSAGES, timeout=Timeout(idle=0.4)) == "patience"
    assert len(server.requests) == 1


async def test_total_timeout_stops_a_server_that_never_answers(scripted: Start) -> None:
    async def pinger(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, *([b": ping\n\n"] * 100), delay=0.05)

    server = await scripted(pinger)
    started = time.monotonic()
    with pytest.raises(NetflyTimeoutError) as info:
        await server.provider().create_async(None, MESSAGES, timeout=Timeout(idle=1.0, total=0.5))
    assert info.value.phase == "total"
    assert 0.45 <= time.monotonic() - started < 1.5


async def test_total_timeout_after_text_is_an_interruption(scripted: Start) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, *(sse(chunk("x"), done=False) for _ in range(100)), delay=0.05)

    server = await scripted(trickle)
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        await collect(server.provider().create_async_generator(None, MESSAGES, timeout=0.5), received)
    assert 0.45 <= time.monotonic() - started < 1.5
    assert received and info.value.partial_text == "".join(received)
    assert isinstance(info.value.__cause__, NetflyTimeoutError)
    assert len(server.requests) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full accept queue")
async def test_connect_timeout_is_retried_then_raised() -> None:
    # A listener that never accepts, its queue full: the kernel drops further SYNs, so connect hangs.
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        provider = FreeNetfly.configure(url=f"http://127.0.0.1:{port}", retry_delay=0.01, max_retries=2)
        stream = provider.stream(None, MESSAGES, timeout=Timeout(connect=0.3, idle=5))
        started = time.monotonic()
        with pytest.raises(NetflyTimeoutError) as info:
            await collect(stream, [])
        elapsed = time.monotonic() - started
    assert info.value.phase == "connect"
    assert len(stream.stats.attempts) == 2
    assert 0.6 <= elapsed < 1.5


async def test_retry_after_beyond_the_total_timeout_is_not_waited_for(scripted: Start) -> None:
    server = await scripted(status(429, {"message": "later"}, **{"Retry-After": "5"}), ok("never"))
    started = time.monotonic()
    with pytest.raises(RateLimitError):
        await server.provider().create_async(None, MESSAGES, timeout=Timeout(total=1.0))
    assert time.monotonic() - started < 0.5
    assert len(server.requests) == 1


# -- closing: break and cancellation drop the connection at once ---------------------------------


async def test_break_out_of_the_seed_loop_closes_the_connection(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.endless())
    received: list[str] = []
    async for text in server.provider().create_async_generator(None, MESSAGES):
        received.append(text)
        if len(received) == 2:
            break
    await asyncio.wait_for(watch.disconnected.wait(), 1.0)
    assert received == ["t0 ", "t1 "]


async def test_leaving_async_with_closes_the_connection(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.endless())
    async with server.provider().stream(None, MESSAGES) as stream:
        async for _ in stream:
            break
    await asyncio.wait_for(watch.disconnected.wait(), 1.0)
    assert stream.text == "t0 "


async def test_aclose_of_the_generator_closes_the_connection(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.endless())
    generator = server.provider().create_async_generator(None, MESSAGES)
    assert await generator.__anext__() == "t0 "
    await generator.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(watch.disconnected.wait(), 1.0)


async def test_cancelling_the_consumer_closes_the_connection(scripted: Start) -> None:
    watch = Watch()
    server = await scripted(watch.stall_after(sse(chunk("first"), done=False), seconds=30), ok("next call"))
    received: list[str] = []
    task = asyncio.create_task(collect(server.provider().create_async_generator(None, MESSAGES), received))
    while not received:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(watch.disconnected.wait(), 1.0)
    assert received == ["first"]
    # The pool is still fine afterwards.
    assert await server.provider().create_async(None, MESSAGES) == "next call"


async def test_cancelling_during_a_retry_wait(scripted: Start) -> None:
    server = await scripted(status(503), ok("never"))
    task = asyncio.create_task(server.provider(retry_delay=10.0).create_async(None, MESSAGES))
    while not server.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert len(server.requests) == 1


# -- connection pool -----------------------------------------------------------------------------


async def test_sequential_calls_reuse_one_connection(scripted: Start) -> None:
    watch = Watch()

    async def handler(request: web.Request) -> web.StreamResponse:
        watch.peer(request)
        return await stream_bytes(request, answer("x"))

    async def late_end(request: web.Request) -> web.StreamResponse:
        # [DONE] arrives, the end of the chunked body a little later: still reusable.
        watch.peer(request)
        return await stream_bytes(request, answer("x"), delay=0.1)

    async def json_handler(request: web.Request) -> web.StreamResponse:
        watch.peer(request)
        return web.json_response({"choices": [{"message": {"content": "j"}, "finish_reason": "stop"}]})

    server = await scripted(handler, late_end, json_handler, handler)
    provider = server.provider()
    for _ in range(4):
        await provider.create_async(None, MESSAGES)
    async for _ in provider.create_async_generator(None, MESSAGES):
        pass
    assert len(watch.peers) == 5
    assert len(set(watch.peers)) == 1, watch.peers  # one client socket served every call


async def test_connection_is_not_reused_after_an_interrupted_stream(scripted: Start) -> None:
    watch = Watch()

    async def endless(request: web.Request) -> web.StreamResponse:
        watch.peer(request)
        return await Watch().endless()(request)

    async def handler(request: web.Request) -> web.StreamResponse:
        watch.peer(request)
        return await stream_bytes(request, answer("fresh"))

    server = await scripted(endless, handler)
    provider = server.provider()
    async with provider.stream(None, MESSAGES) as stream:
        async for _ in stream:
            break
    # A half-read response must not hand its leftover bytes to the next call.
    assert await provider.create_async(None, MESSAGES) == "fresh"
    assert len(set(watch.peers)) == 2


async def test_concurrent_streams(scripted: Start) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        word = body["messages"][0]["content"]
        return await stream_bytes(request, answer(*word), delay=0.01)

    server = await scripted(handler)
    provider = server.provider()
    words = [f"word{i}" for i in range(10)]
    answers = await asyncio.gather(
        *(provider.create_async(None, [{"role": "user", "content": w}]) for w in words)
    )
    assert answers == words



# -- cookies ------------------------------------------------------------------------------------


async def test_a_cookie_set_by_an_upstream_is_never_sent_on_a_later_call(scripted: Start) -> None:
    # The pooled session serves every caller: one caller's upstream cookie must not reach another's call.
    async def set_cookie(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Set-Cookie": "session=caller-one; Path=/"})
        await response.prepare(request)
        await response.write(answer("first"))
        await response.write_eof()
        return response

    server = await scripted(set_cookie, ok("second"))
    # "localhost", not an IP address: aiohttp's cookie jar ignores cookies of IP hosts.
    provider = FreeNetfly.configure(url=server.url.replace("127.0.0.1", "localhost"), retry_delay=0.01)
    assert (await provider.complete(None, MESSAGES)).text == "first"
    assert (await provider.complete(None, MESSAGES, headers={"X-Call": "2"})).text == "second"
    assert (await provider.complete(None, MESSAGES, headers={"Cookie": "mine=1"})).text == "second"
    assert [h.get("Cookie") for h in server.headers] == [None, None, "mine=1"]
