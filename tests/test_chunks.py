"""ChunkInterpreter: server-sent events of a chat completion in, answer text and metadata out."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from netfly import ChunkInterpreter, ServerSentEvent, SSEDecoder, StreamDecodeError, UpstreamError

from .conftest import answer, chunk, sse


def run(stream: bytes, interpreter: ChunkInterpreter | None = None) -> tuple[list[str], ChunkInterpreter]:
    """Decode ``stream`` and interpret its events the way the engine does: stop at [DONE]."""
    interpreter = interpreter or ChunkInterpreter()
    decoder = SSEDecoder()
    texts: list[str] = []
    for event in decoder.feed(stream) + decoder.flush():
        text = interpreter.interpret(event)
        if text is not None:
            texts.append(text)
        if interpreter.done:
            break
    return texts, interpreter


def event(obj: Any, name: str = "message") -> ServerSentEvent:
    return ServerSentEvent(obj if isinstance(obj, str) else json.dumps(obj), event=name)


def test_content_deltas_are_the_answer_text() -> None:
    texts, interpreter = run(answer("Hel", "lo", ", мир 👋"))
    assert texts == ["Hel", "lo", ", мир 👋"]
    assert interpreter.done
    result = interpreter.result("".join(texts))
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
    texts, interpreter = run(sse(chunk("a")) + sse(chunk("after"), done=False))
    assert texts == ["a"]
    assert interpreter.done


def test_role_only_delta_yields_nothing() -> None:
    interpreter = ChunkInterpreter()
    assert interpreter.interpret(event(chunk(role="assistant"))) is None
    assert interpreter.interpret(event(chunk(role="assistant", content=""))) is None
    assert interpreter.model == "test-model"


def test_usage_only_chunk_yields_nothing_but_its_usage_is_kept() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    stream = sse(chunk("Hi"), chunk(finish="stop"), chunk(choices=False, usage=usage))
    texts, interpreter = run(stream)
    assert texts == ["Hi"]
    result = interpreter.result("Hi")
    assert result.usage == usage
    assert result.finish_reason == "stop"


def test_content_filter_prelude_with_empty_choices_is_skipped() -> None:
    prelude = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    texts, interpreter = run(sse(prelude, chunk("ok", model="gpt-4o")))
    assert texts == ["ok"]
    assert interpreter.malformed_chunks == 0


def test_finish_reason_and_usage_on_the_last_content_chunk_are_kept() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    texts, interpreter = run(sse(chunk("end", finish="length", usage=usage)))
    assert texts == ["end"]
    assert interpreter.finish_reason == "length"
    assert interpreter.usage == usage


def test_first_model_is_kept() -> None:
    _, interpreter = run(sse(chunk("a", model="first"), chunk("b", model="second")))
    assert interpreter.model == "first"


def test_reasoning_is_kept_apart_from_the_answer() -> None:
    stream = sse(chunk(reasoning="Let me "), chunk(reasoning="think."), chunk("Answer"),
                 {"choices": [{"index": 0, "delta": {"reasoning": " More."}}]}, chunk(finish="stop"))
    texts, interpreter = run(stream)
    assert texts == ["Answer"]
    result = interpreter.result("".join(texts))
    assert result.text == "Answer"
    assert result.reasoning == "Let me think. More."


def test_tool_call_deltas_are_collected() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    texts, interpreter = run(sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
    assert texts == []
    assert interpreter.result("").tool_calls == [call]


def test_comments_and_empty_data_are_ignored() -> None:
    texts, interpreter = run(b": keep-alive\n\ndata:\n\n" + answer("x"))
    assert texts == ["x"]
    assert interpreter.malformed_chunks == 0


# -- whole chat.completion (server ignored stream: true) -----------------------------------------


def completion(content: Any = "Whole answer", **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **extra}
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "m-1",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_whole_chat_completion_yields_its_content_once() -> None:
    interpreter = ChunkInterpreter()
    assert interpreter.interpret_completion(completion(reasoning_content="hmm")) == "Whole answer"
    result = interpreter.result("Whole answer")
    assert interpreter.done
    assert (result.finish_reason, result.model, result.id) == ("stop", "m-1", "chatcmpl-9")
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert result.reasoning == "hmm"


def test_whole_completion_without_content() -> None:
    assert ChunkInterpreter().interpret_completion(completion(content=None)) is None
    assert ChunkInterpreter().interpret_completion({"choices": []}) is None


def test_legacy_text_completion_shape() -> None:
    body = {"choices": [{"index": 0, "text": "legacy", "finish_reason": "stop"}]}
    assert ChunkInterpreter().interpret_completion(body) == "legacy"


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
    assert interpreter.interpret(events[0]) == "partial"
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
    assert ChunkInterpreter().interpret(event({**chunk("fine"), "error": None})) == "fine"


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
    texts, interpreter = run(sse(chunk("before"), bad, chunk("after")))
    assert texts == ["before", "after"]
    assert interpreter.malformed_chunks == 1
    assert interpreter.result("beforeafter").malformed_chunks == 1
    warnings = [r for r in caplog.records if r.name == "netfly" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipping malformed stream chunk" in warnings[0].getMessage()


def test_each_malformed_chunk_is_counted() -> None:
    texts, interpreter = run(sse("{", chunk("a"), "}", "nope", chunk("b")))
    assert texts == ["a", "b"]
    assert interpreter.malformed_chunks == 3


@pytest.mark.parametrize("bad", _MALFORMED)
def test_strict_mode_raises_stream_decode_error(bad: str) -> None:
    interpreter = ChunkInterpreter(strict=True)
    assert interpreter.interpret(event(chunk("before"))) == "before"
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
