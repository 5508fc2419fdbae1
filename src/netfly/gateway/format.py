"""OpenAI response objects: ``chat.completion``, ``chat.completion.chunk`` events, model lists."""

from __future__ import annotations

import time
from typing import Any

from .. import _ids, _json
from ..chunks import ChatResult

DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + _json.dumps(obj) + b"\n\n"


class CompletionFormatter:
    """Builds the objects of one answer; they share its id, creation time and model."""

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{_ids.unique_hex()}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            obj["usage"] = usage  # as OpenAI does: null on every chunk but the last
        return sse_event(obj)

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def role(self) -> bytes:
        return self.delta({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self.delta({"content": text})

    def finish(self, finish_reason: str | None) -> bytes:
        return self.delta({}, finish_reason)

    def usage(self, usage: dict[str, Any] | None) -> bytes:
        return self._chunk([], usage)

    def completion(self, result: ChatResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        obj: dict[str, Any] = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
        }
        if result.usage:
            obj["usage"] = result.usage
        return obj


def model_object(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def model_list(ids: list[tuple[str, str]]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(model_id, owner) for model_id, owner in ids]}
