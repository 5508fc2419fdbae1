"""The Responses, Messages and embeddings APIs, CORS, request ids and keep-alives, end to end:
the official clients → the gateway → loopback upstream servers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from netfly import OpenAICompatible
from netfly.stream import ChatStream

from .conftest import TOKEN, chunk, sse
from .test_gateway import USAGE, Scripted, error_body, replying, text_answer

HI: list[Any] = [{"role": "user", "content": "Say hello."}]
needs_events = pytest.mark.skipif(not hasattr(ChatStream, "events"), reason="the engine's typed events are not in")


def tool_answer(*calls: tuple[str, str, str]) -> bytes:
    """Tool calls streamed as OpenAI does: id and name first, then argument fragments."""
    objects: list[Any] = [chunk(role="assistant")]
    for index, (call_id, name, arguments) in enumerate(calls):
        first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        objects.append({**chunk(), "choices": [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]})
        for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2:]):
            fragment = {"index": index, "function": {"arguments": piece}}
            objects.append({**chunk(), "choices": [{"index": 0, "delta": {"tool_calls": [fragment]},
                                                    "finish_reason": None}]})
    objects += [chunk(finish="tool_calls"), chunk(choices=False, usage=USAGE)]
    return sse(*objects)


async def start(scripted: Scripted, gateway: Any, *slices: bytes, **options: Any) -> tuple[Any, Any]:
    upstream = await scripted(replying(*slices))
    return upstream, await gateway(upstream.provider(OpenAICompatible), **options)


def claude(gw: Any, token: str = TOKEN) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=token, max_retries=0, timeout=10)


# -- Responses -----------------------------------------------------------------------------------


async def test_responses_create_and_stream_text(scripted: Scripted, gateway: Any) -> None:
    upstream, gw = await start(scripted, gateway, text_answer("Hel", "lo"))
    async with gw.client() as client:
        whole = await client.responses.create(model="m", input="Say hello.", instructions="Be brief.",
                                              max_output_tokens=20, temperature=0.1)
        async with client.responses.stream(model="m", input=[{"role": "user", "content": "Say hello."}]) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert whole.output_text == "Hello" and whole.status == "completed"
    assert whole.usage is not None and (whole.usage.input_tokens, whole.usage.output_tokens) == (9, 4)
    assert deltas == ["Hel", "lo"] and final.output_text == "Hello"
    sent = upstream.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    assert (sent["max_tokens"], sent["temperature"]) == (20, 0.1)


async def test_responses_maps_tools_and_history_onto_chat(scripted: Scripted, gateway: Any) -> None:
    upstream, gw = await start(scripted, gateway, text_answer("Sunny."))
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    history: Any = [{"role": "user", "content": "Weather?"},
                    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    async with gw.client() as client:
        reply = await client.responses.create(model="m", input=history, tools=[tool], tool_choice="auto",
                                              text={"format": {"type": "json_schema", "name": "w",
                                                               "schema": {"type": "object"}}})
    assert reply.output_text == "Sunny."
    sent = upstream.requests[0]
    function = {"name": "get_weather", "parameters": {"type": "object"}}
    assert sent["tools"] == [{"type": "function", "function": function}]
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert sent["response_format"]["json_schema"]["name"] == "w"


@needs_events
async def test_responses_function_calls_end_to_end(scripted: Scripted, gateway: Any) -> None:
    _, gw = await start(scripted, gateway, tool_answer(("call_a", "get_weather", '{"city":"Paris"}'),
                                                       ("call_b", "get_time", '{"tz":"CET"}')))
    async with gw.client() as client:
        whole = await client.responses.create(model="m", input="Weather and time?")
        async with client.responses.stream(model="m", input="Weather and time?") as stream:
            final = await stream.get_final_response()
    for reply in (whole, final):
        calls = [(o.call_id, o.name, o.arguments) for o in reply.output if o.type == "function_call"]
        assert calls == [("call_a", "get_weather", '{"city":"Paris"}'), ("call_b", "get_time", '{"tz":"CET"}')]


async def test_responses_errors(scripted: Scripted, gateway: Any) -> None:
    cut = sse(chunk(role="assistant"), chunk("Hel"), done=False)
    upstream = await scripted(replying(error_body("model overloaded"), status=503), replying(cut))
    gw = await gateway(upstream.provider(OpenAICompatible, max_retries=1))
    async with gw.client() as client:
        with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
            await client.responses.create(model="m", input="hi", previous_response_id="resp_1")
        with pytest.raises(openai.APIStatusError, match="model overloaded"):
            await client.responses.create(model="m", input="hi")
        async with client.responses.stream(model="m", input="hi") as stream:
            kinds = [e.type async for e in stream]
    assert kinds[-1] in ("response.failed", "response.completed")


# -- Messages ------------------------------------------------------------------------------------


async def test_messages_create_and_stream_text(scripted: Scripted, gateway: Any) -> None:
    upstream, gw = await start(scripted, gateway, text_answer("Hel", "lo", finish="length"))
    async with claude(gw) as client:
        whole = await client.messages.create(model="m", max_tokens=5, system="Be brief.", messages=HI,
                                             stop_sequences=["\n"], extra_body={"temperature": 0.3})
        async with client.messages.stream(model="m", max_tokens=5, messages=HI) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert whole.content[0].type == "text" and whole.content[0].text == "Hello"
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 4
    assert texts == ["Hel", "lo"] and final.stop_reason == "max_tokens" and final.usage.input_tokens == 9
    sent = upstream.requests[0]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (sent["max_tokens"], sent["stop"], sent["temperature"]) == (5, ["\n"], 0.3)


async def test_messages_tool_history_maps_onto_chat(scripted: Scripted, gateway: Any) -> None:
    upstream, gw = await start(scripted, gateway, text_answer("Sunny."))
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "iVBORw0KGgo="}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    tools: Any = [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}]
    async with claude(gw) as client:
        reply = await client.messages.create(model="m", max_tokens=9, messages=messages, tools=tools,
                                             tool_choice={"type": "any"})
    assert reply.content[0].type == "text"
    sent = upstream.requests[0]
    assert sent["messages"][0]["content"][1] == {"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "w", "arguments": '{"c":1}'}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["description"] == "weather"


@needs_events
async def test_messages_tool_use_end_to_end(scripted: Scripted, gateway: Any) -> None:
    _, gw = await start(scripted, gateway, tool_answer(("call_a", "get_weather", '{"city":"Paris"}'),
                                                       ("call_b", "get_time", '{}')))
    async with claude(gw) as client:
        whole = await client.messages.create(model="m", max_tokens=50, messages=HI)
        async with client.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
            final = await stream.get_final_message()
    for reply in (whole, final):
        assert [(b.type, getattr(b, "input", None)) for b in reply.content] == [
            ("tool_use", {"city": "Paris"}), ("tool_use", {})]
        assert reply.stop_reason == "tool_use"


async def test_messages_errors_have_anthropics_shape(scripted: Scripted, gateway: Any) -> None:
    upstream = await scripted(replying(error_body("slow down"), status=429, headers={"Retry-After": "1"}))
    gw = await gateway(upstream.provider(OpenAICompatible, max_retries=1))
    async with claude(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="m", max_tokens=5, messages=HI)
        with pytest.raises(anthropic.AuthenticationError):
            async with claude(gw, "wrong") as wrong:
                await wrong.messages.create(model="m", max_tokens=5, messages=HI)
        with pytest.raises(anthropic.BadRequestError, match="messages"):
            await client.messages.create(model="m", max_tokens=5, messages=[])
        with pytest.raises(anthropic.APIStatusError, match="cannot count tokens") as counting:
            await client.messages.count_tokens(model="m", messages=HI)
    assert limited.value.body == {"type": "error", "error": {"type": "rate_limit_error",
                                                             "message": "OpenAICompatible: HTTP 429: slow down"}}
    assert counting.value.status_code == 501


# -- chat: stream_options ------------------------------------------------------------------------


async def test_client_stream_options_are_merged_not_replaced(scripted: Scripted, gateway: Any) -> None:
    upstream, gw = await start(scripted, gateway, text_answer("ok"))
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True,
                                                      stream_options={"continuous_usage_stats": True})  # type: ignore
        [c async for c in stream]
    assert upstream.requests[0]["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


@needs_events
async def test_chat_relays_tool_calls_streamed_and_whole(scripted: Scripted, gateway: Any) -> None:
    _, gw = await start(scripted, gateway, tool_answer(("call_a", "get_weather", '{"city":"Paris"}'),
                                                       ("call_b", "get_time", '{}')))
    async with gw.client() as client:
        whole = await client.chat.completions.create(model="m", messages=HI)
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        fragments = [c.choices[0].delta.tool_calls async for c in stream if c.choices and c.choices[0].delta.tool_calls]
    calls = whole.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}'), ("call_b", "get_time", "{}")]
    assert whole.choices[0].message.content is None
    assert len(fragments) == 6  # each fragment forwarded as it arrived


# -- CORS, request ids, keep-alive ---------------------------------------------------------------


async def test_cors_preflight_needs_no_token_and_responses_expose_headers(scripted: Scripted, gateway: Any) -> None:
    _, gw = await start(scripted, gateway, text_answer("ok"))
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/chat/completions", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        async with session.get(gw.url + "/v1/models", headers={"Origin": "https://app.example",
                                                               "Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "x-request-id" in response.headers["Access-Control-Expose-Headers"]


async def test_cors_origins_restrict(scripted: Scripted, gateway: Any) -> None:
    _, gw = await start(scripted, gateway, text_answer("ok"), cors_origins=["https://good.example"])
    async with aiohttp.ClientSession() as session:
        for origin, allowed in (("https://good.example", "https://good.example"), ("https://evil.example", None)):
            async with session.get(gw.url + "/health", headers={"Origin": origin,
                                                                "Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.headers.get("Access-Control-Allow-Origin") == allowed


async def test_every_response_carries_a_request_id_also_logged(scripted: Scripted, gateway: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    _, gw = await start(scripted, gateway, text_answer("ok"))
    caplog.set_level(logging.INFO, logger="netfly.gateway")
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=HI,
                                                                     extra_headers={"X-Request-Id": "req-42"})
        stream = await client.chat.completions.with_raw_response.create(model="m", messages=HI, stream=True)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.get("/nope", cast_to=object)
    assert raw.headers["x-request-id"] == "req-42"
    assert len(stream.headers["x-request-id"]) == 32
    assert missing.value.response.headers["x-request-id"]
    assert "request_id=req-42" in caplog.text


async def test_silent_upstream_gets_keepalive_comments(scripted: Scripted, gateway: Any) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.35)
        await response.write(text_answer("late"))
        await response.write_eof()
        return response

    upstream = await scripted(slow)
    gw = await gateway(upstream.provider(OpenAICompatible), keepalive=0.1)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        body = {"model": "m", "messages": HI, "stream": True}
        async with session.post(gw.url + "/v1/chat/completions", json=body) as response:
            raw = (await response.read()).decode()
    assert raw.startswith(": keepalive\n\n") and raw.count(": keepalive") >= 2
    assert '"content":"late"' in raw and raw.endswith("data: [DONE]\n\n")


# -- embeddings ----------------------------------------------------------------------------------


async def test_embeddings_are_one_flat_vector_per_input(scripted: Scripted, gateway: Any) -> None:
    async def embed(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # llama-cpp-python without pooling: one vector per token
        data = [{"object": "embedding", "index": i, "embedding": [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]}
                for i, _ in enumerate(inputs)]
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": 2, "total_tokens": 2}})

    upstream = await scripted(embed)
    gw = await gateway(upstream.provider(OpenAICompatible, default_model="emb"))
    async with gw.client() as client:
        one = await client.embeddings.create(model="emb", input="hello")
        several = await client.embeddings.create(model="emb", input=["a", "b", "c"], encoding_format="float")
    assert one.data[0].embedding == pytest.approx([2.0, 3.0, 4.0])
    assert [d.embedding for d in several.data] == [[2.0, 3.0, 4.0]] * 3
    assert "encoding_format" not in upstream.requests[0]  # floats asked upstream; base64 made here
    assert json.dumps(upstream.requests[1]["input"]) == '["a", "b", "c"]'
