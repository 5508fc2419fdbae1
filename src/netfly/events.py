"""Typed events of a chat completion, and the accumulator that assembles them into a result. No I/O.

The chunk interpreter turns each upstream ``chat.completion.chunk`` into events; the library, the
router and every gateway adapter consume the same events::

    ChunkMeta     the chunk's own fields: id, model, created, system_fingerprint (+ unknown ones);
                  emitted for the first chunk and whenever one of them changes
    ChoiceDelta   what one chunk says about one choice (``index``): text, reasoning, tool-call
                  fragments, refusal, logprobs, finish reason (+ unknown delta / choice fields)
    Usage         token usage, with its details, as the server sent it

Unknown fields are kept in ``extra`` mappings so that a relay loses nothing a newer server sends.
:class:`ChatAccumulator` assembles events exactly as openai-python assembles
``ChatCompletionChunk`` objects: text, reasoning and refusal are concatenated, and tool-call
fragments are merged by their ``index`` (``id``, ``type`` and ``name`` from the first fragment that
has them, ``arguments`` concatenated as sent).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias


class _EmptyMapping(Mapping[str, Any]):
    """The shared, read-only default of ``extra`` fields: most events have none, so none is allocated."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:  # immutable, so hashable (dataclasses refuse unhashable defaults)
        return 0

    def __repr__(self) -> str:
        return "{}"


_NO_EXTRA: Mapping[str, Any] = _EmptyMapping()


@dataclass(slots=True)
class ToolCallDelta:
    """One fragment of a streamed tool call. ``index`` says which call of the choice it belongs to."""

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str | None = None
    extra: Mapping[str, Any] = _NO_EXTRA  # unknown keys of the call object (not of ``function``)


@dataclass(slots=True)
class ChoiceDelta:
    """What one chunk says about one choice."""

    index: int = 0
    text: str | None = None  # delta.content
    role: str | None = None
    reasoning: str | None = None  # delta.reasoning_content, or delta.reasoning
    reasoning_field: str = "reasoning_content"  # which of the two names the server used
    tool_calls: tuple[ToolCallDelta, ...] = ()
    refusal: str | None = None
    logprobs: Any = None  # the choice's logprobs object, as sent
    finish_reason: str | None = None
    delta_extra: Mapping[str, Any] = _NO_EXTRA  # unknown keys of ``delta``
    choice_extra: Mapping[str, Any] = _NO_EXTRA  # unknown keys of the choice

    @property
    def has_output(self) -> bool:
        """Whether this delta carries output the caller sees (text, reasoning, tool call or refusal).

        Once such a delta reached the caller no retry and no other provider may be tried.
        """
        return bool(self.text or self.reasoning or self.tool_calls or self.refusal)


@dataclass(slots=True)
class Usage:
    """Token usage as the server reported it (``prompt_tokens``, ``completion_tokens``, details…)."""

    usage: Mapping[str, Any]

    @property
    def prompt_tokens(self) -> int | None:
        return _int_or_none(self.usage.get("prompt_tokens"))

    @property
    def completion_tokens(self) -> int | None:
        return _int_or_none(self.usage.get("completion_tokens"))

    @property
    def total_tokens(self) -> int | None:
        return _int_or_none(self.usage.get("total_tokens"))


@dataclass(slots=True)
class ChunkMeta:
    """The chunk's own fields. ``extra`` holds unknown top-level keys (``service_tier``…)."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    extra: Mapping[str, Any] = _NO_EXTRA


Event: TypeAlias = ChoiceDelta | Usage | ChunkMeta


# -- assembled results ------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """A whole tool call. ``arguments`` is the string exactly as the server sent it (not parsed)."""

    id: str | None
    name: str
    arguments: str = ""
    type: str = "function"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls[]`` item."""
        return {
            **self.extra,
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ChoiceResult:
    """One assembled choice."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None  # ``content`` / ``refusal`` token lists concatenated
    finish_reason: str | None = None
    role: str = "assistant"


@dataclass
class ChatResult:
    """Everything known about one answer (of choice 0; ``choices`` has every choice when ``n > 1``)."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    choices: list[ChoiceResult] = field(default_factory=list)
    malformed_chunks: int = 0

    def __str__(self) -> str:
        return self.text


class ChatAccumulator:
    """Assembles events into a :class:`ChatResult`; feed it every event, then call :meth:`result`."""

    def __init__(self) -> None:
        self.meta = ChunkMeta()
        self.usage: dict[str, Any] | None = None
        self._choices: dict[int, _ChoiceParts] = {}

    def add(self, event: Event) -> None:
        if isinstance(event, ChoiceDelta):
            parts = self._choices.get(event.index)
            if parts is None:
                parts = self._choices[event.index] = _ChoiceParts(event.index)
            parts.add(event)
        elif isinstance(event, Usage):
            self.usage = dict(event.usage)
        else:
            self.meta = _merge_meta(self.meta, event)

    def add_text(self, text: str) -> None:
        """Choice 0's text alone: the interpreter's fast path for plain text chunks."""
        self.text_parts(0).append(text)

    def text_parts(self, index: int = 0) -> list[str]:
        """The live list of a choice's text pieces: appending to it adds text (the fastest path)."""
        parts = self._choices.get(index)
        if parts is None:
            parts = self._choices[index] = _ChoiceParts(index)
        return parts.text

    def result(self, *, malformed_chunks: int = 0) -> ChatResult:
        choices = [parts.result() for _, parts in sorted(self._choices.items())]
        first = choices[0] if choices else ChoiceResult()
        meta = self.meta
        return ChatResult(
            text=first.text,
            finish_reason=first.finish_reason,
            usage=self.usage,
            model=meta.model,
            id=meta.id,
            reasoning=first.reasoning,
            tool_calls=first.tool_calls,
            refusal=first.refusal,
            logprobs=first.logprobs,
            created=meta.created,
            system_fingerprint=meta.system_fingerprint,
            choices=choices if len(choices) > 1 else [],
            malformed_chunks=malformed_chunks,
        )


class _ChoiceParts:
    __slots__ = ("index", "text", "reasoning", "refusal", "logprobs", "finish_reason", "role", "calls")

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] | None = None
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.role = "assistant"
        self.calls: dict[int, ToolCall] = {}

    def add(self, delta: ChoiceDelta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.refusal:
            self.refusal = (self.refusal or []) + [delta.refusal]
        if delta.role:
            self.role = delta.role
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if isinstance(delta.logprobs, Mapping):
            self.logprobs = _merge_logprobs(self.logprobs, delta.logprobs)
        for fragment in delta.tool_calls:
            self._add_fragment(fragment)

    def _add_fragment(self, fragment: ToolCallDelta) -> None:
        call = self.calls.get(fragment.index)
        if call is None:
            call = self.calls[fragment.index] = ToolCall(id=None, name="")
        if fragment.id and not call.id:
            call.id = fragment.id
        if fragment.type:
            call.type = fragment.type
        if fragment.name:
            call.name += fragment.name  # some servers stream the name in pieces too, as openai-python allows
        if fragment.arguments:
            call.arguments += fragment.arguments
        if fragment.extra:
            call.extra.update(fragment.extra)

    def result(self) -> ChoiceResult:
        return ChoiceResult(
            index=self.index,
            text="".join(self.text),
            reasoning="".join(self.reasoning),
            tool_calls=[call for _, call in sorted(self.calls.items())],
            refusal="".join(self.refusal) if self.refusal is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            role=self.role,
        )


def _merge_meta(old: ChunkMeta, new: ChunkMeta) -> ChunkMeta:
    return ChunkMeta(  # id, model, created, system_fingerprint, extra: by position (see chunks._chunk_meta)
        old.id or new.id,
        old.model or new.model,
        old.created if old.created is not None else new.created,
        new.system_fingerprint or old.system_fingerprint,
        {**old.extra, **new.extra} if new.extra else old.extra,
    )


def _merge_logprobs(old: dict[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate the token lists (``content``, ``refusal``) of streamed logprobs."""
    merged = dict(old or {})
    for key, value in new.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
