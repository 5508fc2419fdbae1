"""SSEDecoder: the WHATWG event-stream rules, byte split by byte split."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netfly import ConfigurationError, ServerSentEvent, SSEDecoder, StreamDecodeError
from netfly.sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES

BOM = b"\xef\xbb\xbf"


def decode(parts: Iterable[bytes], decoder: SSEDecoder | None = None) -> list[ServerSentEvent]:
    """Feed every part, then flush: everything a whole stream produces."""
    decoder = decoder or SSEDecoder()
    events: list[ServerSentEvent] = []
    for part in parts:
        events.extend(decoder.feed(part))
    events.extend(decoder.flush())
    return events


def split_at(data: bytes, offsets: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(offsets), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def every_split(data: bytes) -> Iterable[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def assert_any_split(data: bytes, expected: list[ServerSentEvent], **options: int) -> None:
    for parts in every_split(data):
        assert decode(parts, SSEDecoder(**options)) == expected, parts


# -- line endings --------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["CRLF", "LF", "CR"])
def test_every_line_ending_separates_lines_and_events(eol: bytes) -> None:
    stream = b"data: one" + eol + b"data: two" + eol + eol + b"data: three" + eol + eol
    assert_any_split(stream, [ServerSentEvent("one\ntwo"), ServerSentEvent("three")])


def test_mixed_line_endings_in_one_stream() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert_any_split(stream, [ServerSentEvent("a\nb\nc"), ServerSentEvent("d")])


def test_cr_and_lf_in_different_reads_are_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The LF completes the CRLF of the previous read; it must not count as a blank line.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\n\r") == [ServerSentEvent("a\nb")]
    assert decoder.feed(b"\n") == []  # again the LF of a split CRLF, not a second blank line
    assert decoder.flush() == []


def test_cr_then_crlf_is_two_line_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r\n") == [ServerSentEvent("a")]


def test_lone_cr_at_end_of_read_ends_the_line_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [ServerSentEvent("a")]


# -- fields --------------------------------------------------------------------------------------


def test_data_with_and_without_space_after_the_colon() -> None:
    stream = b"data:tight\n\ndata: spaced\n\ndata:  two spaces\n\ndata\n\ndata:\n\n"
    assert_any_split(
        stream,
        [ServerSentEvent("tight"), ServerSentEvent("spaced"), ServerSentEvent(" two spaces"),
         ServerSentEvent(""), ServerSentEvent("")],
    )


def test_several_data_lines_are_joined_with_newlines() -> None:
    stream = b"data: first\ndata:\ndata: third\ndata: {\"a\": 1}\n\n"
    assert_any_split(stream, [ServerSentEvent('first\n\nthird\n{"a": 1}')])


def test_comment_lines_are_ignored() -> None:
    stream = b": ping\n\n:\ndata: a\n: keep-alive in the middle\ndata: b\n\n: trailing\n"
    assert_any_split(stream, [ServerSentEvent("a\nb")])


def test_event_field_names_the_event_then_resets() -> None:
    stream = b"event: error\ndata: x\n\ndata: y\n\nevent:custom\ndata: z\n\n"
    assert_any_split(
        stream,
        [ServerSentEvent("x", event="error"), ServerSentEvent("y"), ServerSentEvent("z", event="custom")],
    )


def test_id_persists_across_events_and_a_nul_id_is_ignored() -> None:
    stream = b"id: 7\ndata: a\n\ndata: b\n\nid: bad\0id\ndata: c\n\nid\ndata: d\n\n"
    assert_any_split(
        stream,
        [ServerSentEvent("a", id="7"), ServerSentEvent("b", id="7"), ServerSentEvent("c", id="7"),
         ServerSentEvent("d", id="")],
    )


def test_id_without_data_still_sets_the_last_event_id() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 42\n\n") == []
    assert decoder.last_event_id == "42"
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x", id="42")]


def test_retry_field_needs_digits_only() -> None:
    stream = b"retry: 1500\ndata: a\n\nretry: soon\ndata: b\n\nretry: 15x\ndata: c\n\nretry: 20\ndata: d\n\n"
    assert_any_split(
        stream,
        [ServerSentEvent("a", retry=1500), ServerSentEvent("b", retry=1500), ServerSentEvent("c", retry=1500),
         ServerSentEvent("d", retry=20)],
    )


def test_event_without_data_is_not_dispatched() -> None:
    assert_any_split(b"event: ping\n\nid: 1\n\nretry: 5\n\n", [])


def test_unknown_fields_are_ignored() -> None:
    assert_any_split(b"foo: bar\ndata: a\nDATA: no\nData: no\n data: no\n\n", [ServerSentEvent("a")])


def test_value_keeps_later_colons() -> None:
    assert_any_split(b'data: {"url": "http://x:1"}\n\n', [ServerSentEvent('{"url": "http://x:1"}')])


# -- byte order mark -----------------------------------------------------------------------------


def test_leading_bom_is_skipped_at_any_split() -> None:
    assert_any_split(BOM + b"data: a\n\n", [ServerSentEvent("a")])


def test_bom_split_over_three_reads() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(BOM[:1]) == []
    assert decoder.feed(BOM[1:2]) == []
    assert decoder.feed(BOM[2:] + b"data: a\n\n") == [ServerSentEvent("a")]


def test_only_one_leading_bom_is_skipped() -> None:
    # A second BOM is part of the first field's name, which then matches no known field.
    assert_any_split(BOM + BOM + b"data: a\n\ndata: b\n\n", [ServerSentEvent("b")])


def test_bom_later_in_the_stream_is_data() -> None:
    assert_any_split(b"data: a\n\n" + b"data: " + BOM + b"b\n\n", [ServerSentEvent("a"), ServerSentEvent("\ufeffb")])


def test_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    assert decode([b"\xef", b"data: a\n\n"]) == []  # "\xefdata" is an unknown field name
    assert decode([b"data: a\n\n"]) == [ServerSentEvent("a")]


# -- UTF-8 ---------------------------------------------------------------------------------------


def test_utf8_characters_split_across_reads_are_never_garbled() -> None:
    text = "Привет, мир 👋🏽 — 中文 ✓"
    stream = f"event: тест\ndata: {text}\n\n".encode()
    assert_any_split(stream, [ServerSentEvent(text, event="тест")])


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode([b"data: a\xffb\n\n"]) == [ServerSentEvent("a\ufffdb")]


# -- line length limit ---------------------------------------------------------------------------


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1 << 20
    assert SSEDecoder().max_line_bytes == 1 << 20


def test_line_at_the_default_limit_passes_and_one_byte_more_raises() -> None:
    payload = b"x" * (DEFAULT_MAX_LINE_BYTES - len(b"data: "))
    line = b"data: " + payload
    assert len(line) == DEFAULT_MAX_LINE_BYTES
    assert decode([line + b"\n\n"]) == [ServerSentEvent(payload.decode())]
    with pytest.raises(StreamDecodeError, match=r"^event-stream line longer than 1048576 bytes \(max_line_bytes\)$"):
        SSEDecoder().feed(line + b"x\n\n")


def test_overlong_line_raises_before_its_end_arrives() -> None:
    decoder = SSEDecoder()
    piece = b"y" * (64 * 1024)
    with pytest.raises(StreamDecodeError):
        for _ in range(17):  # 17 * 64 KiB > 1 MiB, and no newline ever comes
            decoder.feed(piece)
    assert len(decoder._buffer) <= DEFAULT_MAX_LINE_BYTES  # memory did not keep growing


def test_limit_is_configurable() -> None:
    decoder = SSEDecoder(max_line_bytes=16)
    assert decoder.feed(b"data: 0123456789\n\n") == [ServerSentEvent("0123456789")]  # 16 bytes: fine
    with pytest.raises(StreamDecodeError):
        decoder.feed(b"data: 0123456789A\n\n")


def test_limit_applies_to_one_line_not_to_a_read() -> None:
    lines = b"".join(b"data: %d\n\n" % i for i in range(100))  # one read, far over the limit
    assert len(decode([lines], SSEDecoder(max_line_bytes=16))) == 100


def test_limit_counted_byte_by_byte() -> None:
    decoder = SSEDecoder(max_line_bytes=8)
    with pytest.raises(StreamDecodeError):
        for byte in b"data: 0123456789":
            decoder.feed(bytes([byte]))


def test_limit_of_one_byte() -> None:
    decoder = SSEDecoder(max_line_bytes=1)
    assert decoder.feed(b":\n\n") == []  # a one-byte comment line is within the limit
    with pytest.raises(StreamDecodeError, match="longer than 1 bytes"):
        decoder.feed(b"da")


@pytest.mark.parametrize("name", ["max_line_bytes", "max_event_bytes"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True, None])
def test_limits_must_be_positive_whole_numbers(name: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{name} must be a positive whole number of bytes, got {bad!r}$"):
        SSEDecoder(**{name: bad})  # type: ignore[arg-type]


# -- event size limit ----------------------------------------------------------------------------


def test_default_event_limit_is_eight_mebibytes() -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 8 << 20
    assert SSEDecoder().max_event_bytes == 8 << 20


def test_event_of_exactly_the_limit_passes_and_one_byte_more_raises() -> None:
    # "a\nbc" is 4 bytes of data: the newline joining the lines counts, the line ends do not.
    assert_any_split(b"data: a\ndata:bc\n\n", [ServerSentEvent("a\nbc")], max_event_bytes=4)
    for parts in every_split(b"data: a\ndata:bcd\n\n"):
        with pytest.raises(StreamDecodeError, match=r"^event-stream event with more than 4 bytes of data"):
            decode(parts, SSEDecoder(max_event_bytes=4))


def test_event_limit_counts_the_data_not_the_other_fields() -> None:
    stream = b": a long comment line\nevent: a-long-event-name\nid: a-long-id\nretry: 1000\ndata: ab\n\n"
    assert decode([stream], SSEDecoder(max_event_bytes=2)) == [
        ServerSentEvent("ab", event="a-long-event-name", id="a-long-id", retry=1000)
    ]


def test_event_limit_applies_per_event_not_per_stream() -> None:
    stream = b"".join(b"data: %03d\n\n" % i for i in range(200))
    assert len(decode([stream], SSEDecoder(max_event_bytes=3))) == 200


def test_many_data_lines_without_a_blank_line_raise_before_memory_grows() -> None:
    decoder = SSEDecoder(max_event_bytes=1 << 20)
    piece = b"data: x\n" * 8192  # 64 KiB of one-byte data lines, never a blank line
    with pytest.raises(StreamDecodeError, match=r"more than 1048576 bytes of data \(max_event_bytes\)"):
        for _ in range(200):
            decoder.feed(piece)
    assert decoder._data == []  # the oversized event was dropped


def test_unterminated_event_over_the_limit_raises_at_flush() -> None:
    decoder = SSEDecoder(max_event_bytes=4)
    assert decoder.feed(b"data: abc\ndata: d") == []
    with pytest.raises(StreamDecodeError, match="more than 4 bytes of data"):
        decoder.flush()


def test_thousands_of_data_lines_fold_into_one_event_exactly() -> None:
    values = [str(i).encode() for i in range(5000)]
    stream = b"".join(b"data: " + v + b"\n" for v in values) + b"data:tight\n\n"
    expected = [ServerSentEvent("\n".join([*(v.decode() for v in values), "tight"]))]
    assert decode([stream]) == expected
    assert decode(split_at(stream, range(0, len(stream), 97))) == expected
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == expected


# -- reuse after an error or flush -----------------------------------------------------------------


def test_decoder_after_a_line_too_long_error_starts_afresh() -> None:
    decoder = SSEDecoder(max_line_bytes=16)
    assert decoder.feed(b"id: 7\nevent: e\ndata: pending\n") == []
    with pytest.raises(StreamDecodeError):
        decoder.feed(b"data: " + b"z" * 20)
    # The pending event and its type are gone; the last event id outlives the error, as it outlives events.
    assert decoder.feed(b"\ndata: next\n\n") == [ServerSentEvent("next", id="7")]


def test_decoder_after_an_event_too_large_error_starts_afresh() -> None:
    decoder = SSEDecoder(max_event_bytes=4)
    with pytest.raises(StreamDecodeError):
        decoder.feed(b"event: big\ndata: 12345\n")
    assert decoder.feed(b"data: ok\n\n") == [ServerSentEvent("ok")]


def test_decoder_reused_after_flush_decodes_a_new_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\r") == []
    assert decoder.flush() == [ServerSentEvent("a", id="1")]
    # The CR that ended the first stream does not swallow the second stream's first LF.
    assert decoder.feed(b"\ndata: b\n\n") == [ServerSentEvent("b", id="1")]
    assert decoder.last_event_id == "1"


# -- fields ----------------------------------------------------------------------------------------


def test_invalid_utf8_in_event_and_id_is_replaced() -> None:
    assert decode([b"event: e\xff\nid: i\xfe\ndata: x\n\n"]) == [ServerSentEvent("x", event="e\ufffd", id="i\ufffd")]


@pytest.mark.parametrize("digits", [12, 13, 5000])
def test_huge_retry_values_are_ignored_not_raised(digits: int) -> None:
    value = b"9" * digits
    expected = 10**12 - 1 if digits == 12 else None
    assert decode([b"retry: " + value + b"\ndata: x\n\n"]) == [ServerSentEvent("x", retry=expected)]



# -- properties: any split gives the same events -------------------------------------------------

_TEXT_CHARS = st.one_of(
    st.sampled_from(list("abc xyz:{}\"'\\/0123456789")),
    st.sampled_from(list("Привет мир ёЁ")),
    st.sampled_from(["😀", "👋", "🏽", "🚀", "中", "é", "\u00a0", "\ufeff", "\0", "\t"]),
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
)
_VALUES = st.text(_TEXT_CHARS, max_size=12)
_EOL = st.sampled_from(["\r\n", "\n", "\r"])


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    """A stream of events, comments and keep-alives, with the events it must decode to."""
    lines: list[str] = []
    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    retry: int | None = None
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            lines.append(":" + draw(_VALUES))  # comment (keep-alive)
        event = draw(st.none() | st.sampled_from(["message", "delta", "error", "событие"]))
        if event is not None:
            lines.append(f"event: {event}")
        if draw(st.integers(0, 3)) == 0:
            last_id = draw(st.text(_TEXT_CHARS.filter(lambda c: c != "\0"), max_size=6))
            lines.append(f"id: {last_id}")
        if draw(st.integers(0, 4)) == 0:
            retry = draw(st.integers(0, 10**6))
            lines.append(f"retry:{retry}")
        data = draw(st.lists(_VALUES, max_size=4))
        for value in data:
            tight = not value.startswith(" ") and draw(st.booleans())
            lines.append(("data:" if tight else "data: ") + value)
            if draw(st.integers(0, 4)) == 0:
                lines.append(": between data lines")
        lines.append("")  # blank line: dispatch
        if data:
            expected.append(ServerSentEvent("\n".join(data), event or "message", last_id, retry))
    if draw(st.booleans()) and lines:
        lines.pop()  # no final blank line: flush() must still deliver the last event

    out: list[str] = []
    previous = ""
    for line in lines:
        eol = draw(_EOL)
        if previous == "\r" and line == "" and eol == "\n":
            eol = "\r\n"  # "\r" + "\n" would read as one CRLF and swallow this blank line
        out.append(line + eol)
        previous = eol
    prefix = BOM if draw(st.booleans()) else b""
    return prefix + "".join(out).encode(), expected


@settings(max_examples=150, deadline=None)
@given(event_streams())
def test_any_single_split_decodes_like_the_whole(case: tuple[bytes, list[ServerSentEvent]]) -> None:
    stream, expected = case
    assert decode([stream]) == expected
    for parts in every_split(stream):
        assert decode(parts) == expected, parts


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_partition_decodes_like_the_whole(data: st.DataObject) -> None:
    stream, expected = data.draw(event_streams())
    offsets = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert decode(split_at(stream, offsets)) == expected


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8))
def test_arbitrary_bytes_decode_the_same_at_any_partition(stream: bytes, offsets: list[int]) -> None:
    # Not a valid stream necessarily: the decoder must still be split-independent and never raise.
    whole = decode([stream])
    assert decode(split_at(stream, [min(o, len(stream)) for o in offsets])) == whole
