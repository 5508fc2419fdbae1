"""ChunkInterpreter: server-sent events of a chat completion in, text or typed events out."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from netfly import ChatResult, ChunkInterpreter, ServerSentEvent, SSEDecoder, StreamDecodeError, UpstreamError
from netfly.chunks import Item, as_events
from netfly.events import ChatAccumulator, ChoiceDelta, ChunkMeta, Usage

from .conftest import answer, chunk, sse


class Run:
    """What interpreting a whole stream gave: choice 0's text pieces, the events, the result."""

    def __init__(self, interpreter: ChunkInterpreter) -> None:
        self.interpreter = interpreter
        self.texts: list[str] = []
        self.events: list[Any] = []
        self.accumulator = ChatAccumulator()

    def add(self, item: Item) -> None:
        for ev in as_events(item):
            self.events.append(ev)
            self.accumulator.add(ev)
            if isinstance(ev, ChoiceDelta) and ev.index == 0 and ev.text:
                self.texts.append(ev.text)

    @property
    def result(self) -> ChatResult:
        return self.accumulator.result(malformed_chunks=self.interpreter.malformed_chunks)


def run(stream: bytes, interpreter: ChunkInterpreter | None = None) -> tuple[list[str], Run]:
    """Decode ``stream`` and interpret its events the way the engine does: stop at [DONE]."""
    done = Run(interpreter or ChunkInterpreter())
    decoder = SSEDecoder()
    for event in decoder.feed(stream) + decoder.flush():
        item = done.interpreter.interpret(event)
        if item is not None:
            done.add(item)
        if done.interpreter.done:
            break
    return done.texts, done


def text_of(item: Item | None) -> str:
    """Choice 0's text in one interpreter result."""
    if item is None:
        return ""
    return "".join(e.text or "" for e in as_events(item) if isinstance(e, ChoiceDelta) and e.index == 0)


def event(obj: Any, name: str = "message") -> ServerSentEvent:
    return ServerSentEvent(obj if isinstance(obj, str) else json.dumps(obj), event=name)


def test_content_deltas_are_the_answer_text() -> None:
    texts, done = run(answer("Hel", "lo", ", мир 👋"))
    assert texts == ["Hel", "lo", ", мир 👋"]
    assert done.interpreter.done
    result = done.result
    assert result.text == "Hello, мир 👋" == str(result)
    assert result.finish_reason == "stop"
    assert result.model == "test-model"
    assert result.id == "chatcmpl-1"
    assert result.malformed_chunks == 0


def test_done_ends_the_stream() -> None:
    interpreter = ChunkInterpreter()
    assert interpreter.interpret(ServerSentEvent("[DONE]")) is None
    assert interpreter.done


def test_text_after_done_is_never_read() -> None:
    texts, done = run(sse(chunk("a")) + sse(chunk("after"), done=False))
    assert texts == ["a"]
    assert done.interpreter.done


def test_role_only_delta_yields_no_text_but_the_chunk_fields_and_the_role() -> None:
    interpreter = ChunkInterpreter()
    first = interpreter.interpret(event(chunk(role="assistant")))
    assert first == [ChunkMeta(id="chatcmpl-1", model="test-model", created=1), ChoiceDelta(role="assistant")]
    assert interpreter.interpret(event(chunk(role="assistant", content=""))) == [ChoiceDelta(role="assistant", text="")]
    assert not any(isinstance(e, ChoiceDelta) and e.has_output for e in first)


def test_plain_text_chunks_come_as_str_and_a_change_of_chunk_fields_as_an_event() -> None:
    interpreter = ChunkInterpreter()
    assert isinstance(interpreter.interpret(event(chunk("a"))), list)  # the first: its fields are news
    assert interpreter.interpret(event(chunk("b"))) == "b"
    # "usage": null on every chunk (include_usage) is no change of the chunk's fields
    assert interpreter.interpret(event({**chunk("c"), "usage": None})) == [ChoiceDelta(text="c")]
    assert interpreter.interpret(event({**chunk("c2"), "usage": None})) == "c2"
    changed = interpreter.interpret(event({**chunk("d"), "service_tier": "flex", "system_fingerprint": "fp"}))
    assert changed == [
        ChunkMeta(id="chatcmpl-1", model="test-model", created=1, system_fingerprint="fp",
                  extra={"service_tier": "flex"}),
        ChoiceDelta(text="d"),
    ]
    assert interpreter.interpret(event({**chunk("e"), "service_tier": "flex", "system_fingerprint": "fp"})) == "e"


@pytest.mark.parametrize("text", ["plain", 'a "quoted" \\ path\\', "tab\there", "é🌲\u2028", "", "\\"])
def test_a_chunk_like_the_last_but_its_text_gives_that_text(text: str) -> None:
    interpreter = ChunkInterpreter()
    for first in ("a", "b"):  # the second one shows the shape of a plain text chunk
        interpreter.interpret(event(chunk(first)))
    for raw in (json.dumps(chunk(text)), json.dumps(chunk(text), ensure_ascii=False)):
        assert interpreter.interpret(event(raw)) == (text or None)


@pytest.mark.parametrize(
    "middle", ['"x","extra":"y"', '"x"]', "null", '"raw\u0001"'.replace("\\u0001", "\x01"), 'xy"', '"xy', "5"]
)
def test_a_chunk_whose_middle_is_not_one_string_is_read_in_full(middle: str) -> None:
    interpreter = ChunkInterpreter()
    for first in ("a", "b"):
        interpreter.interpret(event(chunk(first)))
    before, _, after = json.dumps(chunk("b")).partition('"b"')
    item = interpreter.interpret(event(before + middle + after))
    if middle == '"x","extra":"y"':
        assert item == [ChoiceDelta(text="x", delta_extra={"extra": "y"})]
    else:  # null content is no text; the others are not JSON
        assert item is None and interpreter.malformed_chunks == (middle != "null")


def test_chunk_fields_that_change_back_are_an_event_again() -> None:
    interpreter = ChunkInterpreter()
    for first in ("a", "b"):
        interpreter.interpret(event(chunk(first)))
    interpreter.interpret(event({**chunk("c"), "system_fingerprint": "fp"}))
    assert interpreter.interpret(event(chunk("d")))[0] == ChunkMeta(  # type: ignore[index]
        id="chatcmpl-1", model="test-model", created=1)


def test_usage_only_chunk_yields_nothing_but_its_usage_is_kept() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    stream = sse(chunk("Hi"), chunk(finish="stop"), chunk(choices=False, usage=usage))
    texts, done = run(stream)
    assert texts == ["Hi"]
    result = done.result
    assert result.usage == usage
    assert result.finish_reason == "stop"
    assert done.events[-1] == Usage(usage)


def test_content_filter_prelude_with_empty_choices_is_skipped() -> None:
    prelude = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    texts, done = run(sse(prelude, chunk("ok", model="gpt-4o")))
    assert texts == ["ok"]
    assert done.interpreter.malformed_chunks == 0
    assert done.events[0].extra == {"prompt_filter_results": prelude["prompt_filter_results"]}  # a relay keeps it


def test_finish_reason_and_usage_on_the_last_content_chunk_are_kept() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    texts, done = run(sse(chunk("end", finish="length", usage=usage)))
    assert texts == ["end"]
    assert (done.result.finish_reason, done.result.usage) == ("length", usage)


def test_first_model_is_kept_and_a_new_one_is_an_event() -> None:
    _, done = run(sse(chunk("a", model="first"), chunk("b", model="second")))
    assert done.result.model == "first"
    assert [e.model for e in done.events if isinstance(e, ChunkMeta)] == ["first", "second"]


def test_reasoning_is_kept_apart_from_the_answer() -> None:
    stream = sse(chunk(reasoning="Let me "), chunk(reasoning="think."), chunk("Answer"),
                 {"choices": [{"index": 0, "delta": {"reasoning": " More."}}]}, chunk(finish="stop"))
    texts, done = run(stream)
    assert texts == ["Answer"]
    result = done.result
    assert result.text == "Answer"
    assert result.reasoning == "Let me think. More."
    fields = [e.reasoning_field for e in done.events if isinstance(e, ChoiceDelta) and e.reasoning]
    assert fields == ["reasoning_content", "reasoning_content", "reasoning"]


def test_tool_call_deltas_are_collected() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    texts, done = run(sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
    assert texts == []
    assert [c.to_dict() for c in done.result.tool_calls] == [{k: v for k, v in call.items() if k != "index"}]


def test_comments_and_empty_data_are_ignored() -> None:
    texts, done = run(b": keep-alive\n\ndata:\n\n" + answer("x"))
    assert texts == ["x"]
    assert done.interpreter.malformed_chunks == 0


# -- whole chat.completion (server ignored stream: true) -----------------------------------------


def completion(content: Any = "Whole answer", **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **extra}
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "m-1",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def whole(body: Any) -> tuple[str, ChatResult]:
    interpreter = ChunkInterpreter()
    done = Run(interpreter)
    done.add(interpreter.interpret_completion(body))
    assert interpreter.done
    return "".join(done.texts), done.result


def test_whole_chat_completion_yields_its_content_once() -> None:
    text, result = whole(completion(reasoning_content="hmm"))
    assert text == "Whole answer"
    assert (result.finish_reason, result.model, result.id) == ("stop", "m-1", "chatcmpl-9")
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert result.reasoning == "hmm"


def test_whole_completion_without_content() -> None:
    assert whole(completion(content=None))[0] == ""
    assert whole({"choices": []})[0] == ""


def test_legacy_text_completion_shape() -> None:
    body = {"choices": [{"index": 0, "text": "legacy", "finish_reason": "stop"}]}
    assert whole(body)[0] == "legacy"


def test_whole_completion_carrying_an_error_raises_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="model overloaded"):
        ChunkInterpreter().interpret_completion({"error": {"message": "model overloaded", "code": 503}})


@pytest.mark.parametrize("body", [[1, 2], "text", {"choices": ["x"]}, {"choices": [{"message": "x"}]},
                                  {"choices": [{"message": {"content": 5}}]}])
def test_whole_completion_of_the_wrong_shape_raises_decode_error(body: Any) -> None:
    with pytest.raises(StreamDecodeError):
        ChunkInterpreter().interpret_completion(body)


# -- errors inside the stream --------------------------------------------------------------------


def test_error_object_in_data_raises_upstream_error_with_the_server_message() -> None:
    stream = sse(chunk("partial"), {"error": {"message": "Rate limit reached for model", "type": "rate_limit",
                                              "code": "rate_limit_exceeded"}})
    interpreter = ChunkInterpreter()
    decoder = SSEDecoder()
    events = decoder.feed(stream)
    assert text_of(interpreter.interpret(events[0])) == "partial"
    with pytest.raises(UpstreamError) as info:
        interpreter.interpret(events[1])
    assert info.value.message == "Rate limit reached for model"
    assert str(info.value) == "Rate limit reached for model"
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.type == "rate_limit"


def test_error_as_a_plain_string() -> None:
    with pytest.raises(UpstreamError, match=r"^upstream exploded$"):
        ChunkInterpreter().interpret(event({"error": "upstream exploded"}))


def test_null_error_field_is_not_an_error() -> None:
    assert text_of(ChunkInterpreter().interpret(event({**chunk("fine"), "error": None}))) == "fine"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"error": {"message": "context length exceeded", "code": 400}}', "context length exceeded"),
        ('{"message": "overloaded"}', "overloaded"),
        ("backend went away", "backend went away"),
    ],
)
def test_event_error_raises_upstream_error(data: str, message: str) -> None:
    with pytest.raises(UpstreamError) as info:
        run(sse(chunk("a"), done=False) + f"event: error\ndata: {data}\n\n".encode())
    assert info.value.message == message


def test_event_error_is_found_by_the_decoder() -> None:
    interpreter = ChunkInterpreter()
    (error_event,) = SSEDecoder().feed(b"event: error\r\ndata: {\"error\": {\"message\": \"quota\"}}\r\n\r\n")
    assert error_event.event == "error"
    with pytest.raises(UpstreamError, match="quota"):
        interpreter.interpret(error_event)


# -- malformed chunks ----------------------------------------------------------------------------

_MALFORMED = [
    "{not json",
    '{"choices": [{"delta": {"content": "cut',
    "[1, 2, 3]",
    '"just a string"',
    '{"choices": {"0": {"delta": {"content": "x"}}}}',
    '{"choices": 5}',
    '{"choices": ["x"]}',
    '{"choices": [{"delta": "oops"}]}',
    '{"choices": [{"delta": {"content": 42}}]}',
    '{"choices": [{"delta": {"content": ["a"]}}]}',
]


@pytest.mark.parametrize("bad", _MALFORMED)
def test_malformed_chunk_is_skipped_counted_and_logged(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netfly")
    texts, done = run(sse(chunk("before"), bad, chunk("after")))
    assert texts == ["before", "after"]
    assert done.interpreter.malformed_chunks == 1
    assert done.result.malformed_chunks == 1
    warnings = [r for r in caplog.records if r.name == "netfly" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipping malformed stream chunk" in warnings[0].getMessage()


def test_each_malformed_chunk_is_counted() -> None:
    texts, done = run(sse("{", chunk("a"), "}", "nope", chunk("b")))
    assert texts == ["a", "b"]
    assert done.interpreter.malformed_chunks == 3


@pytest.mark.parametrize("bad", _MALFORMED)
def test_strict_mode_raises_stream_decode_error(bad: str) -> None:
    interpreter = ChunkInterpreter(strict=True)
    assert text_of(interpreter.interpret(event(chunk("before")))) == "before"
    with pytest.raises(StreamDecodeError):
        interpreter.interpret(ServerSentEvent(bad))
    assert interpreter.malformed_chunks == 0


def test_strict_mode_accepts_well_formed_streams(caplog: pytest.LogCaptureFixture) -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    stream = sse(chunk(role="assistant"), chunk(reasoning="r"), chunk("a"), chunk(finish="stop"),
                 chunk(choices=False, usage=usage))
    texts, _ = run(stream, ChunkInterpreter(strict=True))
    assert texts == ["a"]
    assert not caplog.records
