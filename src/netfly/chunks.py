"""The chunk interpreter: server-sent events of a chat completion in, text deltas out. No I/O.

It knows the OpenAI ``chat.completion.chunk`` shape: ``choices[0].delta.content`` is the answer
text, ``delta.reasoning_content`` (or ``delta.reasoning``) is kept apart from it, ``finish_reason``,
``usage`` and ``model`` are remembered, ``data: [DONE]`` ends the stream, and an error sent inside
the stream raises :class:`UpstreamError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import _json
from .errors import StreamDecodeError, UpstreamError
from .redact import scrub
from .sse import ServerSentEvent

logger = logging.getLogger("netfly")

DONE = "[DONE]"


@dataclass
class ChatResult:
    """Everything known about one finished answer."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    malformed_chunks: int = 0

    def __str__(self) -> str:
        return self.text


class ChunkInterpreter:
    """Turns events into answer text, collecting the rest of what the server said on the way."""

    __slots__ = ("strict", "secrets", "done", "finish_reason", "usage", "model", "id", "reasoning_parts",
                 "tool_calls", "malformed_chunks")

    def __init__(self, *, strict: bool = False, secrets: tuple[str, ...] = ()) -> None:
        self.strict = strict
        self.secrets = secrets  # scrubbed from the malformed data quoted in warnings and errors
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.id: str | None = None
        self.reasoning_parts: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.malformed_chunks = 0

    def interpret(self, event: ServerSentEvent) -> str | None:
        """Return the answer text this event carries, or ``None`` when it carries none."""
        data = event.data
        if event.event == "error":
            raise _upstream_error(_parse_lenient(data))
        if data == DONE:
            self.done = True
            return None
        if not data:
            return None
        try:
            chunk = _json.loads(data)
        except _json.JSONDecodeError as exc:
            self._malformed(f"invalid JSON in event data: {exc}", data)
            return None
        if not isinstance(chunk, dict):
            self._malformed("event data is JSON but not an object", data)
            return None
        return self.interpret_chunk(chunk)

    def interpret_chunk(self, chunk: dict[str, Any]) -> str | None:
        """Apply one parsed ``chat.completion.chunk`` object."""
        if chunk.get("error"):
            raise _upstream_error(chunk)
        if self.model is None:
            self.model = chunk.get("model")
            self.id = chunk.get("id")
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:
            return None  # usage-only chunk or a content-filter prelude
        choice = choices[0] if isinstance(choices, list) else None
        if not isinstance(choice, dict):
            self._malformed("choices is not a list of objects", str(chunk)[:200])
            return None
        finish = choice.get("finish_reason")
        if finish:
            self.finish_reason = finish
        delta = choice.get("delta")
        if not delta:
            return None
        content = delta.get("content") if isinstance(delta, dict) else None
        if not isinstance(delta, dict) or not isinstance(content, (str, type(None))):
            # Counted and skipped like bad JSON: a non-string would break the caller's text.
            self._malformed("delta is not an object with string content", str(chunk)[:200])
            return None
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.reasoning_parts.append(reasoning)
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            self.tool_calls.extend(tool_calls)
        return content if content else None

    def interpret_completion(self, body: Any) -> str | None:
        """A whole ``chat.completion`` from a server that ignored ``stream: true``."""
        if not isinstance(body, dict):
            raise StreamDecodeError("JSON reply is not an object")
        if body.get("error"):
            raise _upstream_error(body)
        self.done = True
        self.model = body.get("model")
        self.id = body.get("id")
        self.usage = body.get("usage") or None
        choices = body.get("choices") or []
        if not choices:
            return None
        choice = choices[0] if isinstance(choices, list) else None
        message = (choice.get("message") or {}) if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or not isinstance(message, dict):
            raise StreamDecodeError(f"JSON reply is not a chat.completion: {str(body)[:200]!r}")
        self.finish_reason = choice.get("finish_reason")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning:
            self.reasoning_parts.append(reasoning)
        if message.get("tool_calls"):
            self.tool_calls.extend(message["tool_calls"])
        content = message.get("content")
        if content is None:
            content = choice.get("text")  # legacy completions shape
        if not isinstance(content, (str, type(None))):
            raise StreamDecodeError(f"JSON reply's content is not a string: {str(body)[:200]!r}")
        return content or None

    def result(self, text: str) -> ChatResult:
        return ChatResult(
            text=text,
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.model,
            id=self.id,
            reasoning="".join(self.reasoning_parts),
            tool_calls=list(self.tool_calls),
            malformed_chunks=self.malformed_chunks,
        )

    def _malformed(self, reason: str, data: str) -> None:
        # Scrub before cutting, so a secret across the cut cannot leave a prefix behind.
        data = (scrub(data, self.secrets) if self.secrets else data)[:200]
        if self.strict:
            raise StreamDecodeError(f"{reason} (data: {data!r})")
        self.malformed_chunks += 1
        logger.warning("skipping malformed stream chunk: %s (data: %r)", reason, data)


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
        return UpstreamError(message, code=error.get("code"), type=error.get("type"))
    return UpstreamError(str(error) or "the server reported an error in the stream")


def error_message_from_body(body: Any, fallback: str) -> str:
    """The human message inside an error response body, in the shapes servers commonly use."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    return str(error[key])
        elif error:
            return str(error)
        if body.get("detail"):
            return str(body["detail"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return fallback
