"""What mutation testing (mutmut 3.8, issue 12) found untested in the pure modules: messages and
fields a user sees, defaults that must stay ``None``, boundaries. Each test names what it pins.

Kill rates and how they were measured (``tools/mutation.py``, every mutant) are in README
"Reliability". Equivalent mutants left alive (no test can tell them from the original):
- sse.py (23): ``_buffer``/``_pending_cr``/``_bom_checked`` set to ``None`` instead of ``b""``/
  ``False`` (init, ``feed``, ``flush``): only ever tested for truth. ``_event = ""`` instead of
  ``None`` (init, ``_dispatch``, ``_drop_event``, ``feed``): read only as ``event or "message"``.
  ``"UTF-8"`` for ``"utf-8"`` (3): codec names ignore case. ``_dispatch`` joining a single line:
  the same bytes. ``_fold``: ``head = None`` / ``data[1]``: the other branch joins the same bytes.
  ``0x3A`` → ``59``: a line starting with ``;`` is ignored either way (comment or unknown
  field), and ``:`` lines become an ignored empty field. ``feed``: the ``+ chunk`` with an empty
  buffer, ``len(buf) <= 3`` / ``< 4`` (a whole BOM is held one read longer, then stripped the
  same), ``>=`` in the gate before the exact length check, the ``data: `` fast path off
  (``_process_line`` counts the same size), folding one line earlier (memory only). ``flush``:
  ``_pending_cr = True`` afterwards only drops a blank line that has no event to end.
- retry.py (1) ``_finite``: the ``ValueError``'s message: always caught inside ``parse_retry_after``.
- redact.py (1) ``url_secrets``: ``.decode("ascii")`` → ``"ASCII"`` (codec names ignore case).
- events.py (2) ``_EmptyMapping.__hash__`` → ``1``: any constant hash of an empty immutable mapping;
  ``_merge_meta``: ``if new.extra`` → ``or True``: a copy of ``old.extra`` instead of itself.
- chunks.py (21). The plain-text fast path only ever saves parsing: when it is skipped, the chunk is
  parsed and the dict comparison in ``interpret_chunk`` gives the same ``str``. So these change
  speed only: ``interpret`` never using or never learning the text around the content string
  (``around = None``, ``text = None``, ``type(None) is str``, ``around is not None``,
  ``self._around = None``), the middle cut with ``+ len(around[1])`` (then not one string);
  ``_around_content`` never finding the key or the string (``"content":`` → ``XX…XX``/``CONTENT``,
  ``found = None``, ``or True``); ``_json_string`` refusing every text (``value[:2]``, ``'XX"XX'``,
  ``and False``). ``__init__``: ``_top``/``_meta``/``_plain_choice`` = ``""`` instead of ``None``:
  only compared with dicts, which equal neither. ``_interpret_slowly``: the chunk's fields copied
  even without ``usage``: an equal dict. ``keys() <`` for ``<=`` in ``_chunk_meta``,
  ``_choice_delta`` (2) and ``_tool_call_deltas``: when every known key is present, ``extra`` is a
  new empty dict instead of the shared empty mapping: equal, empty and false alike.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from netfly import ConfigurationError, StreamDecodeError, TransportError, UpstreamError
from netfly.chunks import ChunkInterpreter, as_events
from netfly.events import ChatAccumulator, ChoiceDelta, ChunkMeta, ToolCallDelta, Usage
from netfly.messages import validate_messages
from netfly.redact import drop_secret_prefix, header_secrets, redact_headers, scrub, url_secrets
from netfly.retry import RetryPolicy
from netfly.sse import ServerSentEvent, SSEDecoder

# -- messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}]])
def test_invalid_messages_name_the_messages_param(messages: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        validate_messages(messages)
    assert caught.value.param == "messages"


# -- sse --------------------------------------------------------------------------------------------


def test_a_decoder_reused_after_an_oversized_event_counts_from_zero() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    with pytest.raises(StreamDecodeError, match=r"more than 8 bytes of data \(max_event_bytes\)"):
        decoder.feed(b"event: big\ndata: 123456789\n\n")
    # Exactly the limit passes, with the default type: nothing of the dropped event is left.
    assert decoder.feed(b"data: 12345678\n\n") == [ServerSentEvent("12345678", "message")]


def test_a_bom_is_skipped_only_at_the_very_start_of_the_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\n") == []
    # Not the first bytes any more: the BOM is part of a field name, which is ignored.
    assert decoder.feed(b"\xef\xbb\xbfdata: x\n\n") == []


def test_an_over_long_line_is_rejected_even_in_the_first_bytes() -> None:
    with pytest.raises(StreamDecodeError, match=r"^event-stream line longer than 1 bytes \(max_line_bytes\)$"):
        SSEDecoder(max_line_bytes=1).feed(b"ab")


def test_an_unfinished_line_of_exactly_the_limit_is_kept() -> None:
    decoder = SSEDecoder(max_line_bytes=8)
    assert decoder.feed(b"data: 12\ndata: 34") == []
    assert decoder.feed(b"\n\n") == [ServerSentEvent("12\n34", "message")]


def test_an_unterminated_last_event_of_exactly_the_limit_is_delivered_at_flush() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    assert decoder.feed(b"data: 12345678") == []
    assert decoder.flush() == [ServerSentEvent("12345678", "message")]


def test_a_decoder_reused_after_flush_starts_afresh() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    decoder.feed(b"data: a\n")
    assert decoder.flush() == [ServerSentEvent("a", "message")]
    decoder.feed(b"data: b")
    assert decoder.flush() == [ServerSentEvent("b", "message")]
    # Nothing is left over: the next event may use the whole limit.
    assert decoder.feed(b"data: 12345678\n\n") == [ServerSentEvent("12345678", "message")]


# -- chunks -----------------------------------------------------------------------------------------


def test_a_json_reply_that_is_not_an_object_says_so() -> None:
    with pytest.raises(StreamDecodeError, match=r"^JSON reply is not an object$"):
        ChunkInterpreter().interpret_completion(["not", "an", "object"])


def test_a_legacy_completion_text_becomes_the_text_and_not_an_extra() -> None:
    interpreter = ChunkInterpreter()
    events = interpreter.interpret_completion(
        {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "vendor": 1}], "usage": "n/a"}
    )
    delta = events[1]
    assert isinstance(delta, ChoiceDelta) and delta.text == "hi"
    assert delta.choice_extra == {"vendor": 1}
    assert not any(isinstance(e, Usage) for e in events)  # a usage that is not an object is dropped
    assert interpreter.finished and interpreter.done


def test_a_json_reply_without_finish_reason_is_not_finished() -> None:
    interpreter = ChunkInterpreter()
    interpreter.interpret_completion({"choices": [{"index": 0, "message": {"content": "hi"}}]})
    assert interpreter.finished is False


def test_quoted_malformed_data_is_cut_at_200_characters(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="netfly"):
        ChunkInterpreter().interpret(ServerSentEvent("{" + "x" * 1000))
    message = caplog.records[-1].getMessage()
    assert message.startswith("skipping malformed stream chunk: invalid JSON in event data: ")
    assert message.endswith(f"(data: '{{{'x' * 199}')")
    with pytest.raises(StreamDecodeError) as caught:
        ChunkInterpreter().interpret_completion({"choices": "x" * 1000})
    assert str(caught.value) == f"JSON reply is not a chat.completion: {str({'choices': 'x' * 1000})[:200]!r}"


@pytest.mark.parametrize(("payload", "message"), [
    ({"error": {"detail": "quota exceeded"}}, "quota exceeded"),
    ({"error": {"code": 7}}, "{'code': 7}"),
    ({"error": ""}, "the server reported an error in the stream"),
    ("plain words", "plain words"),
])
def test_in_stream_error_messages(payload: Any, message: str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    with pytest.raises(UpstreamError) as caught:
        ChunkInterpreter().interpret(ServerSentEvent(data, "error"))
    assert str(caught.value) == message


@pytest.mark.parametrize(("data", "reason"), [
    ('{"choices": 5}', "choices is not a list (data: \"{'choices': 5}\")"),
    ('{"choices": [7]}', "a choice is not an object with a valid delta (data: '7')"),
    ("[1, 2]", "event data is JSON but not an object (data: '[1, 2]')"),
])
def test_malformed_chunks_say_why_and_quote_the_data(
    caplog: pytest.LogCaptureFixture, data: str, reason: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="netfly"):
        assert ChunkInterpreter().interpret(ServerSentEvent(data)) is None
    assert [r.getMessage() for r in caplog.records] == [f"skipping malformed stream chunk: {reason}"]
    with pytest.raises(StreamDecodeError) as caught:
        ChunkInterpreter(strict=True).interpret(ServerSentEvent(data))
    assert str(caught.value) == reason


def test_malformed_data_is_quoted_with_secrets_masked() -> None:
    with pytest.raises(StreamDecodeError, match=r"^event data is JSON but not an object \(data: '\[\"\*\*\*\"\]'\)$"):
        ChunkInterpreter(strict=True, secrets=("sk-secret",)).interpret(ServerSentEvent('["sk-secret"]'))
    with pytest.raises(StreamDecodeError, match=r"^JSON reply is not a chat.completion: \"\{'choices': '\*\*\*'\}\"$"):
        ChunkInterpreter(secrets=("sk-secret",)).interpret_completion({"choices": "sk-secret"})


def test_tool_call_fields_as_sent() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f"}, "vendor": 1},
        {"id": "b", "function": {"name": "g"}},
    ]}}]}
    events = as_events(ChunkInterpreter().interpret_chunk(chunk))
    (first, second) = next(e for e in events if isinstance(e, ChoiceDelta)).tool_calls
    assert (first.index, first.type, dict(first.extra)) == (0, "function", {"vendor": 1})
    assert (second.index, second.type, dict(second.extra)) == (1, None, {})  # no index: its position
    bad = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]}
    with pytest.raises(StreamDecodeError, match="a choice is not an object with a valid delta"):
        ChunkInterpreter(strict=True).interpret_chunk(bad)


def test_in_stream_error_keeps_its_param() -> None:
    payload = '{"error": {"message": "bad", "code": "c", "type": "t", "param": "temperature"}}'
    with pytest.raises(UpstreamError, match=r"^bad$") as caught:
        ChunkInterpreter().interpret(ServerSentEvent(payload, "error"))
    assert (caught.value.code, caught.value.type, caught.value.param) == ("c", "t", "temperature")


def test_a_boolean_created_is_not_a_timestamp() -> None:
    events = as_events(ChunkInterpreter().interpret_chunk({"created": True, "id": "x", "choices": []}))
    meta = next(e for e in events if isinstance(e, ChunkMeta))
    assert (meta.id, meta.created) == ("x", None)


@pytest.mark.parametrize("text", ['say \\"hi\\"', "tab\\t", "back\\\\slash", "\\u00e9", " lead", "x"])
def test_text_chunks_of_one_shape_decode_exactly(text: str) -> None:
    """The second chunk of the same shape takes the fast path; both paths agree."""
    def event(content: str) -> ServerSentEvent:
        return ServerSentEvent('{"id":"1","choices":[{"index":0,"delta":{"content":"' + content + '"}}]}')

    interpreter = ChunkInterpreter()
    texts = [as_events(interpreter.interpret(event(c))) for c in ("first", text, text)]
    expected = json.loads(f'"{text}"')
    assert [next(e.text for e in t if isinstance(e, ChoiceDelta)) for t in texts[1:]] == [expected] * 2


def _items_of(*chunks: Any) -> list[Any]:
    """What each of ``chunks`` (objects, sent as compact JSON) gives through one interpreter."""
    interpreter = ChunkInterpreter()
    return [interpreter.interpret(ServerSentEvent(json.dumps(c, separators=(",", ":")))) for c in chunks]


def _events_of(*chunks: Any) -> list[list[Any]]:
    return [as_events(item or []) for item in _items_of(*chunks)]


def test_a_choice_without_an_index_is_choice_zero_and_others_keep_theirs() -> None:
    chunk = {"choices": [{"delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]}
    assert ChunkInterpreter().interpret_chunk(chunk) == [ChoiceDelta(index=0, text="a"), ChoiceDelta(index=1, text="b")]


def test_refusals_logprobs_and_unknown_fields_alone_are_reported() -> None:
    logprobs = {"content": [{"token": "no", "logprob": -0.1}]}
    chunk = {"choices": [
        {"index": 0, "delta": {"refusal": "I can't"}, "logprobs": logprobs},
        {"index": 1, "delta": {}, "logprobs": logprobs},  # logprobs and nothing else
        {"index": 2, "delta": {"vendor_note": "x"}},
        {"index": 3, "delta": {}, "vendor_score": 1},
    ]}
    assert ChunkInterpreter().interpret_chunk(chunk) == [
        ChoiceDelta(index=0, refusal="I can't", logprobs=logprobs),
        ChoiceDelta(index=1, logprobs=logprobs),
        ChoiceDelta(index=2, delta_extra={"vendor_note": "x"}),
        ChoiceDelta(index=3, choice_extra={"vendor_score": 1}),
    ]


def test_a_tool_call_fragment_keeps_the_index_it_was_sent_with() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}}]}
    (delta,) = ChunkInterpreter().interpret_chunk(chunk) or []
    assert isinstance(delta, ChoiceDelta) and delta.tool_calls == (ToolCallDelta(1, arguments="}"),)


def test_fields_of_the_wrong_type_are_left_out() -> None:
    chunk = {"id": 5, "model": ["m"], "system_fingerprint": {}, "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": 1, "function": {"name": 2}}]}, "finish_reason": 3}
    ], "usage": "n/a"}
    assert ChunkInterpreter().interpret_chunk(chunk) == [
        ChunkMeta(), ChoiceDelta(tool_calls=(ToolCallDelta(0),)),  # and no Usage: "n/a" is not one
    ]
    assert ChunkInterpreter().interpret_chunk({"choices": [], "usage": {}}) is None


def test_a_stream_cut_short_is_neither_done_nor_finished() -> None:
    interpreter = ChunkInterpreter()
    assert (interpreter.done, interpreter.finished) == (False, False)
    interpreter.interpret(ServerSentEvent('{"choices":[{"index":0,"delta":{"content":"a"}}]}'))
    assert (interpreter.done, interpreter.finished) == (False, False)


def test_chunks_of_another_choice_never_pass_for_choice_zero() -> None:
    first, second = _events_of(*({"choices": [{"index": 1, "delta": {"content": t}}]} for t in "ab"))
    assert (first, second) == ([ChoiceDelta(index=1, text="a")], [ChoiceDelta(index=1, text="b")])


@pytest.mark.parametrize("field", [{"finish_reason": "length"}, {"logprobs": {"content": None}}])
def test_a_field_repeated_on_every_chunk_is_reported_on_every_chunk(field: dict[str, Any]) -> None:
    texts = "abc"
    events = _events_of(*({"choices": [{"index": 0, "delta": {"content": t}, **field}]} for t in texts))
    assert events == [[ChoiceDelta(text=t, **field)] for t in texts]


def test_openai_shaped_text_chunks_come_as_str() -> None:
    """Choices with exactly index, delta, logprobs and finish_reason (what OpenAI sends) are plain."""
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    items = _items_of(*({"id": "c", "choices": [{**choice, "delta": {"content": t}}]} for t in "abc"))
    assert items == [[ChunkMeta(id="c"), ChoiceDelta(text="a")], "b", "c"]


def test_a_role_sent_with_every_text_is_reported_with_every_text() -> None:
    events = _events_of(*({"choices": [{"index": 0, "delta": {"role": "assistant", "content": t}}]} for t in "abc"))
    assert events == [[ChoiceDelta(role="assistant", text=t)] for t in "abc"]


def test_a_choice_without_delta_after_text_chunks_gives_its_finish_reason() -> None:
    text = {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    events = _events_of(text, text, {"id": "c", "choices": [{"index": 0, "finish_reason": "stop"}]})
    assert events[2] == [ChoiceDelta(finish_reason="stop")]


@pytest.mark.parametrize("first", [True, False])
def test_a_top_level_content_field_is_never_taken_for_the_text(first: bool) -> None:
    """A vendor's top-level ``content`` is a second ``"content":`` in the chunk: no fast path."""
    def chunk(top: str, text: str) -> dict[str, Any]:
        choices = {"choices": [{"index": 0, "delta": {"content": text}}]}
        return {"content": top, **choices} if first else {**choices, "content": top}

    events = _events_of(chunk("foo", "a"), chunk("foo", "b"), chunk("bar", "b"), chunk("bar", "c"))
    assert events[2:] == [[ChunkMeta(extra={"content": "bar"}), ChoiceDelta(text="b")], [ChoiceDelta(text="c")]]


@pytest.mark.parametrize("space", ["\t", "\n", "\r\n "])
def test_text_chunks_with_other_whitespace_before_the_text_are_read(space: str) -> None:
    interpreter = ChunkInterpreter()
    items = [interpreter.interpret(ServerSentEvent(f'{{"choices":[{{"delta":{{"content":{space}"{t}"}}}}]}}'))
             for t in "abc"]
    assert items == [[ChoiceDelta(text="a")], "b", "c"]


def test_junk_that_only_ends_like_the_last_text_chunk_is_malformed() -> None:
    interpreter = ChunkInterpreter(strict=True)
    before, after = '{"choices":[{"index":0,"delta":{"content":', "}}]}"
    for text in ('"a"', '"b"'):
        interpreter.interpret(ServerSentEvent(before + text + after))
    junk = after + "x" * (len(before) - len(after)) + '"zz"' + after
    with pytest.raises(StreamDecodeError, match=r"^invalid JSON in event data: .*\(data: '\}\}\]\}xxx"):
        interpreter.interpret(ServerSentEvent(junk))


def test_a_completion_with_a_malformed_choice_quotes_the_reply() -> None:
    with pytest.raises(StreamDecodeError, match=r"""^JSON reply is not a chat.completion: "\{'choices': \[7\]\}"$"""):
        ChunkInterpreter().interpret_completion({"choices": [7]})


# -- redact -----------------------------------------------------------------------------------------


def test_drop_secret_prefix_edges() -> None:
    assert drop_secret_prefix("x abc", ["abcd"]) == "x "  # a secret of exactly the minimum length
    assert drop_secret_prefix("x abc", ["abc"]) == "x abc"  # below it: not a secret
    assert drop_secret_prefix("x sk-1234", ["sk-12345"]) == "x "  # all but the last character
    assert drop_secret_prefix("x sk-123", ["sk-12345"]) == "x "  # all but the last two


def test_scrub_masks_a_slash_escaped_secret_in_raw_text() -> None:
    assert scrub(r"bad key sk-a\/b\/c", ["sk-a/b/c"]) == "bad key ***"
    assert scrub("plain sk-abc", ["sk-abc"]) == "plain ***"


def test_scrub_masks_the_longest_secret_first() -> None:
    assert scrub("key xzzzz", ["zzzz", "xzzzz"]) == "key ***"  # not "key x***"


def test_credentials_found_in_headers_and_urls() -> None:
    headers = {"Authorization": "Bearer sk-1", "x-api-key": "k-2", "x-team": "search", "api-key": " "}
    assert header_secrets(headers) == ("sk-1", "k-2")
    assert url_secrets("http://:pw-only@host") == ("pw-only", "pw-only", "OnB3LW9ubHk=")  # base64(":pw-only")
    assert url_secrets("http://host") == ()


def test_an_authorization_value_is_split_only_after_a_word_scheme() -> None:
    # "Bearer" + the rest (spaces and all); a value with no word scheme is a secret as a whole.
    assert header_secrets({"Authorization": "Bearer tok en"}) == ("tok en",)
    assert header_secrets({"Authorization": "sk-1 2"}) == ("sk-1 2",)


def test_redact_headers_takes_secret_names_in_any_case() -> None:
    shown = redact_headers({"x-vendor-token": "v", "X-Other": "o"}, secret_names=("X-Vendor-Token",))
    assert shown == {"x-vendor-token": "***", "X-Other": "o"}


# -- events -----------------------------------------------------------------------------------------


def test_events_without_extras_show_and_hold_nothing() -> None:
    meta = ChunkMeta()
    assert len(meta.extra) == 0 and dict(meta.extra) == {}
    with pytest.raises(KeyError, match="service_tier"):
        meta.extra["service_tier"]
    assert "delta_extra={}, choice_extra={}" in repr(ChoiceDelta())


def test_text_parts_default_to_choice_zero() -> None:
    accumulator = ChatAccumulator()
    accumulator.add(ChoiceDelta(index=0, text="h"))
    accumulator.text_parts().append("i")
    result = accumulator.result()
    assert (result.text, result.choices) == ("hi", [])


def test_a_result_never_sent_fields_stays_none() -> None:
    accumulator = ChatAccumulator()
    accumulator.add(ChoiceDelta(text="hi"))
    result = accumulator.result()
    assert (result.finish_reason, result.usage, result.id, result.model, result.refusal) == (None,) * 5
    assert result.malformed_chunks == 0 and result.choices == []


def test_roles_refusals_and_tool_calls_assemble() -> None:
    accumulator = ChatAccumulator()
    for event in [
        ChoiceDelta(index=0, role="assistant", refusal="I can"),
        ChoiceDelta(index=0, refusal="not"),
        ChoiceDelta(index=1, role="tool", tool_calls=(ToolCallDelta(0, id="call_1", name="get_"),)),
        ChoiceDelta(index=1, tool_calls=(ToolCallDelta(0, id="call_other", name="weather", arguments="{}"),)),
    ]:
        accumulator.add(event)
    result = accumulator.result()
    assert result.refusal == "I cannot"
    assert [c.role for c in result.choices] == ["assistant", "tool"]
    call = result.choices[1].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", "{}")  # the first id is kept


def test_chunk_meta_merges_first_values_and_extras() -> None:
    accumulator = ChatAccumulator()
    accumulator.add(ChunkMeta(id="a", created=1, extra={"service_tier": "default"}))
    accumulator.add(ChunkMeta(id="b", created=2, system_fingerprint="fp", extra={"region": "eu"}))
    accumulator.add(ChunkMeta(id="c"))
    meta = accumulator.meta
    assert (meta.id, meta.created, meta.system_fingerprint) == ("a", 1, "fp")
    assert meta.extra == {"service_tier": "default", "region": "eu"}


def test_a_second_choice_defaults_and_tool_call_extras() -> None:
    accumulator = ChatAccumulator()
    accumulator.add(ChoiceDelta(index=0, text="a"))
    accumulator.text_parts(1).append("b")
    accumulator.add(ChoiceDelta(index=2, tool_calls=(ToolCallDelta(0, name="f", extra={"vendor": 1}),)))
    accumulator.add(ChoiceDelta(index=2, tool_calls=(ToolCallDelta(0, extra={"region": "eu"}),)))
    choices = accumulator.result().choices
    assert [(c.index, c.role, c.logprobs) for c in choices] == [(i, "assistant", None) for i in range(3)]
    assert choices[2].tool_calls[0].extra == {"vendor": 1, "region": "eu"}


# -- retry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "message"), [
    ("multiplier", r"^multiplier must be a number >= 1, got True$"),
    ("jitter", r"^jitter must be .*, got True$"),
])
def test_a_boolean_is_not_a_retry_number(field: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        RetryPolicy(**{field: True})
    assert caught.value.param == field


def test_a_multiplier_of_one_means_a_constant_delay() -> None:
    policy = RetryPolicy(initial_delay=0.5, multiplier=1, jitter=0, max_attempts=4)
    refused = TransportError("cannot connect to X: ConnectionRefusedError")
    assert [policy.delay_for(n, refused) for n in (1, 2, 3)] == [0.5, 0.5, 0.5]
    assert RetryPolicy(multiplier=1.5).multiplier == 1.5


# -- the stream's end -------------------------------------------------------------------------------

INCOMPLETE = "stream ended without [DONE] or finish_reason; the answer may be incomplete"


@pytest.mark.parametrize(("ending", "warned"), [
    ([], True),
    (["[DONE]"], False),
    ([{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}], False),
])
async def test_an_answer_that_just_stops_is_flagged(
    scripted: Any, caplog: pytest.LogCaptureFixture, ending: list[Any], warned: bool
) -> None:
    from aiohttp import web

    from netfly import OpenAICompatible

    from .conftest import sse, stream_bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        body = [{"choices": [{"index": 0, "delta": {"content": "Hel"}}]}, *ending]
        return await stream_bytes(request, sse(*body, done=False))

    server = await scripted(handler)
    with caplog.at_level(logging.WARNING, logger="netfly"):
        result = await server.provider(OpenAICompatible).complete("m", [{"role": "user", "content": "hi"}])
    assert result.text == "Hel"
    assert (result.usage, result.id, result.model) == (None, None, None)  # never sent
    assert result.finish_reason == ("stop" if len(ending) == 1 and ending[0] != "[DONE]" else None)
    assert [r.getMessage() for r in caplog.records] == ([f"OpenAICompatible: {INCOMPLETE}"] if warned else [])
