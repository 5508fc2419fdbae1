"""The API adapters, byte for byte: typed events in, each API's documented event sequence out.

The golden files follow the documented examples of each API (OpenAI chat chunks, the Responses
streaming events, Anthropic's Messages streaming events); each is also replayed from a loopback
server to the official client, which must assemble the expected answer from it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from netfly.chunks import Item, as_events
from netfly.events import ChoiceDelta, ChunkMeta, Event, ToolCallDelta, Usage
from netfly.gateway.chat import ChatChunkEncoder
from netfly.gateway.errors import ErrorInfo
from netfly.gateway.messages import MessageBuilder, MessagesEncoder
from netfly.gateway.relay import StreamEncoder, encode_read
from netfly.gateway.responses import ResponseBuilder, ResponsesEncoder

GOLDEN = Path(__file__).parent / "golden"
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}

TEXT: list[Event] = [
    ChunkMeta(id="chatcmpl-1", model="m", created=1700000000, system_fingerprint="fp_1"),
    ChoiceDelta(role="assistant", text=""),
    ChoiceDelta(reasoning="Think."),
    ChoiceDelta(text="Hello"),
    ChoiceDelta(text=", world"),
    ChoiceDelta(finish_reason="stop"),
    Usage(USAGE),
]
TOOLS: list[Event] = [
    ChunkMeta(id="chatcmpl-2", model="m", created=1700000000),
    ChoiceDelta(role="assistant"),
    ChoiceDelta(tool_calls=(ToolCallDelta(0, id="call_a", type="function", name="get_weather", arguments=""),)),
    ChoiceDelta(tool_calls=(ToolCallDelta(0, arguments='{"city": '),)),
    ChoiceDelta(tool_calls=(ToolCallDelta(0, arguments='"Paris"}'),)),
    ChoiceDelta(tool_calls=(ToolCallDelta(1, id="call_b", type="function", name="get_time", arguments='{}'),)),
    ChoiceDelta(finish_reason="tool_calls"),
    Usage(USAGE),
]


def encode(encoder: StreamEncoder, events: list[Event], error: ErrorInfo | None = None) -> bytes:
    out = encoder.start() + b"".join(encoder.encode(e) for e in events)
    return out + (encoder.error(error) if error else encoder.finish())


def chat_encoder() -> ChatChunkEncoder:
    return ChatChunkEncoder("gw-model", include_usage=True)


def responses_encoder() -> ResponsesEncoder:
    builder = ResponseBuilder("gw-model", {"model": "gw-model", "input": "hi"})
    builder.id, builder.created_at, builder.message_id, builder.reasoning_id = "resp_1", 1700000000, "msg_1", "rs_1"
    builder.call_ids = {0: "fc_0", 1: "fc_1"}
    return ResponsesEncoder(builder)


def messages_encoder() -> MessagesEncoder:
    builder = MessageBuilder("gw-model")
    builder.id = "msg_1"
    return MessagesEncoder(builder)


CASES = {
    "chat_text": (chat_encoder, TEXT, None),
    "chat_tools": (chat_encoder, TOOLS, None),
    "responses_text": (responses_encoder, TEXT, None),
    "responses_tools": (responses_encoder, TOOLS, None),
    "responses_failed": (responses_encoder, TEXT[:4], ErrorInfo(502, "upstream cut off", "upstream_error")),
    "messages_text": (messages_encoder, TEXT, None),
    "messages_tools": (messages_encoder, TOOLS, None),
    "messages_error": (messages_encoder, TEXT[:4], ErrorInfo(503, "Overloaded", "upstream_error")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_event_sequence_matches_the_golden_file(name: str) -> None:
    make, events, error = CASES[name]
    assert encode(make(), events, error).decode() == (GOLDEN / f"{name}.sse").read_text()


async def serve_golden(aiohttp_server: Any, name: str) -> str:
    body = (GOLDEN / f"{name}.sse").read_bytes()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_openai_sdk_assembles_the_chat_tool_calls(aiohttp_server: Any) -> None:
    url = await serve_golden(aiohttp_server, "chat_tools")
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client, \
            client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}]) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", "{}")]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 19


async def test_openai_sdk_assembles_the_responses_stream(aiohttp_server: Any) -> None:
    url = await serve_golden(aiohttp_server, "responses_text")
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client, \
            client.responses.stream(model="m", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Hello, world"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage is not None and final.usage.output_tokens == 7


async def test_openai_sdk_assembles_the_responses_function_calls(aiohttp_server: Any) -> None:
    url = await serve_golden(aiohttp_server, "responses_tools")
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client, \
            client.responses.stream(model="m", input="hi") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    calls = [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert calls == [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", "{}")]
    assert deltas == ['{"city": ', '"Paris"}', "{}"]


async def test_anthropic_sdk_assembles_the_messages_stream(aiohttp_server: Any) -> None:
    url = await serve_golden(aiohttp_server, "messages_tools")
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client, \
            client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in final.content] == [
        ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_time", {})]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 7)


async def test_anthropic_sdk_reads_text_thinking_and_in_stream_errors(aiohttp_server: Any) -> None:
    url = await serve_golden(aiohttp_server, "messages_text")
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client, \
            client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hello, world" and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    url = await serve_golden(aiohttp_server, "messages_error")
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with client.messages.stream(model="m", max_tokens=10,
                                              messages=[{"role": "user", "content": "hi"}]) as s:
                await s.get_final_message()


def test_chat_chunks_keep_unknown_fields_and_null_content() -> None:
    encoder = ChatChunkEncoder("gw", include_usage=False)
    encoder.encode(ChunkMeta(id="c1", created=5, extra={"service_tier": "default"}))
    raw = encoder.encode(ChoiceDelta(text="hi", delta_extra={"audio": None}, choice_extra={"stop_reason": 7}))
    chunk = json.loads(raw.decode().removeprefix("data: "))
    assert chunk["service_tier"] == "default" and chunk["id"] == "c1"
    assert chunk["choices"][0] == {"index": 0, "delta": {"audio": None, "content": "hi"}, "logprobs": None,
                                   "finish_reason": None, "stop_reason": 7}


def test_responses_text_after_reasoning_again_continues_one_new_message_item() -> None:
    events: list[Event] = [*TEXT[:5], ChoiceDelta(reasoning="More."), ChoiceDelta(text="A"), ChoiceDelta(text="B"),
                           ChoiceDelta(text="C"), ChoiceDelta(finish_reason="stop")]
    stream = encode(responses_encoder(), events).decode()
    added = [json.loads(line[6:]) for line in stream.splitlines()
             if line.startswith("data: ") and '"response.output_item.added"' in line]
    assert [event["item"]["type"] for event in added] == ["reasoning", "message", "reasoning", "message"]
    deltas = [json.loads(line[6:]) for line in stream.splitlines() if '"response.output_text.delta"' in line]
    assert [(d["delta"], d["output_index"]) for d in deltas] == [("Hello", 1), (", world", 1), ("A", 3), ("B", 3),
                                                                ("C", 3)]
    numbers = [json.loads(line[6:])["sequence_number"] for line in stream.splitlines() if line.startswith("data: ")]
    assert numbers == list(range(len(numbers)))


_RUN = ["Hel", "lo", " \u0442\u0438\u0445", ' "quoted"', "\U0001f332\\", "\n"]
_BEFORE_RUN: dict[str, list[Event]] = {
    "nothing": [],
    "a text delta": [ChunkMeta(id="up-1", model="m", created=5), ChoiceDelta(role="assistant"), ChoiceDelta(text="A")],
    "reasoning": [ChoiceDelta(reasoning="think")],
    "a tool call": [ChoiceDelta(tool_calls=(ToolCallDelta(index=0, id="c1", name="f", arguments="{}"),))],
    "a refusal": [ChoiceDelta(text="A"), ChoiceDelta(refusal="no")],
}


@pytest.mark.parametrize("before", list(_BEFORE_RUN))
@pytest.mark.parametrize("make", [chat_encoder, responses_encoder, messages_encoder])
def test_a_run_of_texts_encodes_as_its_deltas_one_by_one(make: Any, before: str) -> None:
    """``encode_texts`` (how the relay sends a read of plain text chunks) gives the bytes, and leaves the
    encoder in the state, of ``encode`` of each text's delta, whatever came before."""
    encoder = make()
    encoder.start()
    for event in _BEFORE_RUN[before]:
        encoder.encode(event)
    one_by_one = copy.deepcopy(encoder)
    assert encoder.encode_texts(_RUN) == b"".join(one_by_one.encode(ChoiceDelta(text=t)) for t in _RUN)
    assert encoder.encode(ChoiceDelta(text="!", finish_reason="stop")) == one_by_one.encode(
        ChoiceDelta(text="!", finish_reason="stop"))
    assert encoder.finish() == one_by_one.finish()
    if not isinstance(encoder, ChatChunkEncoder):  # the answer each keeps for its closing events
        assert encoder.accumulator.result() == one_by_one.accumulator.result()


_MIXED_READ: list[Item] = [
    [ChunkMeta(id="up-1", model="m", created=5), ChoiceDelta(role="assistant", text="")], "Hel", "lo",
    [ChoiceDelta(tool_calls=(ToolCallDelta(index=0, id="c1", name="f", arguments="{}"),))], " \u0442", "!",
    [ChoiceDelta(finish_reason="stop")], [Usage({"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5})],
]


@pytest.mark.parametrize("make", [chat_encoder, responses_encoder, messages_encoder])
def test_a_read_of_texts_and_events_encodes_as_its_events_one_by_one(make: Any) -> None:
    """A read that mixes plain texts and events (the first read of a short answer: role, texts, finish)
    gives the bytes of encoding its events in order."""
    encoder = make()
    encoder.start()
    one_by_one = copy.deepcopy(encoder)
    expected = b"".join(one_by_one.encode(event) for item in _MIXED_READ for event in as_events(item))
    assert encode_read(encoder, _MIXED_READ) == expected
    assert encoder.finish() == one_by_one.finish()
