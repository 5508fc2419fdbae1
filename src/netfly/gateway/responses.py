"""The Responses API adapter (``POST /v1/responses``), stateless, over the chat engine. Pure: no I/O.

A request becomes chat ``messages`` and body fields; the chat events come back as the documented
Responses event sequence (``response.created`` … ``response.completed``), or as one ``response``
object. Output items, in the order they begin: reasoning (as a summary), the message (text or
refusal), one ``function_call`` per tool call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from itertools import repeat
from typing import Any

from .. import _ids, _json
from ..events import ChatAccumulator, ChatResult, ChoiceDelta, Event
from .errors import ErrorInfo, GatewayError
from .schema import NUMBER, ChatCall, Kind, check_encodable, encoded, expect_type, json_type, load_object
from .usage import reported_tokens

_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "seed")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


# -- request ------------------------------------------------------------------------------------


def parse_responses_request(raw: bytes) -> ChatCall:
    body = load_object(raw)
    if body.get("previous_response_id") is not None:
        raise GatewayError(400, "previous_response_id is not supported: this gateway stores no responses; "
                                "send the whole conversation in 'input'", param="previous_response_id")
    if body.get("input") is None:
        raise GatewayError(400, "field 'input' is required", param="input")
    for name, kind in _FIELD_KINDS:
        expect_type(body, name, kind)
    check_encodable(body, _ECHOED)
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    messages += _input_messages(body["input"])
    params: dict[str, Any] = {k: body[k] for k in _PASSED if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        params["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(_list(body, "tools"))]
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"])
    params.update(_text_format(body.get("text")))
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort"):
        params["reasoning_effort"] = reasoning["effort"]
    return ChatCall(body.get("model") or None, messages, bool(body.get("stream")), params, body)


_FIELD_KINDS: tuple[tuple[str, Kind], ...] = (
    ("model", str), ("instructions", str), ("max_output_tokens", int), ("stream", bool), ("temperature", NUMBER),
    ("top_p", NUMBER), ("parallel_tool_calls", bool), ("text", dict), ("reasoning", dict), ("metadata", dict),
)
_ECHOED = ("reasoning", "text", "tool_choice", "tools", "metadata")  # in the response object as they came


def _list(body: Mapping[str, Any], name: str) -> list[Any]:
    value = body[name]
    if not isinstance(value, list):
        raise GatewayError(400, f"field {name!r} must be an array, got {json_type(value)}", param=name)
    return value


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise GatewayError(400, f"field 'input' must be a string or an array, got {json_type(value)}", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise GatewayError(400, f"input[{i}] must be an object, got {json_type(item)}", param=f"input[{i}]")
        _add_item(messages, item, f"input[{i}]")
    return messages


def _add_item(messages: list[dict[str, Any]], item: Mapping[str, Any], where: str) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise GatewayError(400, f"{where}.role must be user, assistant, system or developer, got {role!r}",
                               param=f"{where}.role")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)  # parallel calls: one assistant turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else encoded(output, f"{where}.output").decode()})
    elif kind != "reasoning":  # earlier reasoning is not sent back to a chat model
        raise GatewayError(400, f"{where}.type {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning)", param=f"{where}.type")


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise GatewayError(400, f"{where} must be a string or an array, got {json_type(content)}", param=where)
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal", "")})
        elif kind == "input_image" and part.get("image_url"):
            detail = {"detail": part["detail"]} if part.get("detail") else {}
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"], **detail}})
        else:
            raise GatewayError(400, f"{where}: content part type {kind!r} is not supported "
                                    "(input_text, output_text, input_image with image_url)", param=where)
    return parts


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or tool.get("type") != "function" or not tool.get("name"):
        kind = tool.get("type") if isinstance(tool, Mapping) else json_type(tool)
        raise GatewayError(400, f"tools[{i}]: only function tools with a name are supported, got {kind!r}",
                           param=f"tools[{i}]")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text_format(text: Any) -> dict[str, Any]:
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if not isinstance(fmt, Mapping) or fmt.get("type") in (None, "text"):
        return {}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {"response_format": {"type": fmt.get("type")}}


# -- response objects ---------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{_ids.unique_hex()}"


def response_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage in the Responses shape."""
    if not usage:
        return None
    prompt = reported_tokens(usage, "prompt_tokens")
    completion = reported_tokens(usage, "completion_tokens")
    cached = reported_tokens(usage, "prompt_tokens_details", "cached_tokens")
    reasoning = reported_tokens(usage, "completion_tokens_details", "reasoning_tokens")
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": reported_tokens(usage, "total_tokens") or prompt + completion}


class ResponseBuilder:
    """The ``response`` object of one answer and its output items, with ids stable across events."""

    def __init__(self, model: str, request: Mapping[str, Any]) -> None:
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.request = request
        self.message_id = _new_id("msg")
        self.reasoning_id = _new_id("rs")
        self.call_ids: dict[int, str] = {}

    def call_id(self, index: int) -> str:
        if index not in self.call_ids:
            self.call_ids[index] = _new_id("fc")
        return self.call_ids[index]

    def response(self, result: ChatResult | None, status: str, *, error: Mapping[str, Any] | None = None,
                 ) -> dict[str, Any]:
        request = self.request
        incomplete = _INCOMPLETE.get(result.finish_reason or "") if result is not None else None
        if status == "completed" and incomplete:
            status = "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "model": self.model, "output": self.output(result) if result is not None else [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": request.get("reasoning") or {"effort": None, "summary": None}, "store": False,
            "temperature": request.get("temperature"), "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
            "top_p": request.get("top_p"), "truncation": "disabled",
            "usage": response_usage(result.usage) if result is not None else None,
            "metadata": request.get("metadata") or {},
        }

    def output(self, result: ChatResult) -> list[dict[str, Any]]:
        items = []
        if result.reasoning:
            items.append(self.reasoning_item(result.reasoning))
        if result.text or result.refusal:
            items.append(self.message_item(result.text, result.refusal))
        items.extend(self.call_item(i, call.id, call.name, call.arguments)
                     for i, call in enumerate(result.tool_calls))
        return items

    def reasoning_item(self, text: str | None) -> dict[str, Any]:
        summary = [{"type": "summary_text", "text": text}] if text is not None else []
        return {"id": self.reasoning_id, "type": "reasoning", "summary": summary}

    def message_item(self, text: str | None, refusal: str | None, status: str = "completed") -> dict[str, Any]:
        content = []
        if text:
            content.append(text_part(text))
        if refusal:
            content.append({"type": "refusal", "refusal": refusal})
        if text is None and refusal is None:
            content = []
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": content}

    def call_item(self, index: int, call_id: str | None, name: str, arguments: str,
                  status: str = "completed") -> dict[str, Any]:
        return {"id": self.call_id(index), "type": "function_call", "status": status,
                "call_id": call_id or self.call_id(index).replace("fc_", "call_", 1),
                "name": name, "arguments": arguments}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# -- the event stream ---------------------------------------------------------------------------


_TEXT_HEAD = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
_TEXT_TAIL = b',"logprobs":[]}\n\n'


class ResponsesEncoder:
    """Chat events → Responses server-sent events (``event: type`` + ``data: {...}``)."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self.accumulator = ChatAccumulator()
        self.sequence = 0
        self.items: list[tuple[str, int]] = []  # (kind, tool-call index) in output order
        self.open: set[int] = set()  # output indexes not yet done
        self.part_open = {"reasoning": False, "text": False, "refusal": False}
        # Set by a text delta, cleared by any other event: the bytes around the sequence number and the
        # text of the next text delta while nothing else happens (so nothing opens or closes).
        self._text_template: tuple[bytes, bytes] | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = _json.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def start(self) -> bytes:
        response = self.builder.response(None, "in_progress")
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response)

    def encode_texts(self, texts: list[str]) -> bytes:
        template = self._text_template
        if template is None:
            return b"".join(self.encode(ChoiceDelta(text=text)) for text in texts)
        self.accumulator.text_parts(0).extend(texts)  # what add() of each delta does to the answer
        first, self.sequence = self.sequence, self.sequence + len(texts)
        numbers = map(str.encode, map(str, range(first, self.sequence)))
        # Each event is the template around its sequence number and text: joined in C loops.
        parts = zip(repeat(template[0]), numbers, repeat(template[1]), map(_json.dumps, texts), repeat(_TEXT_TAIL))
        return b"".join(map(b"".join, parts))

    def encode(self, event: Event) -> bytes:
        self.accumulator.add(event)
        if not isinstance(event, ChoiceDelta) or event.index != 0:
            return b""  # usage and meta go into the final object; the Responses API has one choice
        template, self._text_template = self._text_template, None
        if template is not None and event.text and not (event.reasoning or event.refusal or event.tool_calls):
            self._text_template = template  # nearly every event: more text of the open text part
            self.sequence += 1
            return template[0] + str(self.sequence - 1).encode() + template[1] + _json.dumps(event.text) + \
                _TEXT_TAIL
        out = b""
        if event.reasoning:
            out += self._reasoning(event.reasoning)
        if event.text:
            out += self._message_delta("text", event.text)
        if event.refusal:
            out += self._message_delta("refusal", event.refusal)
        for call in event.tool_calls:
            out += self._call_delta(call.index, call.arguments)
        if event.refusal or event.tool_calls:
            self._text_template = None  # the text delta was not the last thing that happened
        return out

    def _output_index(self, kind: str, call: int = -1) -> tuple[int, bytes]:
        """The index of the output item of ``kind`` (opening it, and closing a finished one, first)."""
        key = (kind, call)
        for index in self.open:  # the open item of that kind (not the first one ever: it may be closed)
            if self.items[index] == key:
                return index, b""
        out = b""
        if kind != "function_call":
            for index in sorted(self.open):  # reasoning and message are one run each: close the other
                if self.items[index][0] != "function_call":
                    out += self._close(index)
        self.items.append(key)
        index = len(self.items) - 1
        self.open.add(index)
        return index, out + self._event("response.output_item.added", output_index=index,
                                        item=self._item(index, "in_progress"))

    def _reasoning(self, text: str) -> bytes:
        index, out = self._output_index("reasoning")
        item_id = self.builder.reasoning_id
        if not self.part_open["reasoning"]:
            self.part_open["reasoning"] = True
            out += self._event("response.reasoning_summary_part.added", item_id=item_id, output_index=index,
                               summary_index=0, part={"type": "summary_text", "text": ""})
        return out + self._event("response.reasoning_summary_text.delta", item_id=item_id, output_index=index,
                                 summary_index=0, delta=text)

    def _message_delta(self, kind: str, text: str) -> bytes:
        index, out = self._output_index("message")
        content_index = 1 if kind == "refusal" and self.part_open["text"] else 0
        ids = {"item_id": self.builder.message_id, "output_index": index, "content_index": content_index}
        if not self.part_open[kind]:
            self.part_open[kind] = True
            part = text_part("") if kind == "text" else {"type": "refusal", "refusal": ""}
            out += self._event("response.content_part.added", **ids, part=part)
        if kind == "text":
            out += self._event("response.output_text.delta", **ids, delta=text, logprobs=[])
            self._text_template = (_TEXT_HEAD, b',"item_id":' + _json.dumps(ids["item_id"]) +
                                   f',"output_index":{index},"content_index":{content_index},"delta":'.encode())
            return out
        return out + self._event("response.refusal.delta", **ids, delta=text)

    def _call_delta(self, call: int, arguments: str | None) -> bytes:
        index, out = self._output_index("function_call", call)
        if arguments:
            out += self._event("response.function_call_arguments.delta", item_id=self.builder.call_id(call),
                               output_index=index, delta=arguments)
        return out

    def _item(self, index: int, status: str) -> dict[str, Any]:
        kind, call = self.items[index]
        result = self.accumulator.result()
        if kind == "reasoning":
            return self.builder.reasoning_item(result.reasoning if status == "completed" else None)
        if kind == "message":
            if status != "completed":
                return self.builder.message_item(None, None, status)
            return self.builder.message_item(result.text, result.refusal)
        parts = result.tool_calls[call] if call < len(result.tool_calls) else None
        arguments = parts.arguments if parts is not None and status == "completed" else ""
        return self.builder.call_item(call, parts.id if parts else None, parts.name if parts else "", arguments,
                                      status)

    def _close(self, index: int) -> bytes:
        self.open.discard(index)
        item = self._item(index, "completed")
        kind = item["type"]
        out = b""
        if kind == "reasoning":
            text = item["summary"][0]["text"] if item["summary"] else ""
            ids = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            out += self._event("response.reasoning_summary_text.done", **ids, text=text)
            out += self._event("response.reasoning_summary_part.done", **ids, part={"type": "summary_text",
                                                                                      "text": text})
        elif kind == "message":
            out += self._close_parts(index, item)
        else:
            out += self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               name=item["name"], arguments=item["arguments"])
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _close_parts(self, index: int, item: dict[str, Any]) -> bytes:
        out = b""
        for content_index, part in enumerate(item["content"]):
            ids = {"item_id": item["id"], "output_index": index, "content_index": content_index}
            if part["type"] == "output_text":
                out += self._event("response.output_text.done", **ids, text=part["text"], logprobs=[])
            else:
                out += self._event("response.refusal.done", **ids, refusal=part["refusal"])
            out += self._event("response.content_part.done", **ids, part=part)
        return out

    def finish(self) -> bytes:
        out = b"".join(self._close(index) for index in sorted(self.open))
        result = self.accumulator.result()
        response = self.builder.response(result, "completed")
        response["output"] = [self._item(index, "completed") for index in range(len(self.items))]
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def error(self, info: ErrorInfo) -> bytes:
        error = {"code": info.code or info.type, "message": info.message}
        response = self.builder.response(self.accumulator.result(), "failed", error=error)
        response["output"] = [self._item(index, "completed") for index in range(len(self.items))]
        return self._event("response.failed", response=response)

