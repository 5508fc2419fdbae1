"""The Anthropic Messages API adapter (``POST /v1/messages``) over the chat engine. Pure: no I/O.

A request becomes chat ``messages`` and body fields (``tool_use`` → ``tool_calls``, ``tool_result``
→ ``tool`` messages, images → ``image_url`` parts); the chat events come back as Anthropic's event
sequence (``message_start``, content blocks — thinking, text, tool_use — ``message_delta``,
``message_stop``) or as one ``message`` object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _ids, _json
from ..events import ChatAccumulator, ChatResult, ChoiceDelta, Event
from .errors import ErrorInfo, GatewayError
from .schema import NUMBER, ChatCall, Kind, encoded, expect_type, json_type, load_object
from .usage import reported_tokens

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 501: "api_error",
                503: "overloaded_error", 504: "timeout_error"}


def anthropic_error(info: ErrorInfo) -> dict[str, Any]:
    """Anthropic's error object for ``info``."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(info.status, "api_error"), "message": info.message}}


# -- request ------------------------------------------------------------------------------------


def parse_messages_request(raw: bytes) -> ChatCall:
    body = load_object(raw)
    for name, kind in _FIELD_KINDS:
        expect_type(body, name, kind)
    if not body.get("messages"):
        raise GatewayError(400, "field 'messages' is required and must not be empty", param="messages")
    messages = _system(body.get("system"))
    for i, message in enumerate(body["messages"]):
        messages += _chat_messages(message, f"messages[{i}]")
    params: dict[str, Any] = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k")
                              if body.get(k) is not None}
    if body.get("stop_sequences"):
        params["stop"] = body["stop_sequences"]
    if body.get("tools"):
        params["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body["tools"])]
    params.update(_tool_choice(body.get("tool_choice")))
    return ChatCall(body.get("model") or None, messages, bool(body.get("stream")), params, body)


_FIELD_KINDS: tuple[tuple[str, Kind], ...] = (
    ("model", str), ("max_tokens", int), ("messages", list), ("stop_sequences", list), ("tools", list),
    ("stream", bool), ("temperature", NUMBER), ("top_p", NUMBER), ("top_k", int), ("metadata", dict),
)


def _system(system: Any) -> list[dict[str, Any]]:
    if not system:
        return []
    if isinstance(system, list):
        system = "\n\n".join(_text(block, f"system[{i}]") for i, block in enumerate(system)
                             if isinstance(block, Mapping))
    if not isinstance(system, str):
        raise GatewayError(400, f"field 'system' must be a string or an array of text blocks, got "
                                f"{json_type(system)}", param="system")
    return [{"role": "system", "content": system}]


def _chat_messages(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
        raise GatewayError(400, f"{where} must be an object with role 'user' or 'assistant'", param=where)
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise GatewayError(400, f"{where}.content must be a string or an array of blocks, got "
                                f"{json_type(content)}", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        _add_block(block, f"{where}.content[{j}]", parts, calls, results)
    out = list(results)  # tool results answer the previous turn's calls: they come first
    if parts or calls:
        chat: dict[str, Any] = {"role": role, "content": parts or None}
        if calls:
            chat["tool_calls"] = calls
        out.append(chat)
    return out


def _add_block(block: Any, where: str, parts: list[dict[str, Any]], calls: list[dict[str, Any]],
               results: list[dict[str, Any]]) -> None:
    kind = block.get("type") if isinstance(block, Mapping) else None
    if kind == "text":
        parts.append({"type": "text", "text": _text(block, where)})
    elif kind == "image":
        parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), where)}})
    elif kind == "tool_use":
        arguments = encoded(block.get("input") or {}, f"{where}.input").decode()
        calls.append({"id": block.get("id"), "type": "function",
                      "function": {"name": block.get("name"), "arguments": arguments}})
    elif kind == "tool_result":
        results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                        "content": _result_text(block.get("content"), f"{where}.content")})
    elif kind not in ("thinking", "redacted_thinking"):  # earlier thinking is not sent back to a chat model
        raise GatewayError(400, f"{where}: block type {kind!r} is not supported (text, image, tool_use, "
                                "tool_result, thinking)", param=where)


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, Mapping) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, Mapping) and source.get("type") == "url":
        return str(source.get("url"))
    raise GatewayError(400, f"{where}.source must be a base64 or url image source", param=f"{where}.source")


def _result_text(content: Any, where: str) -> str:
    if isinstance(content, list):
        return "".join(_text(block, f"{where}[{i}]") for i, block in enumerate(content)
                       if isinstance(block, Mapping) and block.get("type") == "text")
    return content if isinstance(content, str) else ""


def _text(block: Mapping[str, Any], where: str) -> str:
    """A text block's text; 400 naming it when it is not a string."""
    text = block.get("text", "")
    if not isinstance(text, str):
        raise GatewayError(400, f"{where}.text must be a string, got {json_type(text)}", param=f"{where}.text")
    return text


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or not tool.get("name"):
        raise GatewayError(400, f"tools[{i}] must be an object with a name", param=f"tools[{i}]")
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, Mapping):
        return {}
    kind = choice.get("type")
    mapped: dict[str, Any] = {}
    if kind in ("auto", "none"):
        mapped["tool_choice"] = kind
    elif kind == "any":
        mapped["tool_choice"] = "required"
    elif kind == "tool":
        mapped["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use"):
        mapped["parallel_tool_calls"] = False
    return mapped


# -- the message object -------------------------------------------------------------------------


def anthropic_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    return {"input_tokens": reported_tokens(usage, "prompt_tokens"),
            "output_tokens": reported_tokens(usage, "completion_tokens")}


class MessageBuilder:
    """The ``message`` object of one answer; tool-use ids stay the same across events."""

    def __init__(self, model: str) -> None:
        self.id = f"msg_{_ids.unique_hex()}"
        self.model = model
        self.tool_ids: dict[int, str] = {}

    def tool_id(self, index: int, upstream: str | None) -> str:
        if index not in self.tool_ids:
            self.tool_ids[index] = upstream or f"toolu_{_ids.unique_hex()}"
        return self.tool_ids[index]

    def message(self, result: ChatResult | None) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if result is not None:
            if result.reasoning:
                content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
            if result.text or result.refusal:
                content.append({"type": "text", "text": result.text or result.refusal or ""})
            for i, call in enumerate(result.tool_calls):
                content.append({"type": "tool_use", "id": self.tool_id(i, call.id), "name": call.name,
                                "input": _arguments(call.arguments)})
        stop = STOP_REASONS.get(result.finish_reason or "", "end_turn") if result is not None else None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop, "stop_sequence": None,
                "usage": anthropic_usage(result.usage if result is not None else None)}


def _arguments(arguments: str) -> Any:
    try:
        return _json.loads(arguments) if arguments else {}
    except _json.JSONDecodeError:
        return {"arguments": arguments}  # the model wrote broken JSON: keep it rather than lose it


# -- the event stream ---------------------------------------------------------------------------


_TEXT_BLOCK = ("text", -1)
_TEXT_DELTA_END = b"}}\n\n"


class MessagesEncoder:
    """Chat events → Anthropic server-sent events; one content block open at a time."""

    def __init__(self, builder: MessageBuilder) -> None:
        self.builder = builder
        self.accumulator = ChatAccumulator()
        self.blocks: list[tuple[str, int]] = []  # (kind, tool-call index) of each block
        self.open: int | None = None
        self._text_prefix = (-1, b"")  # (block index, the bytes before a text delta's JSON string)

    @staticmethod
    def _event(kind: str, obj: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _json.dumps({"type": kind, **obj}) + b"\n\n"

    def start(self) -> bytes:
        return self._event("message_start", {"message": self.builder.message(None)})

    def encode_texts(self, texts: list[str]) -> bytes:
        if self.open is None or self.blocks[self.open] != _TEXT_BLOCK:
            return b"".join(self.encode(ChoiceDelta(text=text)) for text in texts)
        self.accumulator.text_parts(0).extend(texts)  # what add() of each delta does to the answer
        return _json.strings_between(self._text_delta_prefix(self.open), texts, _TEXT_DELTA_END)

    def encode(self, event: Event) -> bytes:
        self.accumulator.add(event)
        if not isinstance(event, ChoiceDelta) or event.index != 0:
            return b""
        if event.text and self.open is not None and not (event.reasoning or event.refusal or event.tool_calls) \
                and self.blocks[self.open] == _TEXT_BLOCK:
            return self._text_delta(self.open, event.text)  # nearly every event: more text of the open block
        out = b""
        if event.reasoning:
            out += self._delta("thinking", -1, {"type": "thinking_delta", "thinking": event.reasoning})
        text = (event.text or "") + (event.refusal or "")
        if text:
            out += self._delta("text", -1, {"type": "text_delta", "text": text})
        for call in event.tool_calls:
            start = self._block("tool_use", call.index, call.id, call.name)
            out += start[1]
            if call.arguments:
                out += self._event("content_block_delta", {"index": start[0], "delta": {
                    "type": "input_json_delta", "partial_json": call.arguments}})
        return out

    def _text_delta(self, index: int, text: str) -> bytes:
        """``_delta("text", ...)`` of an open text block, from prebuilt bytes: one string encoding."""
        return self._text_delta_prefix(index) + _json.dumps(text) + _TEXT_DELTA_END

    def _text_delta_prefix(self, index: int) -> bytes:
        if self._text_prefix[0] != index:
            head = self._event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": ""}})
            self._text_prefix = (index, head[: head.rindex(b'""')])
        return self._text_prefix[1]

    def _delta(self, kind: str, call: int, delta: dict[str, Any]) -> bytes:
        index, out = self._block(kind, call, None, None)
        return out + self._event("content_block_delta", {"index": index, "delta": delta})

    def _block(self, kind: str, call: int, call_id: str | None, name: str | None) -> tuple[int, bytes]:
        """The index of the block for ``(kind, call)``: the open one, or a new one (closing the open one)."""
        key = (kind, call)
        if kind == "tool_use" and key in self.blocks:
            return self.blocks.index(key), b""  # a late fragment of an earlier call: same block
        if self.open is not None and self.blocks[self.open] == key:
            return self.open, b""
        out = self._stop()
        self.blocks.append(key)
        self.open = len(self.blocks) - 1
        if kind == "tool_use":
            block: dict[str, Any] = {"type": "tool_use", "id": self.builder.tool_id(call, call_id),
                                     "name": name or "", "input": {}}
        elif kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            block = {"type": "text", "text": ""}
        return self.open, out + self._event("content_block_start", {"index": self.open, "content_block": block})

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        index, self.open = self.open, None
        return self._event("content_block_stop", {"index": index})

    def finish(self) -> bytes:
        message = self.builder.message(self.accumulator.result())
        delta = {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                 "usage": message["usage"]}
        return self._stop() + self._event("message_delta", delta) + self._event("message_stop", {})

    def error(self, info: ErrorInfo) -> bytes:
        error = anthropic_error(info)
        return self._event("error", {"error": error["error"]})
