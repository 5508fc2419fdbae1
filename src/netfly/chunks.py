"""The chunk interpreter: server-sent events of a chat completion in, typed events out. No I/O.

It knows the OpenAI ``chat.completion.chunk`` shape and turns each chunk into the events of
:mod:`netfly.events`: the chunk's own fields (:class:`ChunkMeta`, when they change), one
:class:`ChoiceDelta` per choice (text, reasoning, tool-call fragments, refusal, logprobs, finish
reason, unknown fields) and :class:`Usage`. ``data: [DONE]`` ends the stream, and an error sent
inside the stream raises :class:`UpstreamError`. A whole ``chat.completion`` (a server that ignored
``stream: true``, or a request with ``stream: false``) gives the same events.

Speed: most chunks of a stream say only "here is more text of choice 0", with the same ``id``,
``model``… as the chunk before. For those :meth:`ChunkInterpreter.interpret` returns the text as a
plain ``str``; everything else comes as a list of events. ``as_events`` turns either into events.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from itertools import groupby, repeat
from operator import itemgetter
from typing import Any, TypeAlias, TypeGuard, cast

from . import _json
from .errors import StreamDecodeError, UpstreamError
from .events import ChatResult, ChoiceDelta, ChunkMeta, Event, ToolCallDelta, Usage
from .redact import clip
from .sse import ServerSentEvent, SSEDecoder

__all__ = ["DONE", "ChatResult", "ChunkInterpreter", "Item", "as_events", "only_texts", "runs"]

logger = logging.getLogger("netfly")

DONE = "[DONE]"
_QUOTED = 200  # characters of a malformed chunk quoted in a warning or error

# What the interpreter returns for one chunk: choice 0's text alone (the common case), or events.
Item: TypeAlias = "str | list[Event]"
_ONLY_TEXT = {str}

_NOT_EXTRA_TOP = frozenset({"id", "model", "created", "system_fingerprint", "object", "choices", "usage"})
_PLAIN_CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason"})
_DELTA_KEYS = frozenset({"content", "role", "reasoning_content", "reasoning", "tool_calls", "refusal"})
_CHOICE_KEYS = frozenset({"index", "delta", "message", "logprobs", "finish_reason"})
_CALL_KEYS = frozenset({"index", "id", "type", "function"})
# The content string of a chunk as sent: the key, spaces, then a JSON string (escapes and all).
# The json module's own string scanner (C, in every CPython since 2.6, not in typeshed): it reads one
# JSON string, escapes and all, about as fast as a check by hand and faster than any loads().
_scan_string: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
# Below about this many events a read, reading them at once costs more than it saves.
_PLAIN_EVENTS_AT_LEAST = 6
# The first read of an answer: its first few events show the shape of a plain text chunk (the first
# is often a role chunk), so the rest of that read can be read in one pass too.
_SHAPE_FROM_EVENTS = 4
# The json module's parser (the same C string scanner), not orjson's: the texts must be the ones
# _json_string would give, lone surrogate escapes included.
_json_loads_strict: Callable[[str], Any] = json.loads
# bytes.split with a two-byte separator searches byte by byte; the regex engine's literal search is
# about 1.5 times as fast over a read of events.
_split_events: Callable[[bytes], list[bytes]] = re.compile(b"\n\n").split
_CONTENT_STRING = re.compile(r'"content": *("(?:[^"\\]|\\.)*")')


def only_texts(items: list[Item]) -> TypeGuard[list[str]]:
    """Whether ``items`` are all plain texts (nearly every read of a long answer): one C loop to tell."""
    return set(map(type, items)) == _ONLY_TEXT


def runs(items: list[Item]) -> Iterator[tuple[list[str], list[Event]]]:
    """``items`` in order as ``(texts, [])`` for each run of plain texts and ``([], events)`` for each
    list of events: a run of texts (the first read of an answer holds one between its first and last
    chunks) is handled at once."""
    for kind, run in groupby(items, type):
        if kind is str:
            yield cast("list[str]", list(run)), []
        else:
            yield from (([], events) for events in cast("Iterator[list[Event]]", run))


def _has_output(item: Item) -> bool:
    return type(item) is str or any(type(e) is ChoiceDelta and e.has_output for e in item)


def _end_of_events(raw: bytes, count: int) -> int:
    """Where the first ``count`` events of ``raw`` end (after their blank line), when ``raw`` holds more
    than that; else 0."""
    end = 0
    for _ in range(count):
        end = raw.find(b"\n\n", end) + 2
        if end < 2:
            return 0
    return end if end < len(raw) else 0


def as_events(item: Item) -> list[Event]:
    """The events an interpreter result stands for."""
    return [ChoiceDelta(text=item)] if isinstance(item, str) else item


class ChunkInterpreter:
    """Turns events of one attempt into text or typed events; keeps what is needed across chunks."""

    __slots__ = ("strict", "secrets", "done", "finished", "malformed_chunks", "_top", "_meta", "_plain_choice",
                 "_around", "_plain_line")

    def __init__(self, *, strict: bool = False, secrets: tuple[str, ...] = ()) -> None:
        self.strict = strict
        self.secrets = secrets  # scrubbed from the malformed data quoted in warnings and errors
        self.done = False  # [DONE] seen
        self.finished = False  # a finish_reason seen
        self.malformed_chunks = 0
        self._top: dict[str, Any] | None = None  # the last chunk's fields besides choices (no usage)
        self._meta: dict[str, Any] | None = None  # the fields of the last ChunkMeta emitted
        self._plain_choice: dict[str, Any] | None = None  # a plain text choice's fields besides delta
        # The text of the last fast-path chunk, as sent, around its content string: a chunk that is
        # the same text around another JSON string is the same chunk with other text (no parsing).
        self._around: tuple[str, str] | None = None
        self._plain_line: tuple[tuple[str, str], bytes, bytes] | None = None  # _around, as bytes of a line

    def interpret(self, event: ServerSentEvent) -> Item | None:
        """The text or events this server-sent event carries; ``None`` when it carries none."""
        data = event.data
        if event.event == "error":
            raise _upstream_error(_parse_lenient(data))
        if data == DONE:
            self.done = True
            return None
        if not data:
            return None
        around = self._around
        if around is not None and data.startswith(around[0]) and data.endswith(around[1]):
            text = _json_string(data[len(around[0]) : len(data) - len(around[1])])
            if text is not None:
                return text or None
        try:
            chunk = _json.loads(data)
        except _json.JSONDecodeError as exc:
            self._malformed(f"invalid JSON in event data: {exc}", data)
            return None
        if type(chunk) is not dict:
            self._malformed("event data is JSON but not an object", data)
            return None
        item = self.interpret_chunk(chunk)
        if type(item) is str and around is None:
            self._around = _around_content(data)
        return item

    def interpret_read(self, raw: bytes, decoder: SSEDecoder, items: list[Item]) -> None:
        """Append the items of one read of the stream, decoded by ``decoder``, to ``items`` (those before
        an error are there when it is raised). Its whole events go in one pass when they are all plain
        text chunks (nearly every read of a long answer), else event by event."""
        around = self._around_bytes()
        if around is None:
            cut = _end_of_events(raw, _SHAPE_FROM_EVENTS)
            if cut:
                self.interpret_events(decoder.feed(raw[:cut]), items)
                raw = raw[cut:]
                if self.done:  # what follows [DONE] is decoded as before, and left
                    decoder.feed(raw)
                    return
                around = self._around_bytes()
        # A few events at a time (a slow upstream's reads hold one or two) cost less one by one.
        if around is not None and len(raw) >= _PLAIN_EVENTS_AT_LEAST * (len(around[0]) + len(around[1])):
            texts, events = decoder.feed_whole(raw, self.interpret_plain)
            items += texts
        else:
            events = decoder.feed(raw)
        self.interpret_events(events, items)

    def interpret_until_output(self, raw: bytes, decoder: SSEDecoder, items: list[Item]) -> bytes:
        """Append the items of the first events of ``raw`` to ``items``, one event at a time, up to the
        first that carries output (within the first few); return the rest of ``raw``, not yet fed to
        ``decoder``. Empty when the events ran out, or ``[DONE]`` came, first."""
        start = 0
        for _ in range(_SHAPE_FROM_EVENTS):
            end = raw.find(b"\n\n", start) + 2
            if end < 2 or end == len(raw):
                break
            self.interpret_events(decoder.feed(raw[start:end]), items)
            start = end
            if self.done:
                decoder.feed(raw[start:])  # what follows [DONE] is decoded as before, and left
                return b""
            if items and _has_output(items[-1]):
                return raw[start:]
        self.interpret_events(decoder.feed(raw[start:]), items)
        return b""

    def interpret_events(self, events: list[ServerSentEvent], items: list[Item]) -> None:
        """Append the items of ``events`` to ``items``, up to ``[DONE]``."""
        interpret = self.interpret
        for event in events:
            item = interpret(event)
            if item is not None:
                items.append(item)
            elif self.done:
                return

    def interpret_plain(self, events: bytes) -> tuple[list[str], int] | None:
        """The texts of the first of ``events`` (whole server-sent events as sent, see
        :meth:`SSEDecoder.feed_whole`) that are each one ``data:`` line holding a plain text chunk shaped
        as the last one (the same bytes around its content string), read in one pass, and how many bytes
        of ``events`` they span; ``None`` when there are none, or their strings are not one JSON string
        each: interpret them one by one. Empty texts are left out, as :meth:`interpret` does."""
        around = self._around_bytes()
        if around is None:
            return None
        head, tail = around
        # A line more in some event holds a newline between the head and tail of its line: the JSON
        # parse below refuses it there.
        lines = _split_events(events[:-2])
        # C loops over the lines (map, index): a Python step per event would cost what this saves. The
        # end of an answer (its finish, usage and [DONE]) stops the run of plain lines.
        heads = _leading_true(list(map(bytes.startswith, lines, repeat(head))))
        plain = lines[: _leading_true(list(map(bytes.endswith, lines[:heads], repeat(tail))))]
        count = len(plain)
        if not count:
            return None
        texts = _json_strings(b"\n,".join(map(itemgetter(slice(len(head), -len(tail))), plain)), count)
        if texts is None:
            return None
        return texts, len(events) if count == len(lines) else sum(map(len, plain)) + 2 * count

    def _around_bytes(self) -> tuple[bytes, bytes] | None:
        """The fast path's text around a content string, as the bytes of a line: ``data:`` and all."""
        around = self._around
        if around is None:
            return None
        if self._plain_line is None or self._plain_line[0] is not around:
            self._plain_line = (around, ("data: " + around[0]).encode(), around[1].encode())
        return self._plain_line[1:]

    def interpret_chunk(self, chunk: dict[str, Any]) -> Item | None:
        """Apply one parsed ``chat.completion.chunk`` object (it is modified: ``choices`` is taken out)."""
        choices = chunk.pop("choices", None)
        # The fast path: the same fields as the chunk before, and one choice shaped like the last
        # plain one (index 0, no finish, no logprobs, nothing unknown) whose delta is only content.
        if chunk == self._top and type(choices) is list and len(choices) == 1:
            choice = choices[0]
            if type(choice) is dict:
                delta = choice.pop("delta", None)
                if choice == self._plain_choice and type(delta) is dict and len(delta) == 1:
                    content = delta.get("content")
                    if type(content) is str:
                        return content or None
                choice["delta"] = delta
        return self._interpret_slowly(chunk, choices)

    def _interpret_slowly(self, chunk: dict[str, Any], choices: Any) -> list[Event] | None:
        self._around = None  # what the fast path compares with may change here: learn it again
        if chunk.get("error"):
            raise _upstream_error(chunk)
        deltas: list[Event] = []
        if choices:
            if type(choices) is not list:
                self._malformed("choices is not a list", str({**chunk, "choices": choices}))
                return None
            for choice in choices:
                self._remember_plain(choice)
                delta = _choice_delta(choice, "delta")
                if delta is None:
                    self._malformed("a choice is not an object with a valid delta", str(choice))
                    return None
                if delta.finish_reason:
                    self.finished = True
                if delta.has_output or delta.role or delta.finish_reason or delta.logprobs is not None or (
                    delta.delta_extra or delta.choice_extra
                ):
                    deltas.append(delta)
        usage = chunk.get("usage")
        if not usage:
            self._top = chunk  # a following chunk with equal fields may take the fast path
        events: list[Event] = []
        meta = {k: v for k, v in chunk.items() if k != "usage"} if "usage" in chunk else chunk
        if meta and meta != self._meta:
            self._meta = meta
            events.append(_chunk_meta(meta))
        events += deltas
        if usage and isinstance(usage, dict):
            events.append(Usage(usage))
        return events or None

    def _remember_plain(self, choice: Any) -> None:
        """Keep the shape of a plain choice 0 (all but its delta) for the fast path to compare with."""
        if (
            type(choice) is dict
            and not choice.get("index")
            and choice.get("finish_reason") is None
            and choice.get("logprobs") is None
            and choice.keys() <= _PLAIN_CHOICE_KEYS
        ):
            self._plain_choice = {k: v for k, v in choice.items() if k != "delta"}

    def interpret_completion(self, body: Any) -> list[Event]:
        """A whole ``chat.completion`` (JSON, not streamed) as the events a stream would have sent."""
        if not isinstance(body, dict):
            raise StreamDecodeError("JSON reply is not an object")
        if body.get("error"):
            raise _upstream_error(body)
        self.done = True
        choices = body.get("choices") or []
        if not isinstance(choices, list):
            raise self._not_a_completion(body)
        events: list[Event] = [_chunk_meta(body)]
        for choice in choices:
            delta = _choice_delta(choice, "message")
            if delta is None:
                raise self._not_a_completion(body)
            if delta.text is None and isinstance(choice.get("text"), str):  # the legacy completions shape
                delta.text = choice["text"]
                delta.choice_extra = {k: v for k, v in delta.choice_extra.items() if k != "text"}
            self.finished = self.finished or bool(delta.finish_reason)
            events.append(delta)
        usage = body.get("usage")
        if usage and isinstance(usage, dict):
            events.append(Usage(usage))
        return events

    def _not_a_completion(self, body: Any) -> StreamDecodeError:
        return StreamDecodeError(f"JSON reply is not a chat.completion: {clip(str(body), _QUOTED, self.secrets)!r}")

    def _malformed(self, reason: str, data: str) -> None:
        data = clip(data, _QUOTED, self.secrets)  # scrubbed before the cut: no secret's prefix is left
        if self.strict:
            raise StreamDecodeError(f"{reason} (data: {data!r})")
        self.malformed_chunks += 1
        logger.warning("skipping malformed stream chunk: %s (data: %r)", reason, data)


def _chunk_meta(top: dict[str, Any]) -> ChunkMeta:
    created = top.get("created")
    meta = ChunkMeta(  # by position, in the fields' order (a class called with keywords packs them in a dict)
        _str_or_none(top.get("id")),
        _str_or_none(top.get("model")),
        created if isinstance(created, int) and not isinstance(created, bool) else None,
        _str_or_none(top.get("system_fingerprint")),
    )
    if not top.keys() <= _NOT_EXTRA_TOP:
        meta.extra = {k: v for k, v in top.items() if k not in _NOT_EXTRA_TOP}
    return meta


def _choice_delta(choice: Any, key: str) -> ChoiceDelta | None:
    """One choice (its ``delta`` or, for a whole completion, its ``message``) as a ChoiceDelta;
    ``None`` when it is malformed."""
    if type(choice) is not dict:
        return None
    delta = choice.get(key) or {}
    index = choice.get("index", 0)
    if type(delta) is not dict or type(index) is not int:
        return None
    content, refusal, role = delta.get("content"), delta.get("refusal"), delta.get("role")
    reasoning, field = delta.get("reasoning_content"), "reasoning_content"
    if reasoning is None and delta.get("reasoning") is not None:
        reasoning, field = delta.get("reasoning"), "reasoning"
    if not all(v is None or type(v) is str for v in (content, refusal, role, reasoning)):
        return None  # counted and skipped: a non-string would break the caller's text
    calls = _tool_call_deltas(delta.get("tool_calls"))
    if calls is None:
        return None
    # index, text, role, reasoning, reasoning_field, tool_calls, refusal, logprobs, finish_reason: by position
    # (a class called with keywords packs them in a dict)
    result = ChoiceDelta(
        index, content, role, reasoning, field, calls, refusal, choice.get("logprobs"),
        _str_or_none(choice.get("finish_reason")),
    )
    if not delta.keys() <= _DELTA_KEYS:
        result.delta_extra = {k: v for k, v in delta.items() if k not in _DELTA_KEYS}
    if not choice.keys() <= _CHOICE_KEYS:
        result.choice_extra = {k: v for k, v in choice.items() if k not in _CHOICE_KEYS}
    return result


def _tool_call_deltas(calls: Any) -> tuple[ToolCallDelta, ...] | None:
    """Tool-call fragments as sent; ``None`` when malformed. A whole message's calls have no
    ``index``: their position stands for it."""
    if not calls:
        return ()
    if type(calls) is not list:
        return None
    fragments = []
    for position, call in enumerate(calls):
        if type(call) is not dict:
            return None
        function = call.get("function") or {}
        index = call.get("index", position)
        if type(index) is not int or type(function) is not dict:
            return None
        fragment = ToolCallDelta(
            index=index,
            id=_str_or_none(call.get("id")),
            type=_str_or_none(call.get("type")),
            name=_str_or_none(function.get("name")),
            arguments=_str_or_none(function.get("arguments")),
        )
        if not call.keys() <= _CALL_KEYS:
            fragment.extra = {k: v for k, v in call.items() if k not in _CALL_KEYS}
        fragments.append(fragment)
    return tuple(fragments)


def _around_content(data: str) -> tuple[str, str] | None:
    """The text before and after the one ``"content":`` string value in ``data`` (a chunk as sent)."""
    if data.count('"content":') != 1:
        return None  # none, or one more (logprobs, a vendor field): not a plain text chunk's shape
    found = _CONTENT_STRING.search(data)
    return None if found is None else (data[: found.start(1)], data[found.end(1) :])


def _json_string(value: str) -> str | None:
    """``value`` decoded when it is exactly one JSON string, else ``None``."""
    if value[:1] != '"':
        return None
    try:
        text, end = _scan_string(value, 1)
    except json.JSONDecodeError:
        return None
    return text if end == len(value) else None


def _leading_true(flags: list[bool]) -> int:
    """How many of ``flags`` are true before the first false one."""
    try:
        return flags.index(False)
    except ValueError:
        return len(flags)


def _json_strings(joined: bytes, count: int) -> list[str] | None:
    """The non-empty strings of ``joined``, ``count`` values joined by ``\\n,``, when each is exactly
    one JSON string, else ``None``. One parse of them all as an array can only stand for their parse
    one by one when none starts or ends inside a string (a raw newline is illegal there) and each is one
    whole string (quotes at both ends; as many elements, all strings, as values)."""
    if joined[:1] != b'"' or joined[-1:] != b'"' or joined.count(b'"\n,"') != count - 1:
        return None
    try:
        texts = _json_loads_strict("[" + joined.decode() + "]")  # strict UTF-8, as an event's own decoding is not
    except ValueError:
        return None
    if len(texts) != count or set(map(type, texts)) != _ONLY_TEXT:
        return None
    return list(filter(None, texts))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _parse_lenient(data: str) -> Any:
    try:
        return _json.loads(data)
    except _json.JSONDecodeError:
        return data


def _upstream_error(payload: Any) -> UpstreamError:
    """Build an :class:`UpstreamError` from ``{"error": {...}}``, ``{"error": "..."}`` or text."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("detail") or error)
        return UpstreamError(message, code=error.get("code"), type=error.get("type"), param=error.get("param"))
    return UpstreamError(str(error) or "the server reported an error in the stream")
