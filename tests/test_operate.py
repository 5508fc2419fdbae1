"""Running the gateway from a configuration file: model groups, keys and limits, usage, metrics,
the JSON request log and reloading; real loopback upstreams, the official openai SDK as client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from netfly.config import parse_config
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.keys import MemoryStore
from netfly.gateway.metrics import DEFAULT_MAX_MODELS, OTHER_MODELS
from netfly.gateway.operations import Operations
from netfly.gateway.server import Runner

from .conftest import ScriptedServer, chunk, netfly_serve, sse

Scripted = Callable[..., Awaitable[ScriptedServer]]
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
ALICE, BOB, ADMIN = "nf-alice-3c9a", "nf-bob-71e2", "nf-admin-0b4d"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def named_answer(name: str, *, delay: float = 0.0, first_delay: float = 0.0, pieces: int = 2,
                 usage: dict[str, int] | None = USAGE) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream answering "<name> " ``pieces`` times, with usage, after ``first_delay``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(first_delay)
        objects: list[Any] = [chunk(role="assistant"), *(chunk(f"{name} ") for _ in range(pieces))]
        objects.append(chunk(finish="stop"))
        if usage is not None:
            objects.append(chunk(choices=False, usage=usage))
        for event in sse(*objects).split(b"\n\n"):
            if event:
                await response.write(event + b"\n\n")
                if delay:
                    await asyncio.sleep(delay)
        await response.write_eof()
        return response

    return handler


def failing(status: int = 500) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=status)

    return handler


class Running:
    def __init__(self, url: str, operations: Operations | None = None) -> None:
        self.url = url
        self.operations = operations

    def client(self, key: str = ALICE) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    async def ask(self, model: str, key: str = ALICE, **options: Any) -> str:
        async with self.client(key) as client:
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **options)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def raw(self, method: str, path: str, key: str | None = ALICE, body: Any = None,
                  extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(extra or {})
        async with aiohttp.ClientSession() as session, session.request(
            method, self.url + path, json=body, headers=headers
        ) as response:
            text = await response.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return response.status, dict(response.headers), parsed


@pytest.fixture
async def serve_config() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    runners: list[Runner] = []

    async def launch(data: dict[str, Any] | None = None, *, path: Path | None = None, **options: Any) -> Running:
        operations = Operations.from_file(path, **options) if path else Operations(parse_config(data or {}), **options)
        runner = await start(create_app(operations=operations), "127.0.0.1", 0)
        runners.append(runner)
        return Running(f"http://127.0.0.1:{bound_port(runner)}", operations)

    yield launch
    for runner in runners:
        await runner.cleanup()


def providers(*servers: ScriptedServer) -> dict[str, Any]:
    return {f"p{i}": {"url": s.url, "retries": 1} for i, s in enumerate(servers)}


def group(strategy: str, count: int, **settings: Any) -> dict[str, Any]:
    return {"strategy": strategy, "targets": [{"provider": f"p{i}", "model": f"m{i}"} for i in range(count)],
            **settings}


KEYS = {
    "alice": {"sha256": digest(ALICE)},
    "ops": {"sha256": digest(ADMIN), "admin": True},
}


# -- model groups ----------------------------------------------------------------------------------


async def test_ordered_falls_back_and_asks_each_target_for_its_model(scripted: Scripted, serve_config: Any) -> None:
    down, up = await scripted(failing(503)), await scripted(named_answer("B"))
    gw = await serve_config({"providers": providers(down, up), "models": {"chat": group("ordered", 2)}})
    assert await gw.ask("chat") == "B B "
    assert [r["model"] for r in down.requests] == ["m0"] and [r["model"] for r in up.requests] == ["m1"]
    async with gw.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["chat"]
        with pytest.raises(openai.BadRequestError, match="model 'p1/m1' is not served here; models: chat"):
            await client.chat.completions.create(model="p1/m1", messages=MESSAGES)


async def test_weighted_spreads_requests_by_weight(scripted: Scripted, serve_config: Any) -> None:
    heavy, light = await scripted(named_answer("H", pieces=1)), await scripted(named_answer("L", pieces=1))
    spec = group("weighted", 2)
    spec["targets"][0]["weight"], spec["targets"][1]["weight"] = 4, 1
    gw = await serve_config({"providers": providers(heavy, light), "models": {"w": spec}})
    random.seed(13)
    answers = await asyncio.gather(*(gw.ask("w") for _ in range(100)))
    assert 65 <= answers.count("H ") <= 93 and answers.count("H ") + answers.count("L ") == 100


async def test_fastest_prefers_the_target_with_the_best_time_to_first_token(
    scripted: Scripted, serve_config: Any
) -> None:
    # 1 s: a fresh CI machine once stalled the fast target's measured request past a 0.3 s margin.
    slow, fast = await scripted(named_answer("S", first_delay=1.0)), await scripted(named_answer("F"))
    gw = await serve_config({"providers": providers(slow, fast), "models": {"f": group("fastest", 2)}})
    warm_up = [await gw.ask("f"), await gw.ask("f")]  # each target unmeasured in turn, so both measured
    assert sorted(warm_up) == ["F F ", "S S "]
    assert [await gw.ask("f") for _ in range(3)] == ["F F "] * 3, f"warm-up order: {warm_up}"


async def test_hedge_starts_the_next_target_and_the_first_text_wins(scripted: Scripted, serve_config: Any) -> None:
    stalled, quick = await scripted(named_answer("A", first_delay=5)), await scripted(named_answer("B"))
    gw = await serve_config({"providers": providers(stalled, quick),
                             "models": {"h": group("hedge", 2, hedge_after=0.2)}})
    started = time.monotonic()
    assert await gw.ask("h") == "B B "
    assert time.monotonic() - started < 2
    assert len(stalled.requests) == 1 and len(quick.requests) == 1
    await asyncio.sleep(0.1)
    assert stalled.disconnects == 1  # the loser's connection was closed


async def test_least_busy_sends_to_the_idle_target(scripted: Scripted, serve_config: Any) -> None:
    first, second = await scripted(named_answer("A", delay=0.2)), await scripted(named_answer("B"))
    gw = await serve_config({"providers": providers(first, second), "models": {"lb": group("least-busy", 2)}})
    long = asyncio.create_task(gw.ask("lb"))
    while not first.requests:
        await asyncio.sleep(0.01)
    assert await gw.ask("lb") == "B B "  # A is busy with the first stream
    assert await long == "A A "
    assert await gw.ask("lb") == "A A "  # both idle again: the order of the file


# -- keys and limits -------------------------------------------------------------------------------


async def test_keys_are_required_and_models_restricted(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X"))
    keys = {**KEYS, "bob": {"sha256": digest(BOB), "models": ["a"]}}
    gw = await serve_config({"providers": providers(up), "models": {"a": group("ordered", 1),
                                                                    "b": group("ordered", 1)}, "keys": keys})
    assert await gw.ask("b", ALICE) == "X X "
    status, _, body = await gw.raw("POST", "/v1/chat/completions", BOB, {"model": "b", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert body["error"]["message"] == "key 'bob' may not use model 'b'"
    for key in (None, "nf-wrong"):
        status, headers, body = await gw.raw("GET", "/v1/models", key)
        assert (status, body["error"]["code"], headers["WWW-Authenticate"]) == (401, "invalid_api_key", "Bearer")
    for open_path in ("/health", "/", "/status"):  # the pages hold no data; their API calls send the key
        assert (await gw.raw("GET", open_path, None))[0] == 200


async def test_burst_over_rpm_gets_429_with_headers_then_recovers(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X", pieces=1))
    keys = {"alice": {"sha256": digest(ALICE), "rpm": 60}}
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": keys})
    body = {"model": "m", "messages": MESSAGES}
    burst = await asyncio.gather(*(gw.raw("POST", "/v1/chat/completions", ALICE, body) for _ in range(60)))
    assert [status for status, _, _ in burst] == [200] * 60
    remaining = sorted(int(headers["x-ratelimit-remaining-requests"]) for _, headers, _ in burst)
    # A token a second refills during the burst: a loaded machine may take a few seconds for it.
    assert remaining[0] <= 10 and remaining[-1] >= 58
    allowed = 60
    while allowed < 70:
        status, headers, refused = await gw.raw("POST", "/v1/chat/completions", ALICE, body)
        if status != 200:
            break
        allowed += 1
    assert status == 429 and refused["error"]["code"] == "rate_limit_exceeded"
    assert refused["error"]["message"] == "key 'alice' is over its limit of 60 requests per minute"
    assert headers["Retry-After"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s") and float(
        headers["x-ratelimit-reset-requests"].rstrip("s")) > 50
    with pytest.raises(openai.RateLimitError):  # the SDK sees it as a rate limit too
        await gw.ask("m")
    await asyncio.sleep(1.1)
    status, headers, _ = await gw.raw("POST", "/v1/chat/completions", ALICE, body)
    # The token refilled in that second was taken (a loaded machine may have refilled one more).
    assert status == 200 and int(headers["x-ratelimit-remaining-requests"]) <= 1
    left = int(headers["x-ratelimit-remaining-requests"])
    status, headers, _ = await gw.raw("GET", "/v1/models", ALICE)  # every response has them; reading is free
    assert status == 200 and headers["x-ratelimit-limit-requests"] == "60"
    assert int(headers["x-ratelimit-remaining-requests"]) >= left and "x-ratelimit-limit-tokens" not in headers
    assert len(up.requests) == allowed + 1  # refused requests never reached the upstream


async def test_tpm_charges_an_estimate_then_the_real_usage(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X", pieces=1))
    keys = {"alice": {"sha256": digest(ALICE), "tpm": 600}}
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": keys})
    status, headers, _ = await gw.raw("POST", "/v1/chat/completions", ALICE,
                                      {"model": "m", "messages": MESSAGES, "max_tokens": 590})
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "600"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 3  # charged up front: prompt (~7) + max_tokens
    # The answer used 13 tokens: the rest was given back, so a large request fits again at once.
    status, headers, _ = await gw.raw("POST", "/v1/chat/completions", ALICE,
                                      {"model": "m", "messages": MESSAGES, "max_tokens": 500})
    assert status == 200 and 70 <= int(headers["x-ratelimit-remaining-tokens"]) <= 90
    status, headers, refused = await gw.raw("POST", "/v1/chat/completions", ALICE,
                                            {"model": "m", "messages": MESSAGES, "max_tokens": 590})
    assert status == 429 and "tokens per minute" in refused["error"]["message"]
    # 26 tokens used of 600; 597 needed: 23 missing, refilled at 10 a second.
    assert headers["Retry-After"] == "3" and "x-ratelimit-reset-tokens" in headers


async def test_concurrent_streams_limit(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X", delay=0.1))
    keys = {"alice": {"sha256": digest(ALICE), "max_streams": 1}}
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": keys})
    first = asyncio.create_task(gw.ask("m"))
    while not up.requests:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="1 requests in flight already"):
        await gw.ask("m")
    assert await first == "X X "
    assert await gw.ask("m") == "X X "


# -- usage, metrics, log ---------------------------------------------------------------------------


async def test_streamed_usage_is_the_upstreams_even_unasked(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X"))
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": KEYS})
    for _ in range(3):
        assert await gw.ask("m") == "X X "  # the client does not ask for usage
    assert all(r["stream_options"] == {"include_usage": True} for r in up.requests)
    status, _, body = await gw.raw("GET", "/admin/usage", ADMIN)
    assert status == 200
    assert body["data"] == [{"key": "alice", "model": "m", "requests": 3, "prompt_tokens": 27,
                             "completion_tokens": 12, "estimated_requests": 0, "total_tokens": 39}]
    assert (await gw.raw("GET", "/admin/usage", ALICE))[0] == 403


async def test_usage_is_estimated_when_the_upstream_sends_none(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("abcdefgh", usage=None))
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": KEYS})
    await gw.ask("m")
    _, _, body = await gw.raw("GET", "/admin/usage", ADMIN)
    (row,) = body["data"]
    assert row["estimated_requests"] == 1 and row["completion_tokens"] == 5  # 18 characters / 4
    assert row["prompt_tokens"] > 0


async def test_metrics_count_requests_attempts_and_time_to_first_token(
    scripted: Scripted, serve_config: Any
) -> None:
    down, up = await scripted(failing(503)), await scripted(named_answer("X"))
    gw = await serve_config({"providers": providers(down, up), "keys": KEYS,
                             "models": {"m": group("ordered", 2, failure_threshold=2)}})
    for _ in range(2):
        await gw.ask("m")
    await gw.raw("GET", "/v1/models", "nf-wrong")
    status, _, page = await gw.raw("GET", "/v1/netfly/status", ALICE)
    assert status == 200
    assert {(r["name"], r["router"], r["circuit"]) for r in page["providers"]} >= {("p0", "m", "open"),
                                                                                   ("p1", "m", "closed")}
    status, headers, text = await gw.raw("GET", "/metrics", None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    lines = text.splitlines()
    assert ('netfly_requests_total{key="alice",model="m",route="/v1/chat/completions",status="200"} 2.0' in lines)
    assert 'netfly_requests_total{key="",model="",route="/v1/models",status="401"} 1.0' in lines
    assert 'netfly_upstream_attempts_total{outcome="ServerError",provider="p0"} 2.0' in lines
    assert 'netfly_upstream_attempts_total{outcome="success",provider="p1"} 2.0' in lines
    assert 'netfly_time_to_first_token_seconds_count{model="m"} 2.0' in lines
    assert 'netfly_tokens_per_request_sum{kind="completion",model="m"} 8.0' in lines
    assert 'netfly_streams_in_flight{model="m"} 0.0' in lines
    assert 'netfly_circuit_breaker_state{model="m",provider="p1"} 0.0' in lines
    assert 'netfly_circuit_breaker_state{model="m",provider="p0"} 2.0' in lines  # two failures in a row: open


async def test_metrics_keep_a_bounded_number_of_model_labels(scripted: Scripted, serve_config: Any) -> None:
    # A pass-through provider takes any model name; each label set stays in /metrics (and memory) for good.
    up = await scripted(named_answer("X", pieces=1))
    gw = await serve_config({"providers": providers(up), "keys": KEYS})
    names = [f"model-{n}" for n in range(DEFAULT_MAX_MODELS + 20)]
    async with gw.client() as client:
        for batch in range(0, len(names), 10):
            await asyncio.gather(*(client.chat.completions.create(model=name, messages=MESSAGES)
                                   for name in names[batch : batch + 10]))
    _, _, text = await gw.raw("GET", "/metrics", None)
    counts = {line.split('model="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("netfly_requests_total{")}
    assert len(counts) == DEFAULT_MAX_MODELS + 1
    assert counts[OTHER_MODELS] == 20.0  # the later names, counted together
    assert 'netfly_streams_in_flight{model="(other)"} 0.0' in text.splitlines()


async def test_json_request_log_names_the_key_never_the_key_or_content(
    scripted: Scripted, serve_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    down, up = await scripted(failing(503)), await scripted(named_answer("Secret answer"))
    data = {"providers": providers(down, up), "models": {"m": group("ordered", 2)}, "keys": KEYS}
    gw = await serve_config(data, log_format="json")
    caplog.set_level(logging.INFO, logger="netfly.gateway.requests")
    await gw.ask("m")
    _, headers, _ = await gw.raw("GET", "/v1/models", "nf-wrong", extra={"X-Request-Id": "trace-42"})
    assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "trace-42", headers
    lines = [r.getMessage() for r in caplog.records if r.name == "netfly.gateway.requests"]
    assert len(lines) == 2
    entry, refused = json.loads(lines[0]), json.loads(lines[1])
    assert {k: entry[k] for k in ("key", "route", "model", "provider", "status", "tokens_in", "tokens_out")} == {
        "key": "alice", "route": "/v1/chat/completions", "model": "m", "provider": "p1", "status": 200,
        "tokens_in": 9, "tokens_out": 4}
    assert [(a["provider"], a["status"]) for a in entry["attempts"]] == [("p0", 503), ("p1", None)]
    assert entry["attempts"][0]["error"] == "ServerError: p0: HTTP 503: boom" and entry["attempts"][1]["error"] is None
    assert entry["ttft_ms"] > 0 and entry["duration_ms"] >= entry["ttft_ms"] and len(entry["request_id"]) == 32
    assert (refused["status"], refused["key"], refused["request_id"]) == (401, None, "trace-42")
    text = caplog.text
    assert ALICE not in text and "nf-wrong" not in text and "Secret answer" not in text and "Say hello" not in text
    assert not any(r.name == "netfly.gateway" and "/v1/chat" in r.getMessage() for r in caplog.records)

    caplog.clear()
    gw = await serve_config(data, log_format="json", log_content=True)
    await gw.ask("m")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "netfly.gateway.requests"]
    assert json.loads(line)["messages"] == MESSAGES and json.loads(line)["answer"] == "Secret answer Secret answer "


# -- reloading -------------------------------------------------------------------------------------


def config_text(upstream: ScriptedServer, keys: dict[str, str]) -> str:
    lines = [f'[providers.up]\nurl = "{upstream.url}"\n', '[models.m]\ntargets = [{ provider = "up" }]\n',
             f'[keys.ops]\nsha256 = "{digest(ADMIN)}"\nadmin = true\n']
    lines += [f'[keys.{name}]\nsha256 = "{digest(key)}"\n' for name, key in keys.items()]
    return "\n".join(lines)


async def test_reload_under_load_cuts_no_stream(scripted: Scripted, serve_config: Any, tmp_path: Path) -> None:
    old, new = await scripted(named_answer("old", delay=0.05, pieces=12)), await scripted(named_answer("new"))
    path = tmp_path / "netfly.toml"
    path.write_text(config_text(old, {"alice": ALICE}))
    gw = await serve_config(path=path)
    streams = [asyncio.create_task(gw.ask("m")) for _ in range(20)]
    while len(old.requests) < 20:
        await asyncio.sleep(0.01)
    path.write_text(config_text(new, {"alice": ALICE, "bob": BOB}))
    status, _, body = await gw.raw("POST", "/admin/reload", ADMIN)
    assert (status, body) == (200, {"status": "reloaded", "models": ["m"], "keys": ["alice", "bob", "ops"]})
    assert not any(s.done() for s in streams)  # still streaming from the old upstream
    assert await gw.ask("m", BOB) == "new new "
    assert await asyncio.gather(*streams) == ["old " * 12] * 20

    path.write_text(config_text(new, {}) + "\n[keys.broken]\nrpm = -1\n")
    status, _, body = await gw.raw("POST", "/admin/reload", ADMIN)
    assert status == 400 and body["error"]["code"] == "invalid_configuration"
    assert "keys.broken.rpm: Input should be greater than or equal to 1" in body["error"]["message"]
    assert await gw.ask("m", BOB) == "new new "  # the old configuration stays
    assert (await gw.raw("POST", "/admin/reload", ALICE))[0] == 403


async def test_netfly_serve_config_reloads_on_sighup(scripted: Scripted, tmp_path: Path) -> None:
    first, second = await scripted(named_answer("one")), await scripted(named_answer("two"))
    metrics_port = free_port()
    path = tmp_path / "netfly.toml"
    path.write_text(f"[server]\nport = 1\nmetrics_port = {metrics_port}\n" + config_text(first, {"alice": ALICE}))
    process, port, _ = await netfly_serve("--config", str(path), "--log-format", "json")
    try:
        gw = Running(f"http://127.0.0.1:{port}")
        assert await gw.ask("m") == "one one "
        path.write_text("[models.broken\n")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await gw.ask("m") == "one one "  # an invalid file keeps the old configuration
        path.write_text(config_text(second, {"alice": ALICE}))
        process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await gw.ask("m") == "two two ":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("SIGHUP did not reload the configuration")
        assert (await gw.raw("GET", "/metrics", None))[0] == 404  # served on its own port instead
        metrics_server = Running(f"http://127.0.0.1:{metrics_port}")
        status, _, metrics = await metrics_server.raw("GET", "/metrics", None)
        assert status == 200 and "netfly_requests_total" in metrics
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = stderr.decode().splitlines()
    assert any("configuration not reloaded, the old one stays" in line and "not valid TOML" in line for line in lines)
    assert any("configuration reloaded from" in line for line in lines)
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert [e["status"] for e in entries if e["route"] == "/v1/chat/completions"][:2] == [200, 200]
    assert ALICE not in stderr.decode()


async def wait_until_serving(gw: Running) -> None:
    for _ in range(200):
        try:
            await gw.raw("GET", "/health", None)
            return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("netfly serve did not start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_metrics_token(scripted: Scripted, serve_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", "nf-metrics-9d")
    up = await scripted(named_answer("X"))
    gw = await serve_config({"server": {"metrics_token_env": "METRICS_TOKEN"}, "providers": providers(up),
                             "models": {"m": group("ordered", 1)}, "keys": KEYS})
    status, _, body = await gw.raw("GET", "/metrics", None)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert (await gw.raw("GET", "/metrics", ALICE))[0] == 401  # a client key is not the metrics token
    status, _, text = await gw.raw("GET", "/metrics", "nf-metrics-9d")
    assert status == 200 and "# TYPE netfly_requests_total counter" in text


async def test_memory_store_leases_expire_and_buckets_refill() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    first = await store.lease("streams:a", 1, ttl=10)
    assert first is not None and await store.lease("streams:a", 1, ttl=10) is None
    now[0] += 10.5  # the holder died without releasing: its lease runs out
    second = await store.lease("streams:a", 1, ttl=10)
    assert second is not None
    await store.release("streams:a", first)  # releasing an expired lease changes nothing
    assert await store.lease("streams:a", 1, ttl=10) is None
    assert (await store.take("rpm:a", 2, capacity=2, per_second=1)).allowed
    refused = await store.take("rpm:a", 1, capacity=2, per_second=1)
    assert (refused.allowed, refused.retry_after, refused.reset) == (False, 1.0, 2.0)
    now[0] += 1
    assert (await store.take("rpm:a", 1, capacity=2, per_second=1)).allowed


async def test_anthropic_and_responses_clients_are_keyed_and_counted(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X"))
    keys = {**KEYS, "bob": {"sha256": digest(BOB), "rpm": 100}}
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": keys})
    claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key=BOB, max_retries=0, timeout=10)  # x-api-key
    async with claude, claude.messages.stream(model="m", max_tokens=50, messages=MESSAGES) as stream:
        assert await stream.get_final_text() == "X X "
    async with gw.client(BOB) as client:
        response = await client.responses.create(model="m", input="Say hello.")
        assert response.output_text == "X X "
    wrong = anthropic.AsyncAnthropic(base_url=gw.url, api_key="nf-wrong", max_retries=0, timeout=10)
    async with wrong:
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    _, _, body = await gw.raw("GET", "/admin/usage", ADMIN)
    assert body["data"] == [{"key": "bob", "model": "m", "requests": 2, "prompt_tokens": 18,
                             "completion_tokens": 8, "estimated_requests": 0, "total_tokens": 26}]


async def test_a_key_that_is_not_utf8_is_a_401(scripted: Scripted, serve_config: Any) -> None:
    up = await scripted(named_answer("X"))
    gw = await serve_config({"providers": providers(up), "models": {"m": group("ordered", 1)}, "keys": KEYS})
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 401 ")
