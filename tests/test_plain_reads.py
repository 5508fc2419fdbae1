"""Whole reads of plain text chunks in one pass (``ChunkInterpreter.interpret_read`` with
``SSEDecoder.feed_whole``) give exactly what decoding and interpreting them event by event gives:
the same items, the same errors, the same malformed count, for every way the stream is cut into reads.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from netfly import ChunkInterpreter, NetflyError, SSEDecoder
from netfly.chunks import Item


def _chunk(content: Any, *, finish: str | None = None, model: str = "m", extra: str = "") -> bytes:
    head = '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"' + model + '"' + extra
    text = json.dumps(content, ensure_ascii=False) if not isinstance(content, bytes) else content.decode("latin-1")
    finish_json = json.dumps(finish)
    body = head + ',"choices":[{"index":0,"delta":{"content":' + text + '},"finish_reason":' + finish_json + "}]}"
    return b"data: " + body.encode("utf-8" if not isinstance(content, bytes) else "latin-1") + b"\n\n"


def _raw(data: bytes) -> bytes:
    """One event whose data line is ``data`` exactly as given (for contents no encoder would write)."""
    return b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
           b'"delta":{"content":' + data + b'},"finish_reason":null}]}\n\n'


def _stream(*events: bytes) -> bytes:
    return b"".join(events)


PLAIN = [_chunk(t) for t in ["Hel", "lo", ", w", "orld", " \u0442\u0438\u0445", " \U0001f332\U0001f30a", "!", "",
                             'a "quote"', "back\\slash", "new\nline", "\u2028", "tab\t"]]
def _amid(*odd: bytes) -> bytes:
    """``odd`` events amid enough plain ones that the reads around them are worth reading in one pass."""
    return _stream(*PLAIN, *odd, *PLAIN[:8])


STREAMS: dict[str, bytes] = {
    "plain": _stream(*PLAIN, *PLAIN, _chunk(None, finish="stop"), b"data: [DONE]\n\n"),
    "done mid-read": _amid(b"data: [DONE]\n\n"),
    "done among the first events": _stream(*PLAIN[:2], b"data: [DONE]\n\n", *PLAIN),
    "meta change": _amid(_chunk("x", model="other")),
    "extra field": _amid(_chunk("y", extra=',"service_tier":"default"')),
    "comment and event name": _amid(b": ping\n\n", *PLAIN[:2], b"event: note\n"),
    "crlf": _amid(*(e.replace(b"\n", b"\r\n") for e in PLAIN[3:6])),
    "bom": b"\xef\xbb\xbf" + _stream(*PLAIN, *PLAIN),
    "two data lines": _amid(PLAIN[3][:-1] + b"data: more\n\n"),
    "blank lines between": _amid(b"\n", *PLAIN[3:6], b"\n\n"),
    "invalid utf-8": _amid(_raw(b'"\xff\xfe"')),
    "encoded surrogate": _amid(_raw(b'"\xed\xa0\x80"')),
    "lone surrogate escape": _amid(_raw(b'"\\ud800"')),
    "spaces around the string": _amid(_raw(b' "sp" ')),
    "spaces and a lone surrogate": _amid(_raw(b' "\\ud800" ')),
    "a space before a lone surrogate": _amid(_raw(b' "\\ud800"')),
    "a space after a lone surrogate": _amid(_raw(b'"\\ud800" ')),
    "another id as long": _amid(PLAIN[4].replace(b'"c1"', b'"c2"')),
    "a finish as long as a null": _amid(PLAIN[3].replace(b":null}", b':"ab"}')),
    "a line more in an event": _amid(PLAIN[3][:-1] + b"id: 7\n\n"),
    "a number for content": _amid(_raw(b"42")),
    "null content": _amid(_raw(b"null")),
    # Made so that one parse of the strings as a JSON array would read otherwise than one by one:
    "string spanning two events": _amid(_raw(b'"a\\"'), _raw(b'","c"')),
    "array across events": _amid(_raw(b'"a",["b"'), _raw(b'"c"'), _raw(b'"d"],"e"')),
    "two strings in one": _amid(_raw(b'"a","b"')),
    "unterminated": _amid(_raw(b'"abc')),
    "control character": _amid(_raw(b'"a\x01b"')),
    "in-stream error": _amid(b'data: {"error":{"message":"overloaded","code":"busy"}}\n\n'),
    "error event": _amid(b"event: error\ndata: boom\n\n"),
    "unterminated last event": _stream(*PLAIN, *PLAIN[:5]) + PLAIN[5][:-2],
}


def _run(reads: list[bytes], strict: bool, *, whole_reads: bool) -> tuple[list[Item], Any]:
    """What a stream cut into ``reads`` gives: its items, then its error or its end state. Each read is
    taken as the engine takes it (``whole_reads``), or every event decoded and interpreted on its own:
    the reference."""
    decoder, interpreter = SSEDecoder(), ChunkInterpreter(strict=strict)
    items: list[Item] = []
    try:
        for raw in reads:
            if whole_reads:
                interpreter.interpret_read(raw, decoder, items)
            else:
                interpreter.interpret_events(decoder.feed(raw), items)
            if interpreter.done:
                break
        else:
            interpreter.interpret_events(decoder.flush(), items)
    except NetflyError as exc:
        return items, (type(exc), str(exc))
    return items, (interpreter.done, interpreter.finished, interpreter.malformed_chunks)


def _cuts(data: bytes) -> list[list[bytes]]:
    """The stream whole, cut in two at every offset after a first read of three events (no read is
    taken whole before one has shown the shape of a plain chunk), and in reads of a few sizes."""
    first = len(_stream(*PLAIN[:3]))
    ways = [[data]] + [[data[:first], data[first:i], data[i:]] for i in range(first, len(data))]
    ways += [[data[i : i + size] for i in range(0, len(data), size)] for size in (1, 7, 100, 1000)]
    return ways


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", list(STREAMS))
def test_reads_in_one_pass_give_what_events_one_by_one_give(name: str, strict: bool) -> None:
    data = STREAMS[name]
    expected = _run([data], strict, whole_reads=False)
    for reads in _cuts(data):
        assert _run(reads, strict, whole_reads=True) == expected, [len(r) for r in reads]


def test_a_read_of_plain_chunks_is_read_in_one_pass() -> None:
    decoder, interpreter = SSEDecoder(), ChunkInterpreter()
    items: list[Item] = []
    interpreter.interpret_read(_stream(*PLAIN[:2]), decoder, items)  # learns the chunks' shape
    offered: list[bytes] = []

    def parse(events: bytes) -> tuple[list[str], int] | None:
        offered.append(events)
        return interpreter.interpret_plain(events)

    rest = _stream(*PLAIN[2:])
    texts, events = decoder.feed_whole(rest + PLAIN[0][:9], parse)
    assert offered == [rest]  # the whole events, not the line still incomplete
    assert texts == [", w", "orld", " \u0442\u0438\u0445", " \U0001f332\U0001f30a", "!", 'a "quote"', "back\\slash",
                     "new\nline", "\u2028", "tab\t"]
    assert events == []
    texts, events = decoder.feed_whole(_stream(PLAIN[0][9:], *PLAIN[1:6]), parse)
    assert offered[-1] == _stream(*PLAIN[:6])  # the pending line and the rest of its event, with the next
    assert texts == ["Hel", "lo", ", w", "orld", " \u0442\u0438\u0445", " \U0001f332\U0001f30a"]


def test_the_plain_chunks_before_the_end_of_an_answer_are_read_in_one_pass() -> None:
    decoder, interpreter = SSEDecoder(), ChunkInterpreter()
    interpreter.interpret_read(_stream(*PLAIN[:2]), decoder, [])  # learns the chunks' shape
    end = _chunk(None, finish="stop") + b"data: [DONE]\n\n"
    piece = _stream(*PLAIN[2:6], end, PLAIN[6])
    assert interpreter.interpret_plain(piece) == (
        [", w", "orld", " \u0442\u0438\u0445", " \U0001f332\U0001f30a"], len(_stream(*PLAIN[2:6]))
    )
    texts, events = decoder.feed_whole(piece, interpreter.interpret_plain)
    assert texts == [", w", "orld", " \u0442\u0438\u0445", " \U0001f332\U0001f30a"]
    assert [e.data for e in events] == [end[6:].split(b"\n")[0].decode(), "[DONE]", PLAIN[6][6:-2].decode()]


def test_the_first_read_of_an_answer_is_read_in_one_pass_after_its_first_events() -> None:
    offered: list[bytes] = []

    class Recording(SSEDecoder):
        def feed_whole(self, chunk: bytes, parse: Any) -> Any:
            offered.append(chunk)
            return super().feed_whole(chunk, parse)

    role = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
           b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    first_read = _stream(role, *PLAIN, *PLAIN)
    items: list[Item] = []
    ChunkInterpreter().interpret_read(first_read, Recording(), items)
    assert offered == [first_read[len(_stream(role, *PLAIN[:3])):]]  # all but the first four events
    assert items[1:] == [t for t in ["Hel", "lo", ", w"] + [json.loads(e[6:])["choices"][0]["delta"]["content"]
                                                            for e in PLAIN[3:] + PLAIN] if t]


_TWO = b"data: " + b"x" * 34 + b"\n\n"  # 42 bytes: within a 64-byte limit, two of them are not
NOT_OFFERED = {
    "no whole event": ({}, [b"\n"], b"data: partial"),
    "the BOM not checked yet": ({}, [], b"data: a\n\n"),
    "an event's data pending": ({}, [b"data: a\n"], b"\ndata: b\n\n"),
    "an event's type pending": ({}, [b"event: note\n"], b"data: a\n\n"),
    "a CR that a LF may complete": ({}, [b"data: c\r\r"], b"\ndata: d\n\n"),
    "a CR in the read": ({}, [b"\n"], b"data: a\r\n\n"),
    "past the line limit": ({"max_line_bytes": 64}, [b"\n"], _TWO + _TWO),
    "past the event limit": ({"max_event_bytes": 64}, [b"\n"], _TWO + _TWO),
    "past a limit with the pending line": ({"max_line_bytes": 64}, [b"\n", _TWO[:30]], _TWO[30:] + _TWO[:30] + b"\n\n"),
}


@pytest.mark.parametrize("name", list(NOT_OFFERED))
def test_events_are_not_offered_whole_unless_the_decoder_is_between_events_within_its_limits(name: str) -> None:
    limits, before, chunk = NOT_OFFERED[name]
    offered: list[bytes] = []

    def accept_anything(events: bytes) -> tuple[list[str], int]:
        offered.append(events)
        return ["taken"], len(events)

    decoder, reference = SSEDecoder(**limits), SSEDecoder(**limits)
    for data in before:
        assert decoder.feed(data) == reference.feed(data)
    assert decoder.feed_whole(chunk, accept_anything) == ([], reference.feed(chunk))
    assert offered == []


def test_events_refused_by_the_parser_are_fed_as_usual() -> None:
    decoder, offered = SSEDecoder(), []
    decoder.feed(b"\n")
    _, events = decoder.feed_whole(b"data: e\n\ndata: f\n\ndata: g", lambda events: offered.append(events))
    assert offered == [b"data: e\n\ndata: f\n\n"]
    assert [e.data for e in events + decoder.flush()] == ["e", "f", "g"]
