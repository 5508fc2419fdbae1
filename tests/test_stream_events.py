"""Typed events end to end: every kind of delta from a real loopback server, byte-split, assembled
exactly as the openai SDK assembles them; cuts, retries and routing with non-text output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from netfly import (
    ChunkInterpreter,
    OpenAICompatible,
    RetryProvider,
    SSEDecoder,
    StreamInterruptedError,
    UpstreamError,
)
from netfly.chunks import as_events
from netfly.events import ChatAccumulator, ChatResult, ChoiceDelta, ChunkMeta, Event, ToolCall, ToolCallDelta, Usage

from .conftest import ScriptedServer, sse, stream_bytes
from .test_engine import reset_connection

Start = Callable[..., Awaitable[ScriptedServer]]
MESSAGES = [{"role": "user", "content": "weather?"}]
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
         "completion_tokens_details": {"reasoning_tokens": 4}, "prompt_tokens_details": {"cached_tokens": 0}}


def chunk(*choices: dict[str, Any], usage: Any = None, **top: Any) -> dict[str, Any]:
    obj = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 17, "model": "m-1",
           "system_fingerprint": "fp_1", "choices": list(choices), **top}
    if usage is not None:
        obj["usage"] = usage
    return obj


def choice(index: int = 0, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def call(index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index}
    if id is not None:
        fragment.update(id=id, type="function")
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    if function:
        fragment["function"] = function
    return fragment


ONE_CALL = [
    chunk(choice(role="assistant", content=None)),
    chunk(choice(tool_calls=[call(0, id="call_a", name="get_weather", arguments="")])),
    *(chunk(choice(tool_calls=[call(0, arguments=piece)])) for piece in ['{"ci', 'ty": "Pa', 'ris"}']),
    chunk(choice(finish="tool_calls")),
    chunk(usage=USAGE),
]

PARALLEL_CALLS = [
    chunk(choice(role="assistant", content=None)),
    chunk(choice(tool_calls=[call(0, id="call_a", name="get_weather", arguments="")])),
    chunk(choice(tool_calls=[call(0, arguments='{"city": "Paris"}')])),
    chunk(choice(tool_calls=[call(1, id="call_b", name="get_time", arguments="")])),
    chunk(choice(tool_calls=[call(1, arguments='{"tz": ')])),
    chunk(choice(tool_calls=[call(1, arguments='"CET"}')])),
    chunk(choice(finish="tool_calls")),
    chunk(usage=USAGE),
]

# Every kind at once: unknown fields at each level, reasoning then text, a refusal, logprobs, n = 2.
EVERY_KIND = [
    chunk(choice(role="assistant", content=""), choice(1, role="assistant", content=""), service_tier="default"),
    chunk(choice(reasoning_content="Think"), service_tier="default"),
    chunk(choice(reasoning_content="ing."), service_tier="default"),
    chunk({**choice(content="Hel"), "logprobs": {"content": [{"token": "Hel", "logprob": -0.1}]}},
          service_tier="default"),
    chunk(choice(content="lo", annotations=[{"type": "note"}]), service_tier="default"),
    chunk({**choice(1, content="Bye"), "content_filter_results": {"hate": {"filtered": False}}},
          service_tier="default"),
    chunk(choice(1, refusal="No."), service_tier="default"),
    chunk(choice(tool_calls=[{**call(0, id="call_z", name="f", arguments="{}"), "extra_key": 1}]),
          service_tier="default"),
    chunk(choice(finish="stop"), choice(1, finish="stop"), service_tier="default"),
    chunk(usage=USAGE, service_tier="default"),
]


def openai_assembles(chunks: list[dict[str, Any]]) -> Any:
    """The openai SDK's own accumulation of the same chunks."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for obj in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(obj))
    return state.current_completion_snapshot


def assert_same_as_openai(result: ChatResult, chunks: list[dict[str, Any]]) -> None:
    snapshot = openai_assembles(chunks)
    message = snapshot.choices[0].message
    assert result.text == (message.content or "")
    assert result.finish_reason == snapshot.choices[0].finish_reason
    expected = [{"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in message.tool_calls or []]
    assert [c.to_dict() for c in result.tool_calls] == expected
    assert result.usage == snapshot.usage.model_dump(exclude_none=True)
    assert (result.id, result.model, result.created) == (snapshot.id, snapshot.model, snapshot.created)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The stream byte by byte, and cut in two at every offset."""
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def decode(pieces: list[bytes]) -> list[Event]:
    """Decoder and interpreter as the engine drives them."""
    decoder, interpreter, events = SSEDecoder(), ChunkInterpreter(), []
    for piece in [*pieces, None]:
        for sse_event in decoder.feed(piece) if piece is not None else decoder.flush():
            item = interpreter.interpret(sse_event)
            if item is not None:
                events += as_events(item)
    return events


def served(*script: bytes, slices: int = 0) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body = b"".join(script)

    async def handler(request: web.Request) -> web.StreamResponse:
        pieces = [body[i : i + slices] for i in range(0, len(body), slices)] if slices else [body]
        return await stream_bytes(request, *pieces)

    return handler


# -- pure: every offset ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [ONE_CALL, PARALLEL_CALLS, EVERY_KIND], ids=["one-call", "parallel", "every-kind"])
def test_events_are_the_same_whatever_the_byte_split(chunks: list[dict[str, Any]]) -> None:
    data = sse(*chunks)
    whole = decode([data])
    for pieces in splits(data):
        assert decode(pieces) == whole


# -- a real server ------------------------------------------------------------------------------------


async def events_and_result(provider: Any, **kwargs: Any) -> tuple[list[Event], ChatResult]:
    stream = provider.stream("", MESSAGES, **kwargs)
    events = [event async for event in stream.events()]
    assert stream.result is not None
    return events, stream.result


@pytest.mark.parametrize("chunks", [ONE_CALL, PARALLEL_CALLS], ids=["one-call", "two-parallel-calls"])
async def test_tool_call_streams_are_assembled_as_the_openai_sdk_does(scripted: Start, chunks: Any) -> None:
    server = await scripted(served(sse(*chunks), slices=1))  # one byte per write
    events, result = await events_and_result(server.provider(OpenAICompatible))
    assert_same_as_openai(result, chunks)
    assert result.finish_reason == "tool_calls" and result.text == ""
    assert events[0] == ChunkMeta(id="chatcmpl-7", model="m-1", created=17, system_fingerprint="fp_1")
    assert events[-1] == Usage(USAGE) and isinstance(events[-2], ChoiceDelta) and events[-2].finish_reason
    fragments = [f for e in events if isinstance(e, ChoiceDelta) for f in e.tool_calls]
    assert fragments[0] == ToolCallDelta(0, id="call_a", type="function", name="get_weather", arguments="")
    # complete() of a tool-call answer returns the calls
    assert (await server.provider(OpenAICompatible).complete("", MESSAGES)).tool_calls == result.tool_calls


async def test_every_kind_of_event_in_order_with_unknown_fields_kept(scripted: Start) -> None:
    server = await scripted(served(sse(*EVERY_KIND), slices=7))
    events, result = await events_and_result(server.provider(OpenAICompatible), n=2)
    assert events == [
        ChunkMeta(id="chatcmpl-7", model="m-1", created=17, system_fingerprint="fp_1",
                  extra={"service_tier": "default"}),
        ChoiceDelta(role="assistant", text=""),
        ChoiceDelta(index=1, role="assistant", text=""),
        ChoiceDelta(reasoning="Think"),
        ChoiceDelta(reasoning="ing."),
        ChoiceDelta(text="Hel", logprobs={"content": [{"token": "Hel", "logprob": -0.1}]}),
        ChoiceDelta(text="lo", delta_extra={"annotations": [{"type": "note"}]}),
        ChoiceDelta(index=1, text="Bye", choice_extra={"content_filter_results": {"hate": {"filtered": False}}}),
        ChoiceDelta(index=1, refusal="No."),
        ChoiceDelta(tool_calls=(ToolCallDelta(0, id="call_z", type="function", name="f", arguments="{}",
                                              extra={"extra_key": 1}),)),
        ChoiceDelta(finish_reason="stop"),
        ChoiceDelta(index=1, finish_reason="stop"),
        Usage(USAGE),
    ]
    assert (result.text, result.reasoning, result.finish_reason) == ("Hello", "Thinking.", "stop")
    assert result.logprobs == {"content": [{"token": "Hel", "logprob": -0.1}]}
    assert [(c.index, c.text, c.refusal) for c in result.choices] == [(0, "Hello", None), (1, "Bye", "No.")]
    assert result.tool_calls == [ToolCall(id="call_z", name="f", arguments="{}", extra={"extra_key": 1})]
    assert result.usage == USAGE
    assert server.requests[0]["n"] == 2


async def test_text_iteration_of_the_same_stream_yields_choice_0_text_only(scripted: Start) -> None:
    server = await scripted(served(sse(*EVERY_KIND)))
    stream = server.provider(OpenAICompatible).stream("", MESSAGES)
    assert [text async for text in stream] == ["Hel", "lo"]
    assert stream.result is not None and stream.result.choices[1].text == "Bye"
    assert stream.stats.chunks == 7 and stream.stats.characters == len("HelloBye")  # 7 deltas with output
    with pytest.raises(RuntimeError, match="not both"):
        [e async for e in stream.events()]


async def test_provider_events_is_the_stream_events(scripted: Start) -> None:
    server = await scripted(served(sse(*ONE_CALL)))
    events = [e async for e in server.provider(OpenAICompatible).events(None, MESSAGES)]
    accumulator = ChatAccumulator()
    for event in events:
        accumulator.add(event)
    assert_same_as_openai(accumulator.result(), ONE_CALL)


# -- non-streamed answers (stream=False, or a server that ignores stream: true) ------------------------


def completion_body() -> dict[str, Any]:
    return {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "m-2", "service_tier": "default",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "Let me look.", "reasoning_content": "hm",
            "tool_calls": [{"id": "call_q", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        }}],
        "usage": USAGE,
    }


async def test_stream_false_is_sent_and_the_json_answer_gives_the_same_events(scripted: Start) -> None:
    async def json_answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(completion_body())

    server = await scripted(json_answer)
    events, result = await events_and_result(server.provider(OpenAICompatible), stream=False)
    assert server.requests[0]["stream"] is False
    assert events == [
        ChunkMeta(id="chatcmpl-9", model="m-2", created=5, extra={"service_tier": "default"}),
        ChoiceDelta(role="assistant", text="Let me look.", reasoning="hm", finish_reason="tool_calls",
                    tool_calls=(ToolCallDelta(0, id="call_q", type="function", name="f", arguments='{"a": 1}'),)),
        Usage(USAGE),
    ]
    assert result.tool_calls == [ToolCall(id="call_q", name="f", arguments='{"a": 1}')]
    text = await server.provider(OpenAICompatible).create_async("", MESSAGES, stream=False)
    assert text == "Let me look."


# -- cuts and retries with output other than text ------------------------------------------------------


def cut_after(data: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(data)
        await asyncio.sleep(0.05)
        reset_connection(request)
        return response

    return handler


async def test_a_cut_inside_tool_call_arguments_keeps_the_partial_call_and_is_not_retried(scripted: Start) -> None:
    delivered = [chunk(choice(role="assistant", content=None)),
                 chunk(choice(tool_calls=[call(0, id="call_a", name="get_weather", arguments='{"ci')])),
                 chunk(choice(tool_calls=[call(0, arguments='ty": "Pa')]))]
    server = await scripted(cut_after(sse(*delivered, done=False)), served(sse(*ONE_CALL)))
    stream = server.provider(OpenAICompatible, max_retries=3).stream("", MESSAGES)
    seen: list[Event] = []
    with pytest.raises(StreamInterruptedError) as caught:
        async for event in stream.events():
            seen.append(event)
    partial = caught.value.partial_result
    assert partial.tool_calls == [ToolCall(id="call_a", name="get_weather", arguments='{"city": "Pa')]
    assert caught.value.partial_text == "" and partial.text == ""
    assert len(server.requests) == 1  # a tool-call fragment is output: never retried
    assert len(stream.stats.attempts) == 1


async def test_reasoning_then_text_and_a_cut_after_reasoning_only_is_an_interruption(scripted: Start) -> None:
    reasoning = [chunk(choice(role="assistant")), chunk(choice(reasoning_content="Hmm, "))]
    server = await scripted(cut_after(sse(*reasoning, done=False)))
    with pytest.raises(StreamInterruptedError) as caught:
        await server.provider(OpenAICompatible, max_retries=3).complete("", MESSAGES)
    assert caught.value.partial_result.reasoning == "Hmm, "
    assert len(server.requests) == 1

    whole = [*reasoning, chunk(choice(reasoning_content="ok.")), chunk(choice(content="Yes")),
             chunk(choice(finish="stop"))]
    server = await scripted(served(sse(*whole)))
    stream = server.provider(OpenAICompatible).stream("", MESSAGES)
    assert [text async for text in stream] == ["Yes"]
    assert stream.result is not None and (stream.result.reasoning, stream.result.text) == ("Hmm, ok.", "Yes")


async def test_role_only_and_meta_before_a_cut_are_no_output_so_the_call_is_retried(scripted: Start) -> None:
    server = await scripted(cut_after(sse(chunk(choice(role="assistant")), done=False)),
                            served(sse(*ONE_CALL)))
    events, result = await events_and_result(server.provider(OpenAICompatible, retry_delay=0.01))
    assert len(server.requests) == 2
    assert_same_as_openai(result, ONE_CALL)
    assert sum(isinstance(e, ChoiceDelta) and e.role == "assistant" for e in events) == 2  # one per attempt


async def test_time_to_first_token_counts_the_first_output_not_the_role(scripted: Start) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(choice(role="assistant")), done=False))
        await asyncio.sleep(0.3)
        await response.write(sse(*ONE_CALL[1:]))
        await response.write_eof()
        return response

    server = await scripted(slow)
    stream = server.provider(OpenAICompatible).stream("", MESSAGES)
    async for _ in stream.events():
        pass
    assert stream.stats.time_to_first_token is not None and stream.stats.time_to_first_token >= 0.3


# -- routing ------------------------------------------------------------------------------------------


async def test_a_routed_stream_has_the_same_events_and_falls_over_before_the_first_output(
    scripted: Start, free_port: int
) -> None:
    down = OpenAICompatible.configure(url=f"http://127.0.0.1:{free_port}", name="Down", max_retries=1)
    no_output = await scripted(cut_after(sse(chunk(choice(role="assistant")), done=False)))
    good = await scripted(served(sse(*PARALLEL_CALLS)))
    router = RetryProvider([down, no_output.provider(OpenAICompatible, name="Cut"),
                            good.provider(OpenAICompatible, name="Good")], max_retries=1)
    stream = router.stream(None, MESSAGES)
    events = [e async for e in stream.events()]
    assert stream.result is not None
    assert_same_as_openai(stream.result, PARALLEL_CALLS)
    assert stream.stats.provider == "Good"
    assert [a.provider for a in stream.stats.attempts] == ["Down", "Cut", "Good"]
    assert sum(isinstance(e, ChoiceDelta) and e.role is not None for e in events) == 1  # the winner's prelude only
    assert json.loads(json.dumps(stream.result.tool_calls[1].to_dict()))["function"]["name"] == "get_time"


async def test_a_routed_cut_inside_a_tool_call_is_not_sent_to_another_provider(scripted: Start) -> None:
    delivered = [chunk(choice(tool_calls=[call(0, id="call_a", name="f", arguments='{"x')]))]
    cut = await scripted(cut_after(sse(*delivered, done=False)))
    good = await scripted(served(sse(*ONE_CALL)))
    router = RetryProvider([cut.provider(OpenAICompatible, name="Cut"), good.provider(OpenAICompatible)],
                           max_retries=1)
    with pytest.raises(StreamInterruptedError) as caught:
        await router.complete(None, MESSAGES)
    assert caught.value.partial_result.tool_calls == [ToolCall(id="call_a", name="f", arguments='{"x')]
    assert good.requests == []


async def test_collect_reads_the_whole_answer_as_reads_would_plain_and_routed(
    scripted: Start, free_port: int
) -> None:
    server = await scripted(served(sse(*EVERY_KIND)), served(sse(*EVERY_KIND)), served(sse(*EVERY_KIND)))
    provider = server.provider(OpenAICompatible)
    down = OpenAICompatible.configure(url=f"http://127.0.0.1:{free_port}", name="Down", max_retries=1)
    for make in (provider, RetryProvider([down, provider], max_retries=1)):
        read = make.stream("", MESSAGES)
        async for _ in read.reads():
            pass
        collected = make.stream("", MESSAGES)
        result = await collected.collect()
        assert result is collected.result and result == read.result
        assert (result.text, result.choices[1].refusal) == ("Hello", "No.")
        assert (collected.stats.chunks, collected.stats.characters) == (read.stats.chunks, read.stats.characters) == (
            7, len("HelloBye"))
        assert collected.stats.provider == read.stats.provider
        assert [a.error is None for a in collected.stats.attempts] == [a.error is None for a in read.stats.attempts]
        with pytest.raises(RuntimeError, match="iterated once"):
            await collected.collect()


# -- batches: the events of each upstream read together -------------------------------------------------


async def test_event_batches_are_the_events_grouped_by_upstream_read(scripted: Start) -> None:
    reads = [sse(*EVERY_KIND[:4], done=False), sse(*EVERY_KIND[4:])]

    async def two_reads(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, *reads, delay=0.05)  # the pause keeps the two reads apart

    server = await scripted(two_reads, two_reads)
    expected, _ = await events_and_result(server.provider(OpenAICompatible), n=2)
    stream = server.provider(OpenAICompatible).stream("", MESSAGES, n=2)
    batches = [batch async for batch in stream.event_batches()]
    assert [event for batch in batches for event in batch] == expected
    # The first read's first output (reasoning, in its second event) goes ahead of the rest of that read.
    assert len(batches) == 3 and batches[0] + batches[1] == decode([reads[0]])
    assert batches[0] == decode([sse(*EVERY_KIND[:2], done=False)])
    assert stream.result is not None and stream.result.text == "Hello"


@pytest.mark.parametrize("events", [1, 2, 3], ids=["alone", "after-a-role-chunk", "after-two-empty-chunks"])
async def test_the_first_output_of_a_long_first_read_goes_ahead_of_the_rest(scripted: Start, events: int) -> None:
    """A fast upstream's first read may hold the whole answer: its first text is handed on before the
    rest of the read is interpreted, so the first token is not held back by the last."""
    before = [chunk(choice(role="assistant", content="")), chunk(choice(content=""))][: events - 1]
    texts = [chunk(choice(content=t)) for t in ["Hel", "lo", ", ", "wor", "ld", "!"]]
    body = sse(*before, *texts, chunk(choice(finish="stop")))
    server = await scripted(served(body))
    stream = server.provider(OpenAICompatible).stream("", MESSAGES)
    reads = [read async for read in stream.reads()]
    first, rest = ([e for item in read for e in as_events(item)] for read in reads)  # exactly two reads
    assert first[-1] == ChoiceDelta(text="Hel") and rest[0] == ChoiceDelta(text="lo")
    assert first + rest == decode([body])
    assert stream.result is not None and stream.result.text == "Hello, world!"


async def test_event_batches_deliver_the_text_before_an_error_in_the_same_read(scripted: Start) -> None:
    body = sse(chunk(choice(content="Hel")), chunk(choice(content="lo")), {"error": {"message": "overloaded"}})
    server = await scripted(served(body))
    got: list[Event] = []
    with pytest.raises(UpstreamError, match="overloaded"):
        async for batch in server.provider(OpenAICompatible).stream("", MESSAGES).event_batches():
            got += batch
    assert [e.text for e in got if isinstance(e, ChoiceDelta)] == ["Hel", "lo"]
