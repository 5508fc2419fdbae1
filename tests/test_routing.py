"""Routing over real loopback servers: fallback, no mixed output, circuit breaker, hedging, stats, checks."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web

from netfly import (
    AllProvidersFailedError,
    AuthenticationError,
    ConfigurationError,
    ModelNotSupportedError,
    OpenAICompatible,
    Provider,
    ServerError,
    StreamInterruptedError,
    TransportError,
)
from netfly.cli.check import register_cli
from netfly.cli.format import format_health_table, format_stats
from netfly.errors import CircuitOpenError
from netfly.routing import CircuitBreakers, Fastest, RetryProvider, RoutedAttempt, Shuffled
from netfly.stream import AttemptRecord, ChatStream

from .conftest import answer, chunk, sse, stream_bytes

MESSAGES = [{"role": "user", "content": "Hi"}]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ok(*pieces: str, delay: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return await stream_bytes(request, answer(*pieces))

    return handler


def status(code: int, message: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": message}}, status=code)

    return handler


async def cut_after(request: web.Request) -> web.StreamResponse:
    """Sends one chunk of text, then drops the connection."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(sse(chunk(role="assistant"), chunk("Hello "), done=False))
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


async def silent_then_answer(request: web.Request) -> web.StreamResponse:
    """Keeps the connection busy with SSE comments for 3 s before answering: a slow provider."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(150):
        await response.write(b": still thinking\n\n")  # raises once the client has gone
        await asyncio.sleep(0.02)
    await response.write(answer("slow"))
    await response.write_eof()
    return response


def dead(port: int, name: str = "Dead") -> type[Provider]:
    return OpenAICompatible.configure(url=f"http://127.0.0.1:{port}", name=name, retry_delay=0.01)


def who(attempt: AttemptRecord) -> str:
    assert isinstance(attempt, RoutedAttempt)
    return attempt.provider


async def collect(stream: ChatStream) -> list[str]:
    async with stream:
        return [text async for text in stream]


async def served_by(provider: type[Provider]) -> str:
    stream = provider.stream(None, MESSAGES)
    await collect(stream)
    return stream.stats.provider


# -- fallback ----------------------------------------------------------------------------------


async def test_falls_back_in_order_until_one_answers(scripted: Any, free_port: int) -> None:
    b = await scripted(status(503, "overloaded"))
    c = await scripted(ok("from ", "C"))
    d = await scripted(ok("never"))
    router = RetryProvider(
        [dead(free_port, "A"), b.provider(name="B"), c.provider(name="C"), d.provider(name="D")], max_retries=1
    )

    chunks = [text async for text in router.create_async_generator(None, MESSAGES)]

    assert chunks == ["from ", "C"]
    assert (len(b.requests), len(c.requests), len(d.requests)) == (1, 1, 0)
    assert c.requests[0]["messages"] == MESSAGES


async def test_routed_stats_name_the_serving_provider_and_every_attempt(scripted: Any, free_port: int) -> None:
    b = await scripted(status(503, "overloaded"))

    async def reply(request: web.Request) -> web.StreamResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        body = sse(chunk(role="assistant"), chunk("Hel"), chunk("lo, "), chunk("world"),
                   chunk(finish="stop"), chunk(choices=False, usage=usage))
        return await stream_bytes(request, body)

    c = await scripted(reply)
    router = RetryProvider([dead(free_port, "A"), b.provider(name="B"), c.provider(name="C")],
                           max_retries=1, name="Fallback")

    stream = router.stream(None, MESSAGES)
    assert await collect(stream) == ["Hel", "lo, ", "world"]

    stats = stream.stats
    assert (stats.provider, stats.router) == ("C", "Fallback")
    assert (stats.chunks, stats.characters) == (3, len("Hello, world"))
    assert stats.model == "test-model"  # what the server said, not the requested gpt-3.5-turbo
    assert stats.time_to_first_token is not None and stats.duration is not None
    assert 0 < stats.time_to_first_token <= stats.duration
    attempts = [(who(a), a.status, a.error is None) for a in stats.attempts]
    assert attempts == [("A", None, False), ("B", 503, False), ("C", None, True)]
    assert "TransportError" in (stats.attempts[0].error or "")
    assert "overloaded" in (stats.attempts[1].error or "")
    assert stream.result is not None
    assert (stream.result.text, stream.result.finish_reason) == ("Hello, world", "stop")
    assert stream.result.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert stream.request.url.startswith(c.url)

    report = format_stats(stats)
    assert "provider: C" in report and "chunks: 3" in report and "characters: 12" in report
    assert "attempt 2: B: ServerError" in report and "attempt 3: C: ok" in report


async def test_each_provider_keeps_its_own_retries_unless_routing_sets_them(scripted: Any) -> None:
    a = await scripted(status(503, "busy"), ok("A again"))
    b = await scripted(ok("B"))
    keeps = RetryProvider([a.provider(name="A"), b.provider(name="B")])  # A's own 5 attempts
    assert await keeps.create_async(None, MESSAGES) == "A again"
    assert (len(a.requests), len(b.requests)) == (2, 0)

    a.requests.clear()
    once = RetryProvider([a.provider(name="A"), b.provider(name="B")], max_retries=1)
    a.script[:] = [status(503, "busy"), ok("A again")]
    assert await once.create_async(None, MESSAGES) == "B"
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_failure_after_first_chunk_raises_and_never_switches(scripted: Any) -> None:
    a = await scripted(cut_after)
    b = await scripted(ok("second answer"))
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")])  # A would retry 5 times

    received: list[str] = []
    stream = router.stream(None, MESSAGES)
    with pytest.raises(StreamInterruptedError) as caught:
        async with stream:
            async for text in stream:
                received.append(text)

    assert received == ["Hello "]
    assert caught.value.partial_text == "Hello "
    assert "A" in str(caught.value)
    assert (len(a.requests), len(b.requests)) == (1, 0)
    assert stream.stats.provider == "A"
    assert stream.result is None


async def test_all_failing_lists_every_provider_with_its_own_error(scripted: Any, free_port: int) -> None:
    b = await scripted(status(503, "overloaded"))
    c = await scripted(status(401, "bad key"))
    router = RetryProvider([dead(free_port, "A"), b.provider(name="B"), c.provider(name="C")], max_retries=1)

    with pytest.raises(AllProvidersFailedError) as caught:
        await router.create_async(None, MESSAGES)

    errors = caught.value.errors
    assert list(errors) == ["A", "B", "C"]
    assert isinstance(errors["A"], TransportError)
    assert isinstance(errors["B"], ServerError) and errors["B"].status == 503
    assert isinstance(errors["C"], AuthenticationError) and errors["C"].status == 401
    message = str(caught.value)
    for expected in ("A: TransportError", "B: ServerError", "overloaded", "C: AuthenticationError", "bad key"):
        assert expected in message


async def test_nested_routers_report_the_innermost_provider(scripted: Any, free_port: int) -> None:
    b = await scripted(ok("inner B"))
    c = await scripted(ok("outer C"))
    inner = RetryProvider([dead(free_port, "A"), b.provider(name="B")], max_retries=1, name="Inner")
    outer = RetryProvider([inner, c.provider(name="C")], name="Outer")

    stream = outer.stream(None, MESSAGES)
    assert await collect(stream) == ["inner B"]
    assert stream.stats.provider == "B"
    assert [(who(a), a.error is None) for a in stream.stats.attempts] == [("A", False), ("B", True)]
    assert len(c.requests) == 0


async def test_leaving_the_loop_early_closes_the_serving_connection(scripted: Any) -> None:
    async def first_then_wait(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk("first"), done=False))
        for _ in range(150):
            await response.write(b": more later\n\n")
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    a = await scripted(first_then_wait)
    router = RetryProvider([a.provider(name="A")])
    async with router.stream(None, MESSAGES) as stream:
        async for text in stream:
            assert text == "first"
            break
    deadline = time.monotonic() + 1.0
    while a.disconnects == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert a.disconnects == 1
    assert stream.stats.attempts[-1].error == "closed before the end"
    assert stream.result is None


async def test_secrets_stay_out_of_routed_errors_stats_and_logs(
    scripted: Any, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-routing-secret-1234567890"

    async def echo_key(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"Incorrect API key provided: {key}"}}, status=401)

    a = await scripted(echo_key)
    router = RetryProvider([a.provider(name="A", api_key=key), dead(free_port, "B")], max_retries=1)
    stream = router.stream(None, MESSAGES, proxy="http://user:proxy-pass-42@127.0.0.1:1")
    with pytest.raises(AllProvidersFailedError) as caught:
        await collect(stream)
    assert a.headers == []  # the broken proxy failed first; now straight to the server:
    with pytest.raises(AllProvidersFailedError) as caught:
        await router.create_async(None, MESSAGES)
    assert a.headers[0]["Authorization"] == f"Bearer {key}"
    shown = [str(caught.value), repr(caught.value.errors), format_stats(stream.stats), caplog.text,
             repr(stream.stats), repr(stream.request)]
    for text in shown:
        assert key not in text and "proxy-pass-42" not in text
    assert "Incorrect API key provided" in str(caught.value)

    with pytest.raises(ConfigurationError, match="every provider"):
        router.stream(None, MESSAGES, api_key="sk-one-key-for-all")


async def test_router_lists_the_models_of_its_providers(scripted: Any) -> None:
    async def models(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "served-1"}, {"id": "served-2"}]})

    a = await scripted(models)
    open_ended = a.provider(OpenAICompatible, name="Open")
    fixed = a.provider(name="Fixed")  # FreeNetfly's declared gpt-3.5-turbo, gpt-4
    assert await RetryProvider([fixed]).list_models() == ["gpt-3.5-turbo", "gpt-4"]
    router = RetryProvider([fixed, open_ended])
    assert router.models == ()
    assert await router.list_models() == ["gpt-3.5-turbo", "gpt-4", "served-1", "served-2"]


# -- validation before any I/O ---------------------------------------------------------------------


async def test_router_validates_before_any_request(scripted: Any) -> None:
    a = await scripted(ok("x"))
    gpt4_only = a.provider(name="A", models=("gpt-4",), default_model="gpt-4")
    router = RetryProvider([gpt4_only, a.provider(name="B", models=("m1",), default_model="m1")])

    assert router.models == ("gpt-4", "m1")
    with pytest.raises(ModelNotSupportedError) as caught:
        router.create_completion("gpt-9", MESSAGES)  # raises here, not on first next()
    assert "gpt-9" in str(caught.value) and "gpt-4" in str(caught.value)
    with pytest.raises(ConfigurationError):
        router.stream(None, [{"role": "user"}])
    with pytest.raises(ConfigurationError):
        RetryProvider([])
    with pytest.raises(ConfigurationError):
        RetryProvider([a.provider()], hedge_after=0)
    assert router.build_request("m1", MESSAGES).provider == "B"  # the first provider that takes m1
    assert a.requests == []


def test_a_router_checks_messages_once_and_every_provider_sends_them() -> None:
    a = OpenAICompatible.configure(name="A", url="http://127.0.0.1:9/v1", default_model="m")
    b = OpenAICompatible.configure(name="B", url="http://127.0.0.1:9/v1", default_model="m")
    messages = [{"role": "user", "content": "Hi", "name": "x"}]
    plan = RetryProvider([a, b]).plan(None, messages)
    sent = [json.loads(call.request.payload)["messages"] for _, call in plan.steps if not isinstance(call, Exception)]
    assert sent == [messages, messages]
    with pytest.raises(ConfigurationError, match=r"^messages\[0\]\['role'\] must be a non-empty string"):
        RetryProvider([a, b]).plan(None, [{"role": "", "content": "Hi"}])


async def test_a_routed_stream_read_for_events_or_text_has_the_same_answer_and_figures(scripted: Any) -> None:
    # Read for events, a routed stream shares the answer its serving provider's stream assembles;
    # read for text, it assembles its own: the two must agree, a retried provider included.
    for failing_first, busy_first in ((True, True), (False, False), (True, False)):
        results = []
        for mode in ("events", "text"):
            down = [await scripted(status(500, "down"))] if failing_first else []
            busy = [status(503, "busy")] if busy_first else []
            retried = await scripted(*busy, ok("Hello ", "routed ", "world"))
            router = RetryProvider([*(s.provider(max_retries=1) for s in down), retried.provider(max_retries=3)])
            stream = router.stream(None, MESSAGES)
            if mode == "events":
                kinds = [type(event).__name__ async for event in stream.events()]
                assert "ChoiceDelta" in kinds
            else:
                assert "".join([text async for text in stream]) == "Hello routed world"
            stats = stream.stats
            assert stream.result is not None and stats.time_to_first_token is not None
            results.append((stream.text, stream.result.text, stream.result.finish_reason, stats.chunks,
                            stats.characters, stats.provider, len(stats.attempts)))
        assert results[0] == results[1]
        assert results[0][:2] == ("Hello routed world", "Hello routed world")


async def test_a_model_only_some_providers_have_goes_to_those(scripted: Any) -> None:
    a = await scripted(ok("from A"))
    b = await scripted(ok("from B"))
    router = RetryProvider([a.provider(name="A", models=("gpt-4",)), b.provider(name="B", models=("m1",))])

    stream = router.stream("m1", MESSAGES)
    assert await collect(stream) == ["from B"]
    assert "ModelNotSupportedError" in stream.stats.skipped["A"]
    assert (len(a.requests), b.requests[0]["model"]) == (0, "m1")


async def test_sync_generator_through_a_router(scripted: Any, free_port: int) -> None:
    b = await scripted(ok("sync ", "text"))
    router = RetryProvider([dead(free_port, "A"), b.provider(name="B")], max_retries=1)

    # The sync API runs its own loop in a thread; this test's loop must stay free to serve.
    chunks = await asyncio.to_thread(lambda: list(router.create_completion(None, MESSAGES)))
    assert chunks == ["sync ", "text"]


# -- circuit breaker and ordering ------------------------------------------------------------------


async def test_cooldown_skips_a_failing_provider_then_tries_it_again(scripted: Any) -> None:
    a = await scripted(status(503, "down"), status(503, "still down"), ok("A is back"))
    b = await scripted(ok("B"))
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")],
                           max_retries=1, failure_threshold=1, cooldown=0.3)

    assert await served_by(router) == "B"  # A failed: its circuit opens
    assert len(a.requests) == 1

    stream = router.stream(None, MESSAGES)
    await collect(stream)
    assert stream.stats.provider == "B"
    assert len(a.requests) == 1  # skipped while cooling down
    assert "cooling down" in stream.stats.skipped["A"]

    await asyncio.sleep(0.35)
    assert await served_by(router) == "B"  # one trial request, which fails: open again at once
    assert len(a.requests) == 2
    assert await served_by(router) == "B"
    assert len(a.requests) == 2

    await asyncio.sleep(0.35)
    assert await served_by(router) == "A"  # the trial succeeds: the circuit closes
    assert await served_by(router) == "A"
    assert len(a.requests) == 4
    assert len(b.requests) == 4


async def test_every_provider_cooling_down_fails_fast_with_the_reason(scripted: Any) -> None:
    a = await scripted(status(500, "broken"))
    router = RetryProvider([a.provider(name="A")], max_retries=1, failure_threshold=2, cooldown=60)

    for _ in range(2):
        with pytest.raises(AllProvidersFailedError) as caught:
            await router.create_async(None, MESSAGES)
        assert isinstance(caught.value.errors["A"], ServerError)

    with pytest.raises(AllProvidersFailedError) as caught:
        await router.create_async(None, MESSAGES)
    skipped = caught.value.errors["A"]
    assert isinstance(skipped, CircuitOpenError)
    assert skipped.failures == 2 and 59 < skipped.retry_in <= 60
    assert "HTTP 500: broken" in str(skipped)
    assert len(a.requests) == 2


@pytest.mark.parametrize("order", [{"prefer_fastest": True}, {"strategy": Fastest()}], ids=["boolean", "strategy"])
async def test_prefer_fastest_orders_by_recent_time_to_first_token(scripted: Any, order: dict[str, Any]) -> None:
    a = await scripted(ok("slow", delay=0.5))
    b = await scripted(ok("fast"))
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")], **order)

    # A first (configured order, nothing measured), then B (not measured yet), then the faster: B.
    assert [await served_by(router) for _ in range(3)] == ["A", "B", "B"]
    health = {entry.name: entry for entry in router.breakers.snapshot()}
    ttft_a, ttft_b = health["A"].time_to_first_token, health["B"].time_to_first_token
    assert ttft_a is not None and ttft_b is not None
    assert ttft_a >= 0.5 > ttft_b  # a wide gap: a loaded machine slows the fast one too


@pytest.mark.parametrize("order", [{"shuffle": True}, {"strategy": Shuffled()}], ids=["boolean", "strategy"])
async def test_shuffle_spreads_calls_over_providers(scripted: Any, order: dict[str, Any]) -> None:
    a = await scripted(ok("a"))
    b = await scripted(ok("b"))
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")], **order)

    served = {await served_by(router) for _ in range(20)}
    assert served == {"A", "B"}  # all on one side would have odds of 2 in 2**20


async def test_any_callable_is_a_strategy(scripted: Any) -> None:
    a = await scripted(ok("a"))
    b = await scripted(ok("b"))
    seen: list[CircuitBreakers] = []

    def last_first(providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        seen.append(breakers)
        return list(reversed(providers))

    router = RetryProvider([a.provider(name="A"), b.provider(name="B")], strategy=last_first)
    assert [await served_by(router) for _ in range(2)] == ["B", "B"]
    assert seen == [router.breakers, router.breakers]
    with pytest.raises(ConfigurationError, match="strategy must be callable"):
        RetryProvider([a.provider(name="A")], strategy="fastest")  # type: ignore[arg-type]


# -- hedging ---------------------------------------------------------------------------------------


async def test_hedging_takes_the_faster_server_and_disconnects_the_slower(scripted: Any) -> None:
    slow = await scripted(silent_then_answer)
    fast = await scripted(ok("fast ", "answer"))
    router = RetryProvider([slow.provider(name="Slow"), fast.provider(name="Fast")], hedge_after=0.2)

    started = time.monotonic()
    stream = router.stream(None, MESSAGES)
    assert await collect(stream) == ["fast ", "answer"]
    elapsed = time.monotonic() - started

    assert 0.2 <= elapsed < 1.0
    assert stream.stats.provider == "Fast"
    assert stream.stats.time_to_first_token is not None and stream.stats.time_to_first_token >= 0.2
    assert (len(slow.requests), len(fast.requests)) == (1, 1)
    deadline = time.monotonic() + 1.0
    while slow.disconnects == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert slow.disconnects == 1  # the loser's connection was closed, long before its 3 s answer
    loser = next(a for a in stream.stats.attempts if who(a) == "Slow")
    assert loser.error is not None and "Fast answered first" in loser.error


async def test_no_hedge_when_the_first_provider_answers_in_time(scripted: Any) -> None:
    a = await scripted(ok("in time", delay=0.05))
    b = await scripted(ok("unused"))
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")], hedge_after=0.5)

    assert await router.create_async(None, MESSAGES) == "in time"
    assert (len(a.requests), len(b.requests)) == (1, 0)


async def test_hedge_moves_on_when_the_hedged_provider_fails(scripted: Any, free_port: int) -> None:
    slow = await scripted(silent_then_answer)
    c = await scripted(ok("C wins"))
    router = RetryProvider([slow.provider(name="Slow"), dead(free_port, "Dead"), c.provider(name="C")],
                           hedge_after=0.1, max_retries=1)

    stream = router.stream(None, MESSAGES)
    assert await collect(stream) == ["C wins"]
    assert stream.stats.provider == "C"
    assert [who(a) for a in stream.stats.attempts][:1] == ["Dead"]
    deadline = time.monotonic() + 1.0
    while slow.disconnects == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert slow.disconnects == 1


async def until(condition: Callable[[], bool], seconds: float = 1.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def cancel_the_first_read(stream: ChatStream, until: Callable[[], bool]) -> None:
    """Start reading ``stream``, and cancel that read once ``until()`` holds (a request has arrived)."""
    task = asyncio.ensure_future(stream.__anext__())
    while not until():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_closing_a_routed_stream_mid_race_closes_every_connection(scripted: Any) -> None:
    a = await scripted(silent_then_answer)
    b = await scripted(silent_then_answer)
    router = RetryProvider([a.provider(name="A"), b.provider(name="B")], hedge_after=0.05)

    stream = router.stream(None, MESSAGES)
    await cancel_the_first_read(stream, until=lambda: len(b.requests) > 0)
    await stream.aclose()
    await until(lambda: (a.disconnects, b.disconnects) == (1, 1))
    assert (a.disconnects, b.disconnects) == (1, 1)
    assert {e.name: e.probing for e in router.breakers.snapshot()} == {"A": False, "B": False}


async def test_cancelling_a_routed_stream_before_its_first_output_closes_the_connection(scripted: Any) -> None:
    a = await scripted(silent_then_answer)
    b = await scripted(ok("never"))
    first = a.provider(name="A")
    router = RetryProvider([first, b.provider(name="B")], failure_threshold=1, cooldown=0.01)  # no hedging
    router.breakers.failed(first, RuntimeError("down"))  # open: after the cool-down, A's call is its trial
    await asyncio.sleep(0.02)

    stream = router.stream(None, MESSAGES)
    await cancel_the_first_read(stream, until=lambda: len(a.requests) > 0)
    await until(lambda: a.disconnects > 0)
    assert (a.disconnects, len(b.requests)) == (1, 0)
    assert [(who(x), x.error) for x in stream.stats.attempts] == [("A", "cancelled: the routed stream was closed")]
    assert router.breakers.blocked(first) is None  # a cancelled trial does not leave A skipped for good


# -- live health check -----------------------------------------------------------------------------


async def test_check_reports_a_dead_port_as_not_working(free_port: int) -> None:
    result = await dead(free_port).check(timeout=2)
    assert result.ok is False
    assert result.error is not None and result.error.startswith("TransportError")
    assert result.provider == "Dead" and result.declared is True
    assert 0 <= result.latency < 2


async def test_check_reports_a_live_server_as_working_with_a_tiny_request(scripted: Any) -> None:
    server = await scripted(ok("O"))
    result = await server.provider(name="Live").check()
    assert result.ok is True and result.error is None
    assert (result.served_by, result.model) == ("Live", "test-model")
    assert result.time_to_first_token is not None and 0 < result.time_to_first_token <= result.latency
    assert server.requests[0]["max_tokens"] == 1


async def test_check_makes_a_single_attempt(scripted: Any) -> None:
    server = await scripted(status(503, "overloaded"))
    result = await server.provider(name="Busy").check()  # FreeNetfly presets 5 attempts
    assert result.ok is False and "HTTP 503: overloaded" in (result.error or "")
    assert len(server.requests) == 1


async def test_check_of_a_router_names_the_provider_that_answered(scripted: Any, free_port: int) -> None:
    server = await scripted(ok("O"))
    router = RetryProvider([dead(free_port), server.provider(name="Live")], name="Pair")
    result = await router.check()
    assert (result.provider, result.ok, result.served_by) == ("Pair", True, "Live")


async def test_check_command_prints_a_table_and_exit_status(
    scripted: Any, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await scripted(ok("O"))
    parser = argparse.ArgumentParser(prog="netfly")
    register_cli(parser.add_subparsers())
    dead_url = f"http://127.0.0.1:{free_port}"

    args = parser.parse_args(["check", "--url", server.url, "--url", dead_url, "--timeout", "2"])
    assert await asyncio.to_thread(args.func, args) == 1  # the handler runs its own event loop
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[server.url][2] == "ok"
    assert rows[dead_url][2] == "FAILED" and "TransportError:" in rows[dead_url]

    args = parser.parse_args(["check", "--url", server.url])
    assert await asyncio.to_thread(args.func, args) == 0

    args = parser.parse_args(["check", "--provider", "NoSuchProvider"])
    assert await asyncio.to_thread(args.func, args) == 2
    assert "unknown provider 'NoSuchProvider'" in capsys.readouterr().err


async def test_netfly_check_subprocess(scripted: Any, free_port: int) -> None:
    server = await scripted(ok("O"))
    dead_url = f"http://127.0.0.1:{free_port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netfly", "check", "--url", server.url, "--url", dead_url, "--timeout", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode == 2 and b"invalid choice: 'check'" in err:
        pytest.skip("netfly.cli does not wire the check subcommand")
    lines = out.decode().splitlines()
    assert process.returncode == 1, err.decode()
    assert lines[0].split()[:3] == ["PROVIDER", "DECLARED", "MEASURED"]
    assert any(line.startswith(server.url) and " ok " in line for line in lines)
    assert any(line.startswith(dead_url) and "FAILED" in line and "TransportError" in line for line in lines)
    assert len(server.requests) == 1


def test_health_table_lines_up_columns() -> None:
    from netfly.health import HealthResult

    table = format_health_table([
        HealthResult("Short", True, 0.0123, served_by="Short", model="m"),
        HealthResult("AMuchLongerName", False, 2.5, error="TransportError: refused", declared=True),
    ])
    header, first, second = table.splitlines()
    assert header.index("MEASURED") == first.index("ok") == second.index("FAILED")
    assert "12 ms" in first and "2500 ms" in second and second.endswith("TransportError: refused")
