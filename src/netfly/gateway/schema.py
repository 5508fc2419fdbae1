"""Reading a ``POST /v1/chat/completions`` body: every error names the field at fault.

Only the fields the gateway acts on are checked in depth; the rest (temperature, max_tokens, stop,
seed, tools, response_format, ...) pass through to the provider after a type check where OpenAI's
type is known. Message contents are checked by the provider itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .. import _json
from ..provider import CALL_OPTIONS
from .errors import GatewayError

# Keyword arguments of Provider.stream that configure the call: a client must not set them
# (``proxy`` or ``headers`` from a request body would steer the gateway's own upstream call).
FORBIDDEN_FIELDS = frozenset(CALL_OPTIONS | {"proxy"})

_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INTEGERS = ("max_tokens", "max_completion_tokens", "seed", "top_logprobs", "n")
_BOOLEANS = ("stream", "logprobs", "parallel_tool_calls", "store")
_STRINGS = ("model", "user", "reasoning_effort", "service_tier")
_OBJECTS = ("stream_options", "response_format", "logit_bias", "metadata")
_ARRAYS = ("tools", "functions", "modalities")
_HANDLED = frozenset({"model", "messages", "stream", "stream_options"})


@dataclass
class ChatCompletionRequest:
    model: str | None
    messages: list[Any]
    stream: bool = False
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # passed to the provider as-is
    stream_options: dict[str, Any] = field(default_factory=dict)  # the client's, merged with the gateway's


@dataclass
class ChatCall:
    """A request of any wire API, mapped onto the chat engine."""

    model: str | None
    messages: list[Any]
    stream: bool
    params: dict[str, Any]  # chat body fields for the upstream
    body: dict[str, Any]  # the request as the client sent it (echoed in some APIs' answers)


def load_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = _json.loads(raw)
    except _json.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, f"request body must be a JSON object, got {json_type(body)}")
    return body


def check_encodable(body: Mapping[str, Any], names: Iterable[str]) -> None:
    """400 naming the first of ``names`` whose value cannot be encoded again."""
    for name in names:
        encoded(body.get(name), name)


def encoded(value: Any, name: str) -> bytes:
    """``value`` as JSON, or a 400 naming field ``name``: it is nested deeper than the encoder goes
    (the parser allows more)."""
    try:
        return _json.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise GatewayError(400, f"field {name!r} cannot be encoded again: {exc}", param=name) from None


def expect_type(body: Mapping[str, Any], name: str, kind: Kind) -> None:
    """400 naming ``name`` when it is present, not null and not of ``kind`` (booleans are not numbers)."""
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise GatewayError(400, f"field {name!r} must be {_KIND_NAMES[kind]}, got {json_type(value)}", param=name)


Kind: TypeAlias = "type | tuple[type, ...]"
NUMBER = (int, float)  # a JSON number: either
_KIND_NAMES: dict[Kind, str] = {
    str: "a string", int: "an integer", NUMBER: "a number", list: "an array", dict: "an object", bool: "a boolean",
}


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    body = load_object(raw)
    forbidden = sorted(FORBIDDEN_FIELDS & body.keys())
    if forbidden:
        raise GatewayError(
            400, f"field {forbidden[0]!r} is not accepted: it is a gateway setting, not a request field",
            param=forbidden[0],
        )
    _check_types(body)

    if "messages" not in body or body["messages"] is None:
        raise GatewayError(400, "field 'messages' is required", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise GatewayError(400, f"field 'messages' must be an array, got {json_type(messages)}", param="messages")
    if not messages:
        raise GatewayError(400, "field 'messages' must not be empty", param="messages")

    options = body.get("stream_options") or {}
    include_usage = options.get("include_usage", False)
    if include_usage is not None and not isinstance(include_usage, bool):
        raise GatewayError(400, f"field 'stream_options.include_usage' must be a boolean, got "
                                f"{json_type(include_usage)}", param="stream_options.include_usage")
    return ChatCompletionRequest(
        model=body.get("model") or None,
        messages=messages,
        stream=bool(body.get("stream")),
        include_usage=bool(include_usage),
        stream_options=dict(options),
        params={k: v for k, v in body.items() if k not in _HANDLED and v is not None},
    )


def _check_types(body: Mapping[str, Any]) -> None:
    for name, value in body.items():  # a request's few fields, not every known one
        kind = _FIELD_KINDS.get(name)
        if kind is not None:
            expect_type(body, name, kind)
        elif name in _SHAPED_FIELDS and value is not None and not _SHAPED_FIELDS[name][1](value):
            raise GatewayError(400, f"field {name!r} must be {_SHAPED_FIELDS[name][0]}, got {json_type(value)}",
                               param=name)


_FIELD_KINDS: dict[str, Kind] = {
    **dict.fromkeys(_NUMBERS, NUMBER), **dict.fromkeys(_INTEGERS, int), **dict.fromkeys(_BOOLEANS, bool),
    **dict.fromkeys(_STRINGS, str), **dict.fromkeys(_OBJECTS, dict), **dict.fromkeys(_ARRAYS, list),
}
# Fields of more than one shape: what they must be, and the test of it.
_SHAPED_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "stop": ("a string or an array of strings",
             lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))),
    "tool_choice": ("a string or an object", lambda v: isinstance(v, (str, dict))),
}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
