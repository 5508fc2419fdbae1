"""The chat completions adapter: typed events → ``chat.completion.chunk`` events, and the
``chat.completion`` object. Pure: no I/O.

Every delta the upstream sent is relayed as it arrives (tool-call fragments included), with its
unknown fields. A chunk carrying only text — nearly all of them — is made from a prebuilt byte
prefix and suffix: one JSON string encoding per chunk, which keeps the relay as fast as the upstream.
"""

from __future__ import annotations

import time
from typing import Any

from .. import _ids, _json
from ..events import ChatResult, ChoiceDelta, ChoiceResult, ChunkMeta, Event, ToolCallDelta, Usage
from .errors import ErrorInfo

DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + _json.dumps(obj) + b"\n\n"


class ChatChunkEncoder:
    """Encodes one answer's events as OpenAI chunks sharing one id, creation time and model."""

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.meta = ChunkMeta(id=f"chatcmpl-{_ids.unique_hex()}", created=int(time.time()))
        self._usage_sent = False
        # Built when a chunk is first encoded: the upstream's first chunk usually brings its own meta.
        self._head: dict[str, Any] | None = None
        self._text_prefix: bytes | None = None  # built when the first text chunk is encoded
        self._text_suffix = b""

    def _chunk_head(self) -> dict[str, Any]:
        """The fields every chunk of the answer starts with."""
        head = self._head
        if head is None:
            meta = self.meta
            head = {**meta.extra, "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                    "model": self.model}
            if meta.system_fingerprint is not None:
                head["system_fingerprint"] = meta.system_fingerprint
            self._head = head
        return head

    def _text_template(self) -> bytes:
        """The bytes before a chunk's text when it carries choice 0's text alone (and sets those after)."""
        sample = _json.dumps({**self._chunk_head(), "choices": [{"index": 0, "delta": {"content": ""},
                                                                 "logprobs": None, "finish_reason": None}],
                              **self._null_usage()})
        prefix, _, suffix = sample.partition(b'"content":""')
        self._text_prefix, self._text_suffix = b"data: " + prefix + b'"content":', suffix + b"\n\n"
        return self._text_prefix

    def _null_usage(self) -> dict[str, Any]:
        return {"usage": None} if self.include_usage else {}  # as OpenAI: null on every chunk but the last

    def encode(self, event: Event) -> bytes:
        """The bytes that relay ``event`` (empty for a meta event: it shapes the chunks that follow)."""
        if isinstance(event, ChoiceDelta):
            if event.index == 0 and event.text and _text_only(event):
                prefix = self._text_prefix or self._text_template()
                return prefix + _json.dumps(event.text) + self._text_suffix
            return self._chunk([choice_delta(event)])
        if isinstance(event, Usage):
            if not self.include_usage:
                return b""
            self._usage_sent = True
            return self._chunk([], dict(event.usage))
        self.meta = ChunkMeta(
            id=event.id or self.meta.id, model=event.model, created=event.created or self.meta.created,
            system_fingerprint=event.system_fingerprint or self.meta.system_fingerprint,
            extra={**self.meta.extra, **event.extra},
        )
        self._head = self._text_prefix = None
        return b""

    def encode_texts(self, texts: list[str]) -> bytes:
        """:meth:`encode` of a text-only delta of choice 0 for each of ``texts`` (none empty), at once."""
        return _json.strings_between(self._text_prefix or self._text_template(), texts, self._text_suffix)

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj = {**self._chunk_head(), "choices": choices}
        if self.include_usage:
            obj["usage"] = usage
        return sse_event(obj)

    def start(self) -> bytes:
        return b""

    def finish(self) -> bytes:
        """The end of the stream: a usage chunk when asked for and none came (null usage), ``[DONE]``."""
        if self.include_usage and not self._usage_sent:
            return self._chunk([], None) + DONE_EVENT
        return DONE_EVENT

    def error(self, info: ErrorInfo) -> bytes:
        return sse_event(info.body())

    def completion(self, result: ChatResult) -> dict[str, Any]:
        """The ``chat.completion`` object of a whole answer."""
        choices = result.choices or [_first_choice(result)]
        obj: dict[str, Any] = {
            "id": result.id or self.meta.id, "object": "chat.completion",
            "created": result.created or self.meta.created, "model": self.model,
            "choices": [_choice(choice) for choice in choices],
        }
        if result.system_fingerprint is not None:
            obj["system_fingerprint"] = result.system_fingerprint
        if result.usage:
            obj["usage"] = result.usage
        return obj


def _text_only(delta: ChoiceDelta) -> bool:
    return not (delta.role or delta.reasoning or delta.tool_calls or delta.refusal or delta.logprobs
                or delta.finish_reason or delta.delta_extra or delta.choice_extra)


def choice_delta(event: ChoiceDelta) -> dict[str, Any]:
    """One ``choices[]`` item of a chunk, with every field the upstream sent."""
    delta: dict[str, Any] = dict(event.delta_extra)
    if event.role:
        delta["role"] = event.role
    if event.text is not None:
        delta["content"] = event.text
    if event.reasoning is not None:
        delta[event.reasoning_field] = event.reasoning
    if event.tool_calls:
        delta["tool_calls"] = [_tool_call_delta(call) for call in event.tool_calls]
    if event.refusal is not None:
        delta["refusal"] = event.refusal
    return {**event.choice_extra, "index": event.index, "delta": delta, "logprobs": event.logprobs,
            "finish_reason": event.finish_reason}


def _tool_call_delta(call: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {**call.extra, "index": call.index}
    if call.id is not None:
        out["id"] = call.id
    if call.type is not None:
        out["type"] = call.type
    function: dict[str, Any] = {}
    if call.name is not None:
        function["name"] = call.name
    if call.arguments is not None:
        function["arguments"] = call.arguments
    if function:
        out["function"] = function
    return out


def _first_choice(result: ChatResult) -> ChoiceResult:
    return ChoiceResult(index=0, text=result.text, reasoning=result.reasoning, tool_calls=result.tool_calls,
                        refusal=result.refusal, logprobs=result.logprobs, finish_reason=result.finish_reason)


def _choice(choice: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": choice.role, "content": choice.text or None, "refusal": choice.refusal}
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_calls:
        message["tool_calls"] = [call.to_dict() for call in choice.tool_calls]
    return {"index": choice.index, "message": message, "logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason}

