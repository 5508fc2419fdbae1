"""The gateway, driven by the official openai SDK, relaying to real local upstream servers."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

import netfly
from netfly import FreeNetfly, OpenAICompatible, Timeout
from netfly.gateway import create_app
from netfly.providers.local import is_available

from .conftest import TOKEN, Gateway, ScriptedServer, answer, chunk, netfly_serve, sse, stream_bytes

UPSTREAM_KEY = "sk-upstream-secret-7d2f"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]

Scripted = Callable[..., Awaitable[ScriptedServer]]


def text_answer(*pieces: str, finish: str = "stop", usage: dict[str, int] | None = USAGE) -> bytes:
    """Role chunk, content chunks, finish chunk, a usage-only chunk, [DONE]."""
    objects: list[Any] = [chunk(role="assistant"), *(chunk(p) for p in pieces), chunk(finish=finish)]
    if usage is not None:
        objects.append(chunk(choices=False, usage=usage))
    return sse(*objects)


def replying(*slices: bytes, status: int = 200, content_type: str = "text/event-stream",
             headers: dict[str, str] | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if status != 200:
            return web.Response(status=status, body=b"".join(slices), content_type=content_type, headers=headers)
        return await stream_bytes(request, *slices, content_type=content_type)

    return handler


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "test_error"}}).encode()


async def post_raw(gw: Gateway, data: Any, *, token: str | None = TOKEN,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    """POST to /v1/chat/completions with aiohttp: for bodies the SDK would never send."""
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    async with aiohttp.ClientSession() as session, session.post(
        gw.base_url + "/chat/completions", data=data, headers=sent
    ) as response:
        return response.status, dict(response.headers), await response.json()


# -- relaying answers ----------------------------------------------------------------------------


async def test_async_stream_relays_text_finish_reason_and_usage(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(text_answer("Hel", "lo, ", "world", "!", finish="length")))
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        stream = await client.chat.completions.create(
            model="tiny-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
            temperature=0.2, top_p=0.9, max_tokens=32, stop=["\n\n"], seed=7, presence_penalty=0.5,
            extra_body={"top_k": 40, "response_format": {"type": "text"}},
        )
        chunks = [c async for c in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert [c.choices[0].delta.content for c in chunks[1:5]] == ["Hel", "lo, ", "world", "!"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == USAGE
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"tiny-1"}
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    sent = upstream.requests[0]
    assert sent["model"] == "tiny-1" and sent["messages"] == MESSAGES and sent["stream"] is True
    for name, value in {"temperature": 0.2, "top_p": 0.9, "max_tokens": 32, "stop": ["\n\n"], "seed": 7,
                        "presence_penalty": 0.5, "top_k": 40, "response_format": {"type": "text"}}.items():
        assert sent[name] == value, name
    assert sent["stream_options"] == {"include_usage": True}


async def test_async_non_stream_returns_one_completion_with_usage(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(text_answer("Hello", " there.", finish="stop")))
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        completion = await client.chat.completions.create(model="tiny-1", messages=MESSAGES, temperature=0)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello there."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 13
    assert completion.usage.prompt_tokens == 9 and completion.usage.completion_tokens == 4
    # The client wants the whole answer: the upstream is asked for it whole (it may stream anyway).
    assert upstream.requests[0]["temperature"] == 0 and upstream.requests[0]["stream"] is False
    assert "stream_options" not in upstream.requests[0]


async def test_non_stream_relays_a_whole_upstream_answer(scripted: Scripted, gateway: Any) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    whole = {"id": "chatcmpl-up", "object": "chat.completion", "created": 7, "model": "tiny-1",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
                          "logprobs": None, "finish_reason": "tool_calls"}], "usage": USAGE}
    upstream = await scripted(replying(json.dumps(whole).encode(), content_type="application/json"))
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        completion = await client.chat.completions.create(model="tiny-1", messages=MESSAGES)
    message = completion.choices[0].message
    assert (completion.id, message.content, completion.choices[0].finish_reason) == ("chatcmpl-up", "Checking.",
                                                                                      "tool_calls")
    assert message.tool_calls is not None and message.tool_calls[0].function.arguments == '{"city":"Oslo"}'
    assert completion.usage is not None and completion.usage.total_tokens == 13
    assert upstream.requests[0]["stream"] is False


async def test_stream_without_include_usage_has_no_usage_chunk(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(text_answer("a", "b")))
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ab"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_raw_stream_is_openai_chunk_format_ending_in_done(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(text_answer("Hi")))
    gw = await gateway(upstream.provider(OpenAICompatible))
    payload = json.dumps({"model": "m", "messages": MESSAGES, "stream": True})
    async with aiohttp.ClientSession() as session, session.post(
        gw.base_url + "/chat/completions", data=payload, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        body = (await response.read()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    objects = [json.loads(e[len("data: "):]) for e in events[:-1]]
    # each upstream delta relayed as it was sent (the upstream's role chunk has no content)
    assert [o["choices"][0]["delta"] for o in objects] == [{"role": "assistant"}, {"content": "Hi"}, {}]
    assert [o["choices"][0]["finish_reason"] for o in objects] == [None, None, "stop"]


async def test_sync_client_stream_and_non_stream(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(text_answer("Sync ", "works.")))
    gw = await gateway(upstream.provider(OpenAICompatible))

    def use_sync_client() -> tuple[str, str | None, str, int | None]:
        # Runs in a worker thread; the gateway and the upstream keep running on the test's loop.
        with gw.sync_client() as client:
            stream = client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
            completion = client.chat.completions.create(model="m", messages=MESSAGES)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None
        usage = completion.usage.total_tokens if completion.usage else None
        return streamed, completion.choices[0].finish_reason, completion.choices[0].message.content or "", usage

    streamed, finish, text, total = await asyncio.wait_for(asyncio.to_thread(use_sync_client), 20)
    assert (streamed, finish, text, total) == ("Sync works.", "stop", "Sync works.", 13)


async def test_each_chunk_is_sent_as_it_arrives(scripted: Scripted, gateway: Any) -> None:
    first_seen = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), chunk("first"), done=False))
        # The rest is only sent once the client has the first piece: a buffering gateway deadlocks here.
        await asyncio.wait_for(first_seen.wait(), 5)
        await response.write(sse(chunk(" second"), chunk(finish="stop")))
        await response.write_eof()
        return response

    upstream = await scripted(slow)
    gw = await gateway(upstream.provider(OpenAICompatible))
    received = []
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                received.append(c.choices[0].delta.content)
                first_seen.set()
    assert received == ["first", " second"]


async def test_empty_answer_still_streams_role_finish_and_done(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(sse(chunk(role="assistant"), chunk(finish="content_filter"))))
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks] == [None, "content_filter"]
    assert all(not c.choices[0].delta.content for c in chunks)


# -- choosing the provider -----------------------------------------------------------------------


async def test_model_field_chooses_the_provider(scripted: Scripted, gateway: Any) -> None:
    default_up = await scripted(replying(answer("from default")))
    other_up = await scripted(replying(answer("from other")))
    default = default_up.provider(OpenAICompatible)
    other = other_up.provider(FreeNetfly, name="Other")
    gw = await gateway(default, providers={"Other": other})
    async with gw.client() as client:
        bare = await client.chat.completions.create(model="org/some-model", messages=MESSAGES)
        prefixed = await client.chat.completions.create(model="other/gpt-4", messages=MESSAGES)
        other_default = await client.chat.completions.create(model="Other/", messages=MESSAGES)
    assert bare.choices[0].message.content == "from default"
    assert bare.model == "org/some-model"  # "org" is no provider: the whole name goes to the default
    assert prefixed.choices[0].message.content == "from other"
    assert prefixed.model == "Other/gpt-4"
    assert other_default.model == "Other/gpt-3.5-turbo"
    assert [r["model"] for r in default_up.requests] == ["org/some-model"]
    assert [r["model"] for r in other_up.requests] == ["gpt-4", "gpt-3.5-turbo"]
    # FreeNetfly's own defaults reach its upstream, under what the client sent.
    assert other_up.requests[0]["temperature"] == 0.5


async def test_models_endpoints(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("x")))
    gw = await gateway(upstream.provider(FreeNetfly, name="Local"), providers={"Ollama": netfly.Ollama})
    async with gw.client() as client:
        page = await client.models.list()
        ids = [(m.id, m.owned_by) for m in page.data]
        one = await client.models.retrieve("Local/gpt-4")
        bare = await client.models.retrieve("gpt-3.5-turbo")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-5")
    assert ids == [
        ("gpt-3.5-turbo", "Local"), ("gpt-4", "Local"),
        ("Local/gpt-3.5-turbo", "Local"), ("Local/gpt-4", "Local"), ("Ollama/llama3.2", "Ollama"),
    ]
    assert (one.id, one.object, one.owned_by) == ("Local/gpt-4", "model", "Local")
    assert bare.id == "gpt-3.5-turbo"
    assert missing.value.status_code == 404
    assert "gpt-5" in missing.value.message and "gpt-4" in missing.value.message
    assert upstream.requests == []


async def test_health(gateway: Any) -> None:
    local = netfly.Local.configure(name="MyLocal", n_ctx=1234)  # a configuration nothing has started
    gw = await gateway(OpenAICompatible, providers={"mylocal": local})
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            body = await response.json()
    assert body["status"] == "ok" and body["version"] == netfly.__version__
    state = "not running" if is_available() else "unavailable"
    assert body["local"]["provider"] == "MyLocal" and body["local"]["state"] == state


async def test_only_the_chosen_providers_are_reachable(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("ok")))
    gw = await gateway(upstream.provider(OpenAICompatible, default_model="tiny-1"))
    async with gw.client() as client:
        ids = [m.id for m in (await client.models.list()).data]
        assert ids == ["tiny-1", "OpenAICompatible/tiny-1"]  # no built-in preset
        for model in ("Ollama/llama3.2", "OpenAI/gpt-4o-mini", "FreeNetfly/gpt-4"):
            await client.chat.completions.create(model=model, messages=MESSAGES)
    # A preset's name is no route: the whole name is a model of the one configured upstream.
    asked = [r["model"] for r in upstream.requests if "messages" in r]
    assert asked == ["Ollama/llama3.2", "OpenAI/gpt-4o-mini", "FreeNetfly/gpt-4"]


async def test_models_come_from_the_upstreams_own_list(scripted: Scripted, gateway: Any) -> None:
    listing = json.dumps({"object": "list", "data": [{"id": "m-a"}, {"id": "m-b"}]}).encode()
    upstream = await scripted(replying(listing, content_type="application/json"))
    other = await scripted(replying(answer("x")))
    default = upstream.provider(OpenAICompatible)
    second = other.provider(OpenAICompatible, name="Second", default_model="s-1")
    gw = await gateway(default, providers={"Second": second})
    async with gw.client() as client:
        ids = [m.id for m in (await client.models.list()).data]
    assert ids == ["m-a", "m-b", "OpenAICompatible/m-a", "OpenAICompatible/m-b", "Second/s-1"]


# -- authentication ------------------------------------------------------------------------------


async def test_auth_token_required_and_accepted(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("ok")))
    gw = await gateway(upstream.provider(OpenAICompatible))
    for token in ("wrong-token", TOKEN + "x", TOKEN[:-1]):
        async with gw.client(token=token) as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model="m", messages=MESSAGES)
        assert refused.value.status_code == 401
        assert refused.value.response.headers["www-authenticate"] == "Bearer"
        assert refused.value.body == {"message": "missing or invalid token: send it as 'Authorization: Bearer "
                                                 "<token>' or 'x-api-key: <token>'",
                                      "type": "authentication_error", "param": None, "code": "invalid_api_key"}
    async with aiohttp.ClientSession() as session:
        for path in ("/health", "/v1/models"):
            async with session.get(gw.url + path) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
        async with session.get(gw.url + "/health", headers={"Authorization": f"Basic {TOKEN}"}) as response:
            assert response.status == 401
    assert upstream.requests == []
    async with gw.client() as client:
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"


async def test_no_token_configured_means_open(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("open")))
    gw = await gateway(upstream.provider(OpenAICompatible), auth_token=None)
    async with gw.client(token="anything") as client:
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == "open"


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object, got array"),
    (b'{"model": "m"}', "messages", "'messages' is required"),
    (b'{"messages": "hi"}', "messages", "'messages' must be an array, got string"),
    (b'{"messages": []}', "messages", "must not be empty"),
    (b'{"messages": [{"content": "hi"}]}', "messages", "messages[0]['role']"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages", "messages[0]['content']"),
    (b'{"model": 3, "messages": [{"role": "user", "content": "hi"}]}', "model", "'model' must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature",
     "'temperature' must be a number, got string"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}', "max_tokens", "an integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", "a boolean"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop", "array of strings"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}}',
     "stream_options.include_usage", "a boolean"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "proxy": "http://evil:8080"}', "proxy", "not accepted"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "headers": {"x": "y"}}', "headers", "not accepted"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_retries": 99}', "max_retries", "not accepted"),
    (b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}', "model", "not supported"),
    (b'{"model": "nope/gpt-4", "messages": [{"role": "user", "content": "hi"}]}', "model",
     "nor is 'nope' a provider"),
])
async def test_bad_requests_get_400_naming_the_field(
    scripted: Scripted, gateway: Any, body: bytes, param: str | None, words: str
) -> None:
    upstream = await scripted(replying(answer("never")))
    gw = await gateway(upstream.provider(FreeNetfly))
    status, _, reply = await post_raw(gw, body, headers={"Content-Type": "application/json"})
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert words in reply["error"]["message"]
    assert upstream.requests == []


async def test_unknown_model_through_the_sdk(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("never")))
    gw = await gateway(upstream.provider(FreeNetfly))
    async with gw.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="gpt-5", messages=MESSAGES, stream=True)
    assert refused.value.body["param"] == "model" and refused.value.body["code"] == "model_not_found"
    assert "supported: gpt-3.5-turbo, gpt-4" in refused.value.message


async def test_unknown_routes_and_methods_get_json_errors(gateway: Any) -> None:
    gw = await gateway(OpenAICompatible)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(gw.url + "/v1/nothing") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"
        async with session.get(gw.base_url + "/chat/completions") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"  # RFC 9110: a 405 names the methods there are
            assert "error" in await response.json()
        async with session.post(gw.url + "/health") as response:
            assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"


async def test_body_over_the_default_limit_gets_413(aiohttp_server: Any, gateway: Any) -> None:
    received: list[int] = []

    async def roomy(request: web.Request) -> web.StreamResponse:
        received.append(len(await request.read()))
        return await stream_bytes(request, answer("small is fine"))

    app = web.Application(client_max_size=8 * 1024 * 1024)  # the upstream takes what the gateway passes
    app.router.add_post("/v1/chat/completions", roomy)
    upstream = await aiohttp_server(app)
    gw = await gateway(OpenAICompatible.configure(url=str(upstream.make_url("/")).rstrip("/")))
    async with gw.client() as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * (4 * 1024 * 1024)}]
            )
        assert refused.value.status_code == 413
        assert refused.value.body["code"] == "request_too_large"
        assert "4194304 bytes" in refused.value.message
        under = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * (4 * 1024 * 1024 - 100)}]
        )
    assert under.choices[0].message.content == "small is fine"
    assert len(received) == 1 and received[0] > 4 * 1024 * 1024 - 100  # relayed whole


async def test_chunked_body_over_a_configured_limit_gets_413(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(answer("never")))
    gw = await gateway(upstream.provider(OpenAICompatible), max_body_bytes=1000)

    async def pieces() -> AsyncIterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}]}'

    status, _, reply = await post_raw(gw, pieces())
    assert status == 413
    assert reply["error"]["message"] == "request body is larger than the limit of 1000 bytes"
    assert upstream.requests == []


async def test_a_broken_provider_gets_500_and_the_server_keeps_serving(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(OpenAICompatible):  # a third-party provider with a bug in it
        @classmethod
        def stream(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> Any:
            raise RuntimeError("bug in a provider")

    gw = await gateway(Broken)
    status, _, reply = await post_raw(gw, json.dumps({"model": "m", "messages": MESSAGES}))
    assert status == 500
    assert reply["error"] == {"message": "internal error of the gateway", "type": "server_error",
                              "param": None, "code": None}
    assert any(r.exc_info and "bug in a provider" in str(r.exc_info[1]) for r in caplog.records)
    async with gw.client() as client:
        assert (await client.models.list()).data[0].id == "default"


# -- upstream errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_429_maps_to_429_with_retry_after(scripted: Scripted, gateway: Any, stream: bool) -> None:
    upstream = await scripted(replying(error_body("slow down, please"), status=429, content_type="application/json",
                                       headers={"Retry-After": "7"}))
    gw = await gateway(upstream.provider(OpenAICompatible), max_retries=1)
    async with gw.client() as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "7"
    assert "slow down, please" in limited.value.message
    assert limited.value.body["type"] == "rate_limit_error"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(("upstream_status", "status", "error_class"), [
    (500, 502, openai.InternalServerError),
    (503, 502, openai.InternalServerError),
    (504, 504, openai.InternalServerError),
    (400, 400, openai.BadRequestError),
    (422, 400, openai.BadRequestError),
    (404, 404, openai.NotFoundError),
])
async def test_upstream_status_errors_map_to_openai_errors(
    scripted: Scripted, gateway: Any, upstream_status: int, status: int, error_class: type[Exception]
) -> None:
    upstream = await scripted(replying(error_body(f"upstream said {upstream_status}"), status=upstream_status,
                                       content_type="application/json"))
    gw = await gateway(upstream.provider(OpenAICompatible), max_retries=1)
    async with gw.client() as client:
        with pytest.raises(error_class) as failed:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert isinstance(failed.value, openai.APIStatusError)
    assert failed.value.status_code == status
    assert f"upstream said {upstream_status}" in failed.value.message
    assert len(upstream.requests) == 1


async def test_upstream_retries_are_configurable(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(
        replying(error_body("busy"), status=503, content_type="application/json"),
        replying(error_body("busy"), status=503, content_type="application/json"),
        replying(text_answer("third time lucky")),
    )
    gw = await gateway(upstream.provider(OpenAICompatible, max_retries=1), max_retries=3, retry_delay=0.01)
    async with gw.client() as client:
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == "third time lucky"
    assert len(upstream.requests) == 3


async def test_upstream_401_keeps_the_upstream_key_secret(scripted: Scripted, gateway: Any) -> None:
    async def echo_key(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        return web.json_response({"error": {"message": f"invalid key: {given}"}}, status=401)

    upstream = await scripted(echo_key)
    gw = await gateway(upstream.provider(OpenAICompatible, api_key=UPSTREAM_KEY))
    async with gw.client() as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert upstream.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "refused the gateway's credentials" in refused.value.message
    assert UPSTREAM_KEY not in refused.value.response.text
    assert "***" in refused.value.message


async def test_provider_without_its_key_is_503(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gw = await gateway("OpenAI")
    status, _, reply = await post_raw(gw, json.dumps({"model": "OpenAI/gpt-4o-mini", "messages": MESSAGES}))
    assert status == 503
    assert reply["error"]["code"] == "provider_not_configured"


async def test_unreachable_upstream_is_502(gateway: Any, free_port: int) -> None:
    dead = OpenAICompatible.configure(url=f"http://127.0.0.1:{free_port}")
    gw = await gateway(dead, max_retries=1)
    async with gw.client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert failed.value.status_code == 502
    assert failed.value.body["code"] == "upstream_unreachable"


async def test_stalled_upstream_is_504(scripted: Scripted, gateway: Any) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        raise AssertionError("the gateway should have given up")

    upstream = await scripted(stall)
    gw = await gateway(upstream.provider(OpenAICompatible), max_retries=1, timeout=Timeout(idle=0.3))
    started = time.monotonic()
    async with gw.client() as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert failed.value.status_code == 504
    assert failed.value.body["type"] == "timeout_error"
    assert time.monotonic() - started < 3


async def test_error_after_stream_started_is_one_error_event(scripted: Scripted, gateway: Any) -> None:
    broken = sse(chunk(role="assistant"), chunk("Partial "), chunk("answer"),
                 {"error": {"message": "model overloaded", "type": "server_error"}}, done=False)
    upstream = await scripted(replying(broken))
    gw = await gateway(upstream.provider(OpenAICompatible), max_retries=3)
    received: list[str] = []
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as failed:
            async for c in stream:
                received.append(c.choices[0].delta.content or "")
    assert "".join(received) == "Partial answer"
    assert "model overloaded" in failed.value.message
    assert len(upstream.requests) == 1  # nothing retried once text went out

    status_events = await _raw_events(gw)
    assert status_events[-1].startswith('data: {"error":')
    assert "data: [DONE]" not in status_events
    error = json.loads(status_events[-1][len("data: "):])["error"]
    assert error["message"] == "model overloaded" and error["type"] == "server_error"  # upstream's own type
    assert sum(e.startswith('data: {"error"') for e in status_events) == 1


async def test_upstream_cut_mid_stream_is_one_error_event(scripted: Scripted, gateway: Any) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), chunk("Half"), done=False))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the connection drops mid-answer
        return response

    upstream = await scripted(cut)
    gw = await gateway(upstream.provider(OpenAICompatible), max_retries=3)
    events = await _raw_events(gw)
    assert json.loads(events[1][len("data: "):])["choices"][0]["delta"] == {"content": "Half"}
    error = json.loads(events[-1][len("data: "):])["error"]
    assert "interrupted" in error["message"]
    assert len(upstream.requests) == 1


async def _raw_events(gw: Gateway) -> list[str]:
    payload = json.dumps({"model": "m", "messages": MESSAGES, "stream": True})
    async with aiohttp.ClientSession() as session, session.post(
        gw.base_url + "/chat/completions", data=payload, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 200
        return [e for e in (await response.read()).decode().split("\n\n") if e]


# -- disconnects and load ------------------------------------------------------------------------


async def _wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def _endless(request: web.Request) -> web.StreamResponse:
    """One piece of text, then keep-alive comments until the reader goes away."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(sse(chunk(role="assistant"), chunk("Hello"), done=False))
    for _ in range(500):
        await asyncio.sleep(0.01)
        await response.write(b": still thinking\n\n")
    raise AssertionError("the upstream request was never cancelled")


async def test_client_disconnect_mid_stream_cancels_upstream(
    scripted: Scripted, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="netfly.gateway")
    upstream = await scripted(_endless)
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for c in stream:
            if c.choices[0].delta.content:
                assert c.choices[0].delta.content == "Hello"
                break
        await stream.close()
    waited = await _wait_for(lambda: upstream.disconnects == 1)
    assert waited < 1.0
    await _wait_for(lambda: any("client disconnected" in r.getMessage() for r in caplog.records))


async def test_client_disconnect_before_first_chunk_cancels_upstream(scripted: Scripted, gateway: Any) -> None:
    async def thinking(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)  # no byte yet: the gateway is still waiting for the first chunk
        raise AssertionError("the upstream request was never cancelled")

    upstream = await scripted(thinking)
    gw = await gateway(upstream.provider(OpenAICompatible))
    async with gw.client(timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    await _wait_for(lambda: upstream.disconnects == 1, timeout=1.0)


async def test_100_concurrent_streams_are_relayed_intact(scripted: Scripted, gateway: Any) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        words = body["messages"][0]["content"].split()
        pieces = [w + " " for w in words]
        return await stream_bytes(request, text_answer(*pieces, usage=None), delay=0)

    upstream = await scripted(echo)
    gw = await gateway(upstream.provider(OpenAICompatible))

    async def one(client: openai.AsyncOpenAI, n: int) -> str:
        prompt = f"stream number {n} of one hundred"
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async with gw.client(timeout=30) as client:
        results = await asyncio.wait_for(asyncio.gather(*(one(client, n) for n in range(100))), 30)
    assert results == [f"stream number {n} of one hundred " for n in range(100)]
    assert len(upstream.requests) == 100


# -- logging -------------------------------------------------------------------------------------


async def test_one_log_line_per_request_without_secrets(
    scripted: Scripted, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="netfly")
    upstream = await scripted(replying(text_answer("logged")))
    gw = await gateway(upstream.provider(OpenAICompatible, api_key=UPSTREAM_KEY))
    async with gw.client() as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.models.list()
    async with gw.client(token="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + f"/health?api_key={UPSTREAM_KEY}",
                               headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "netfly.gateway"]
    assert len(lines) == 4
    assert lines[0].startswith("POST /v1/chat/completions 200 ")
    assert lines[1].startswith("GET /v1/models 200 ")
    assert lines[2].startswith("POST /v1/chat/completions 401 ")
    assert lines[3].startswith("GET /health 200 ")
    assert all(line.split()[3].endswith("ms") for line in lines)
    # The stream's stats are in the chat line: the upstream that served, its attempts and chunks.
    assert "provider=" in lines[0] and "attempts=1 failed=0" in lines[0] and "chunks=1 chars=6" in lines[0]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text and UPSTREAM_KEY not in text


# -- configuration and the command ---------------------------------------------------------------


def test_create_app_rejects_bad_settings() -> None:
    with pytest.raises(netfly.ConfigurationError, match="unknown provider"):
        create_app("no-such-provider")
    with pytest.raises(netfly.ConfigurationError, match="auth_token"):
        create_app(OpenAICompatible, auth_token=" ")
    with pytest.raises(netfly.ConfigurationError, match="max_retries"):
        create_app(OpenAICompatible, max_retries=0)
    with pytest.raises(netfly.ConfigurationError, match="max_body_bytes"):
        create_app(OpenAICompatible, max_body_bytes=0)
    with pytest.raises(netfly.ConfigurationError, match="proxy"):
        create_app(OpenAICompatible, proxy="ftp://nowhere")


@pytest.mark.parametrize(("stop_signal", "loop"), [(signal.SIGINT, "auto"), (signal.SIGTERM, "auto"),
                                                    (signal.SIGTERM, "asyncio")])
async def test_netfly_serve_command(scripted: Scripted, stop_signal: signal.Signals, loop: str) -> None:
    upstream = await scripted(replying(text_answer("served")))
    # The signal goes out as soon as the gateway says it listens: its handler must be in place by then.
    process, port, head = await netfly_serve("--url", upstream.url, "--retries", "1", "--loop", loop,
                                             env={"NETFLY_AUTH_TOKEN": TOKEN})
    try:
        gw = Gateway(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/health") as response:
            assert response.status == 401  # the token from the environment is required
        async with gw.client() as client:
            completion = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == "served"
        process.send_signal(stop_signal)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    log = "".join(head) + stderr.decode()
    assert f"listening on http://127.0.0.1:{port}" in log and "gateway stopped" in log
    assert f"event loop: {'asyncio' if loop == 'asyncio' else 'uvloop'}" in log  # uvloop is a dependency
    assert "GET /health 401 " in log and "POST /v1/chat/completions 200 " in log
    assert TOKEN not in log


async def test_netfly_serve_stops_gracefully_on_sigterm_sent_as_it_starts_listening(scripted: Scripted) -> None:
    upstream = await scripted(replying(text_answer("served")))
    for _ in range(3):  # a race: with the handler installed after the line, about 2 runs in 3 died
        process, _, _ = await netfly_serve("--url", upstream.url, env={"NETFLY_AUTH_TOKEN": TOKEN})
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0  # not -15: the default action of a signal with no handler yet
        assert "gateway stopped" in stderr.decode()
