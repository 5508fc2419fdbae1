"""Hostile requests at every route of the gateway, and an upstream that answers garbage.

The gateway (keys, an admin key, a metrics token, from a configuration file) and its upstream are
real servers on 127.0.0.1; requests go out as raw bytes on blocking sockets, so a test sees exactly
what a client would: never a 500, a dropped connection or a hang; every error a JSON body of its
API's shape; no traceback, no upstream key and no client key in any answer or log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfly import OpenAICompatible
from netfly.errors import ConfigurationError
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.operations import Operations
from netfly.gateway.server import Runner

from .conftest import TOKEN, Gateway, ScriptedServer, chunk, sse

UPSTREAM_KEY = "sk-upstream-fuzz-7f3a9c41d2e5"
CLIENT_KEY = "nf-client-fuzz-55d1c0"
ADMIN_KEY = "nf-admin-fuzz-9e0a7b"
METRICS_TOKEN = "metrics-fuzz-1b2c3d"
LIMITED_KEY = "nf-limited-fuzz-4a8e21"  # 1,000 tokens a minute
SECRETS = (UPSTREAM_KEY, CLIENT_KEY, ADMIN_KEY, METRICS_TOKEN, LIMITED_KEY)
HELLO = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
UpstreamHandler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


# -- the upstream: one behaviour per model name -----------------------------------------------------


def _events(*objects: Any, content_type: str = "text/event-stream", status: int = 200) -> UpstreamHandler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        payload = sse(*objects, done=False) if content_type == "text/event-stream" else objects[0]
        # "; raw": objects[0] is the bytes of an event stream
        return web.Response(body=payload, status=status, headers={"Content-Type": content_type.removesuffix("; raw")})
    return handler


def _echo_key(status: int, content_type: str = "application/json") -> UpstreamHandler:
    """An upstream error that repeats the key it was sent, in every field it has."""
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        key = request.headers.get("Authorization", "")
        error = {"message": f"key {key} refused", "type": key, "param": key, "code": key}
        text = json.dumps({"error": error}) if content_type == "application/json" else f"bad key: {key}"
        return web.Response(text=text, status=status, headers={"Content-Type": content_type})
    return handler


async def _truncated(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """A head promising more bytes than come before the connection closes."""
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "4096"})
    await response.prepare(request)
    await response.write(b'{"id": "x", "choi')
    assert request.transport is not None
    request.transport.close()
    return response


async def _gzip_garbage(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(body=b"\x1f\x8b not gzip at all", headers={"Content-Type": "text/event-stream",
                                                                  "Content-Encoding": "gzip"})


async def _key_redirect(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(status=307, headers={"Location": f"http://127.0.0.1:9/v1?key={UPSTREAM_KEY}"})


SCRIPT: dict[str, bytes] = {"body": b"", "type": b"text/event-stream"}  # what "scripted" answers, set by a test


async def _scripted(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(body=SCRIPT["body"], headers={"Content-Type": SCRIPT["type"].decode()})


_GOOD = (chunk(role="assistant"), chunk("ok"), chunk(finish="stop"), chunk(choices=False, usage=USAGE), "[DONE]")
_KEY_IN_STREAM = {"error": {"message": f"upstream says {UPSTREAM_KEY}", "type": "server_error"}}
CHAT_BEHAVIOURS: dict[str, UpstreamHandler] = {
    "ok": _events(*_GOOD),
    "bad-json": _events(chunk(role="assistant"), "{not json", '{"choices": 5}', '{"choices": [{"delta": []}]}',
                        "[1, 2]", '"text"', '{"choices": [{"delta": {"content": NaN}}]}', "[DONE]"),
    "html": _events(b"<html><body>oops</body></html>", content_type="text/html"),
    "json-garbage": _events(b'{"choices": "x", "usage": "y"}', content_type="application/json"),
    "json-not-object": _events(b"[1, 2, 3]", content_type="application/json"),
    "truncated-stream": _events(chunk(role="assistant"), '{"id": "x", "choices": [{"del'),
    "truncated-body": _truncated,
    "huge-line": _events("x" * (1 << 20 | 7)),
    "bad-usage": _events(chunk("ok"), chunk(finish="stop"), chunk(choices=False, usage={
        "prompt_tokens": "3", "completion_tokens": -2, "total_tokens": 1e300,
        "prompt_tokens_details": [1], "completion_tokens_details": "x"}), "[DONE]"),
    "usage-not-object": _events(chunk("ok"), {"choices": [], "usage": [1, 2]}, "[DONE]"),
    "bad-tool-calls": _events({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": "a", "function": {"name": 5, "arguments": {}}}, {"index": 2**63, "id": 7}, "call"]}}]},
        chunk(finish="tool_calls"), "[DONE]"),
    "key-in-stream": _events(chunk("ok"), _KEY_IN_STREAM, "[DONE]"),
    "odd-errors": _events(chunk("ok"), {"error": "plain"}, {"error": 5}, {"error": {"message": {"a": [1]}}}),
    "odd-deltas": _events(*({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in (
        {"content": 5}, {"content": ["a"]}, {"reasoning_content": {"a": 1}}, {"role": ["x"]}, {"refusal": 7},
        {"tool_calls": {"a": 1}}, {"function_call": "x"})), '{"choices": [{"delta": {"content": "\\ud800"}}]}',
        {"choices": [{"index": "0", "delta": {}, "finish_reason": {"a": 1}, "logprobs": "x"}]}, "[DONE]"),
    "odd-message": _events(json.dumps({"choices": [{"index": 0, "message": {"role": 5, "content": ["x"], "tool_calls": [
        {"id": 1, "function": {"name": None, "arguments": {"a": 1}}}, "x"]}, "finish_reason": 3}],
        "usage": {"prompt_tokens": True}}).encode(), content_type="application/json"),
    "bad-utf8": _events(b'data: {"choices": [{"index": 0, "delta": {"content": "\xff\xfe"}}]}\n\n',
                        content_type="text/event-stream; raw"),
    "bad-gzip": _gzip_garbage,
    "scripted": _scripted,
    "odd-finish": _events(chunk("ok"), {**chunk(), "choices": [{"index": 0, "delta": {}, "finish_reason": {"a": 1}}]},
                          "[DONE]"),
    "list-finish": _events(chunk("ok"), {**chunk(), "choices": [{"index": 0, "delta": {}, "finish_reason": ["x"]}]},
                           "[DONE]"),
    "odd-logprobs": _events({**chunk(), "choices": [{"index": 0, "delta": {"content": "ok"}, "logprobs": {
        "content": [{"token": 5, "logprob": "x", "top_logprobs": "y"}, "z"]}}]}, chunk(finish="stop"), "[DONE]"),
    "odd-reasoning": _events(chunk(role="assistant"), {**chunk(), "choices": [{"index": 0, "delta": {
        "reasoning_content": ["a"], "reasoning": {"x": 1}, "refusal": ["r"], "audio": 5}}]}, chunk(finish="stop"),
        "[DONE]"),
    "named-error-event": _events(b"event: error\ndata: upstream exploded\n\n", content_type="text/event-stream; raw"),
    "odd-fields": _events(b"\xef\xbb\xbfretry: abc\nid: \x00\ndata:\n\n: ping\n\nevent: \xff\ndata: [DONE]\n\n",
                          content_type="text/event-stream; raw"),
    "cr-only": _events(sse(*_GOOD[:-1]).replace(b"\n", b"\r"), content_type="text/event-stream; raw"),
    "ndjson": _events(b"\n".join(json.dumps(c).encode() for c in _GOOD[:-1]), content_type="application/x-ndjson"),
    "redirect-nowhere": _events(b"", status=302, content_type="text/plain"),
    "key-escaped": _events(('{"error": {"message": "k=' + "".join(f"\\u{ord(c):04x}" for c in UPSTREAM_KEY)
                            + '", "type": "x"}}').encode(), status=400, content_type="application/json"),
    "key-redirect": _key_redirect,
    "key-in-bad-chunk": _events(chunk("ok"), f"{{not json {UPSTREAM_KEY}", "[DONE]"),
    "key-400": _echo_key(400),
    "key-401": _echo_key(401),
    "key-429": _echo_key(429),
    "key-500-text": _echo_key(500, "text/plain"),
}
EMBEDDING_BEHAVIOURS: dict[str, dict[str, Any] | list[Any] | str] = {
    "emb-ok": {"data": [{"embedding": [0.5, 0.25]}]},
    "emb-ragged": {"data": [{"embedding": [[0.5, 0.25], [0.5]]}]},
    "emb-strings": {"data": [{"embedding": [["a", "b"], ["c", "d"]]}]},
    "emb-mixed": {"data": [{"embedding": [[0.5], 5]}, {"embedding": "x"}, 7]},
    "emb-words": {"data": [{"embedding": ["a", None]}]},
    "emb-no-data": {"object": "list"},
    "emb-not-object": [1, 2],
    "emb-text": "not json at all",
}


async def _embeddings(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    reply = EMBEDDING_BEHAVIOURS.get(str(body.get("model")), EMBEDDING_BEHAVIOURS["emb-ok"])
    if isinstance(reply, str):
        return web.Response(text=reply, content_type="text/plain")
    return web.json_response(reply)


UPSTREAM_FAULTS: list[BaseException] = []  # the upstream's own bugs: they would make every test moot


async def _upstream(request: web.Request) -> web.StreamResponse:
    try:
        return await _answer_upstream(request)
    except Exception as exc:
        UPSTREAM_FAULTS.append(exc)
        raise


async def _answer_upstream(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    if request.method == "GET":  # the model list
        return web.Response(text='{"data": [{"id": 5}, "x"', content_type="application/json")
    try:
        body = json.loads(raw)
    except ValueError:
        return web.json_response({"error": {"message": "not json"}}, status=400)
    if request.path.endswith("/embeddings"):
        return await _embeddings(request, body)
    return await CHAT_BEHAVIOURS.get(str(body.get("model")), CHAT_BEHAVIOURS["ok"])(request, body)


# -- the gateway, served on a loop of its own (blocking sockets and hypothesis in the test thread) ---


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _config(upstream_url: str) -> str:
    models = [*CHAT_BEHAVIOURS, *EMBEDDING_BEHAVIOURS]
    lines = [f'[providers.up]\nurl = "{upstream_url}"\napi_key = "${{FUZZ_UPSTREAM_KEY}}"\nretries = 1\n',
             '[server]\nmetrics_token_env = "FUZZ_METRICS_TOKEN"\n',
             f'[keys.client]\nsha256 = "{_digest(CLIENT_KEY)}"\n',
             f'[keys.ops]\nsha256 = "{_digest(ADMIN_KEY)}"\nadmin = true\n',
             f'[keys.limited]\nsha256 = "{_digest(LIMITED_KEY)}"\ntpm = 1000\n']
    # cooldown 0: no breaker opens, so every request reaches the upstream's garbage
    lines += [f'[models."{name}"]\ntargets = [{{ provider = "up", model = "{name}" }}]\ncooldown = 0\n'
              for name in models]
    return "\n".join(lines)


async def _start_pair(path: Path) -> tuple[list[Runner | web.AppRunner], int]:
    upstream_app = web.Application(client_max_size=8 << 20)
    upstream_app.router.add_route("*", "/{tail:.*}", _upstream)
    upstream = web.AppRunner(upstream_app, access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", 0).start()
    path.write_text(_config(f"http://127.0.0.1:{upstream.addresses[0][1]}/v1"))
    # The JSON request log: one more place a key or a secret could show up.
    gateway = await start(create_app(operations=Operations.from_file(path, log_format="json")), "127.0.0.1", 0)
    return [gateway, upstream], bound_port(gateway)


class _Records(logging.Handler):
    """Every record of netfly's loggers, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        taken, self.records = self.records, []
        return taken


class _Served:
    def __init__(self, port: int, records: _Records) -> None:
        self.port = port
        self.records = records


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Served]:
    saved = {name: os.environ.get(name) for name in ("FUZZ_UPSTREAM_KEY", "FUZZ_METRICS_TOKEN")}
    os.environ.update(FUZZ_UPSTREAM_KEY=UPSTREAM_KEY, FUZZ_METRICS_TOKEN=METRICS_TOKEN)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = tmp_path_factory.mktemp("fuzz") / "netfly.toml"
    runners, port = asyncio.run_coroutine_threadsafe(_start_pair(path), loop).result(30)
    records = _Records()
    logger = logging.getLogger("netfly")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        yield _Served(port, records)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


# -- talking to it, and what every answer must be ---------------------------------------------------


def _exchange(port: int, raw: bytes, *, half_close: bool = False) -> bytes:
    """Send raw request bytes (``Connection: close``) and read the whole answer: the gateway must close.
    ``half_close``: then say no more bytes come (a body shorter than announced is not waited for)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while piece := sock.recv(65536):
            chunks.append(piece)
    return b"".join(chunks)


def _request(method: bytes, target: bytes, body: bytes = b"", *, key: str | None = CLIENT_KEY,
             headers: bytes = b"Content-Type: application/json\r\n", length: bool = True) -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
    if key is not None:
        head += b"Authorization: Bearer " + key.encode() + b"\r\n"
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


class Answer:
    """A raw HTTP/1.1 answer, its body de-chunked."""

    def __init__(self, raw: bytes) -> None:
        assert raw.startswith(b"HTTP/1.1 "), f"no answer, or not HTTP: {raw[:200]!r}"
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.raw = raw
        self.status = int(lines[0].split(" ")[1])
        self.headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        chunked = self.headers.get("transfer-encoding") == "chunked"
        self.body = _dechunk(body) if chunked else body

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2:]
    return b"".join(out)


def _check(served: _Served, raw: bytes, path: str, method: bytes = b"POST") -> Answer:
    """Everything the standard promises about one answer; the answer, for more checks."""
    answer = Answer(raw)
    assert answer.status != 500, raw[:600]
    assert b"Traceback" not in raw, raw[:600]
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{secret} leaked: {raw[:600]!r}"
    if answer.status >= 400 and method != b"HEAD":
        _check_error_shape(answer, path)
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        _check_events(answer.body)
    _check_logs(served)
    return answer


def _check_error_shape(answer: Answer, path: str) -> None:
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.raw[:600]
    body = answer.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["type"], str), body
    else:
        assert set(body) == {"error"} and isinstance(body["error"]["type"], str), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def _check_events(body: bytes) -> None:
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            json.loads(line[5:])  # every event a JSON document, errors included


def _check_logs(served: _Served) -> None:
    records = served.records.take()
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert errors == []
    assert UPSTREAM_FAULTS == []
    for record in records:
        text = record.getMessage() + (str(record.exc_info) if record.exc_info else "")
        assert not any(secret in text for secret in SECRETS), text


def _post(served: _Served, path: str, body: Any, **options: Any) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _check(served, _exchange(served.port, _request(b"POST", path.encode(), data, **options)), path)


# -- the upstream's garbage, through each API ---------------------------------------------------------


def _bodies(model: str, stream: bool) -> dict[str, dict[str, Any]]:
    return {
        "/v1/chat/completions": {"model": model, "messages": HELLO, "stream": stream},
        "/v1/responses": {"model": model, "input": "hi", "stream": stream},
        "/v1/messages": {"model": model, "max_tokens": 5, "messages": HELLO, "stream": stream},
    }


# The status each answer gets, whole and streamed: 200 where the garbage is skipped (a malformed chunk
# is, by design) or comes after the stream started (then an in-band error event), else 502.
EXPECTED = {"ok": (200, 200), "bad-json": (200, 200), "truncated-stream": (200, 200), "bad-usage": (200, 200),
            "usage-not-object": (200, 200), "bad-tool-calls": (200, 200), "key-in-stream": (502, 200),
            "odd-errors": (502, 200), "odd-deltas": (200, 200), "bad-utf8": (200, 200),
            "key-in-bad-chunk": (200, 200), "odd-fields": (200, 200), "cr-only": (200, 200), "ndjson": (200, 200),
            "odd-finish": (200, 200), "list-finish": (200, 200), "odd-logprobs": (200, 200),
            "odd-reasoning": (200, 200)}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", sorted(set(CHAT_BEHAVIOURS) - {"scripted"}))
def test_an_upstream_answering_garbage_gets_the_client_a_clean_answer(served: _Served, model: str,
                                                                       stream: bool) -> None:
    for path, body in _bodies(model, stream).items():
        answer = _post(served, path, body)
        assert answer.status == EXPECTED.get(model, (502, 502))[stream], (path, answer.raw[:600])


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("model", sorted(EMBEDDING_BEHAVIOURS))
def test_an_upstream_answering_garbage_embeddings_is_a_502_not_a_500(served: _Served, model: str,
                                                                     encoding: str) -> None:
    answer = _post(served, "/v1/embeddings", {"model": model, "input": "hi", "encoding_format": encoding})
    assert answer.status in (200, 502), answer.raw[:600]


def test_the_model_list_names_the_groups(served: _Served) -> None:
    answer = _check(served, _exchange(served.port, _request(b"GET", b"/v1/models")), "/v1/models")
    assert answer.status == 200 and {m["id"] for m in answer.json()["data"]} == set(CHAT_BEHAVIOURS) | set(
        EMBEDDING_BEHAVIOURS)


@pytest.mark.parametrize("listing", [b'{"data": [{"id": 5}, "x"', b'{"data": {"id": "m"}}', b"[1]",
                                     b'{"data": [{"id": 5}, "x", {"id": null}, {"id": "m"}]}'])
async def test_the_model_list_survives_an_upstream_that_lists_garbage(
        scripted: Callable[..., Awaitable[ScriptedServer]], gateway: Callable[..., Awaitable[Gateway]],
        listing: bytes) -> None:
    async def models(request: web.Request) -> web.StreamResponse:
        return web.Response(body=listing, content_type="application/json")

    upstream = await scripted(models)
    served = await gateway(upstream.provider(OpenAICompatible))  # no models declared: the upstream is asked
    async with aiohttp.ClientSession() as session, session.get(
            served.base_url + "/models", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        bare = [model["id"] for model in (await response.json())["data"] if "/" not in model["id"]]
    assert bare == (["5", "m"] if listing.endswith(b"]}") else ["default"])  # else: the default model stands in


# -- hostile client requests ----------------------------------------------------------------------

_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
         | st.text(max_size=6) | st.sampled_from(["", "\x00", "\ud800", "user", "text", "function", "auto", "ok"]))
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "text", "role", "content", "name", "id", "input", "source", "image_url", "function",
                     "arguments", "parameters", "url", "data", "output", "call_id", "format", "effort"])
    | st.text(max_size=4), inner, max_size=3), max_leaves=10)
_PART = st.fixed_dictionaries({"type": st.sampled_from([
    "text", "image", "image_url", "input_text", "output_text", "input_image", "refusal", "tool_use", "tool_result",
    "thinking", "input_audio", "file", "video", "", "TEXT"]) | _JSON}, optional={
    "text": _JSON, "source": _JSON, "image_url": _JSON, "input": _JSON, "content": _JSON, "detail": _JSON,
    "refusal": _JSON, "name": _JSON, "id": _JSON, "tool_use_id": _JSON})
_MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]) | _JSON,
    "content": st.text(max_size=6) | st.lists(_PART, max_size=3) | _JSON,
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "other"]) | _JSON,
    "tool_calls": _JSON, "name": _JSON, "call_id": _JSON, "output": _JSON, "arguments": _JSON})
_TOOL = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["function", "web_search", ""]) | _JSON, "name": _JSON, "function": _JSON,
    "input_schema": _JSON, "parameters": _JSON, "description": _JSON})
_GARBAGE = (_JSON | st.lists(_PART | _TOOL | _MESSAGE, max_size=2) | _PART | _TOOL
            | st.sampled_from(["1", "0.5", "true", "null", "NaN", -1, 2**64 - 1, 1e308, "ok", "up/ok", "emb-ok"]))
_COMMON = ["model", "stream", "temperature", "top_p", "tools", "tool_choice", "metadata", "timeout", "headers",
           "proxy", "stream_options"]
# Per route: a valid body, and the fields that get any value at all (the rest of the body stays valid,
# so the fields read after the first check are reached too).
ROUTES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/v1/chat/completions": ({"model": "ok", "messages": HELLO}, [
        *_COMMON, "messages", "max_tokens", "max_completion_tokens", "n", "stop", "response_format", "logit_bias",
        "seed", "logprobs", "top_logprobs", "functions", "user", "reasoning_effort"]),
    "/v1/responses": ({"model": "ok", "input": "hi"}, [
        *_COMMON, "input", "instructions", "max_output_tokens", "text", "reasoning", "parallel_tool_calls",
        "previous_response_id", "user", "seed"]),
    "/v1/messages": ({"model": "ok", "max_tokens": 5, "messages": HELLO}, [
        *_COMMON, "messages", "max_tokens", "system", "stop_sequences", "top_k"]),
    "/v1/messages/count_tokens": ({"model": "ok", "messages": HELLO}, [*_COMMON, "messages", "system"]),
    "/v1/embeddings": ({"model": "emb-ok", "input": "hi"}, [
        "model", "input", "encoding_format", "dimensions", "user", "timeout", "headers"]),
}


def _bodies_for(path: str) -> st.SearchStrategy[dict[str, Any]]:
    base, names = ROUTES[path]
    garbage = st.dictionaries(st.sampled_from(names), _GARBAGE, min_size=1, max_size=3)
    return garbage.map(lambda fields: {**base, **fields})


_RAW_BODIES = st.sampled_from([
    b"", b"null", b"[]", b'"x"', b"1e999", b'{"model": NaN}', b'{"messages": [Infinity]}', b"{" * 2000,
    b"[" * 300 + b"]" * 300, b'{"model": "ok", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "ok\x00", "messages": []}', b"\xff\xfe{}", b'{"a": 1, "a": 2}', b"\x00" * 8,
    b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 123456789012345678901234}',
]) | st.binary(max_size=40)


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


@pytest.mark.parametrize("path", sorted(ROUTES))
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_at_any_field_gets_a_typed_error_never_a_500(served: _Served, path: str,
                                                               data: st.DataObject) -> None:
    body = data.draw(_bodies_for(path) | _JSON, label="body")
    answer = _post(served, path, body)
    assert answer.status in (200, 400, 501), answer.raw[:600]


HOSTILE: list[Any] = [
    None, True, 0, 5, -1, 2**64 - 1, 1.5, 1e308, "", "x", "5", "NaN", "\x00", [], [5], ["x"], [None], [{}], [[{}]],
    [{"text": 5}], [{"type": "text", "text": 5}], [{"type": "tool_result", "content": [{"type": "text", "text": 5}]}],
    [{"type": 5}], [{"type": "function"}], {}, {"type": 5}, {"text": 5}, {"type": "function", "name": 5},
    {"a": {"b": [None]}},
]


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_each_hostile_value_at_each_field_gets_a_typed_error_never_a_500(served: _Served, path: str) -> None:
    base, names = ROUTES[path]
    for name in names:
        for value in HOSTILE:
            answer = _post(served, path, {**base, name: value})
            assert answer.status in (200, 400, 501), (name, value, answer.raw[:600])


@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(sorted(ROUTES)), body=_RAW_BODIES)
def test_bodies_that_are_not_json_objects_are_a_400(served: _Served, path: str, body: bytes) -> None:
    answer = _post(served, path, body)
    assert answer.status in (400, 501), answer.raw[:600]


def _nested(body: dict[str, Any], levels: int) -> bytes:
    """``body`` as JSON, its string "DEEP" replaced by arrays nested ``levels`` deep (the encoder of the
    standard library would give up first)."""
    return json.dumps(body).encode().replace(b'"DEEP"', b"[" * levels + b'"x"' + b"]" * levels)


_DEEP_PLACES = [
    {"metadata": "DEEP"}, {"tools": "DEEP"}, {"text": {"x": "DEEP"}}, {"reasoning": {"x": "DEEP"}}, {"system": "DEEP"},
    {"response_format": "DEEP"}, {"user": "DEEP"}, {"input": "DEEP"}, {"messages": "DEEP"},
    {"messages": [{"role": "user", "content": "DEEP"}]}, {"messages": [{"role": "user", "content": "hi", "x": "DEEP"}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "input": "DEEP"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "DEEP"}]}]},
    {"input": [{"type": "function_call_output", "output": "DEEP"}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "DEEP"}]}]},
]


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("levels", [200, 260, 1000])  # parsed up to 1024; encoded again only up to 254
def test_deeply_nested_fields_are_a_400_or_an_answer(served: _Served, path: str, levels: int) -> None:
    for place in _DEEP_PLACES:
        answer = _post(served, path, _nested({**ROUTES[path][0], **place}, levels))
        assert answer.status in (200, 400, 501), (place, answer.raw[:600])


# -- what the fuzzing found, one example each --------------------------------------------------------


def _error(answer: Answer) -> dict[str, Any]:
    error: dict[str, Any] = answer.json()["error"]
    return error


@pytest.mark.parametrize(("body", "message"), [
    ({"system": [{"type": "text", "text": 1}]}, "system[0].text must be a string, got number"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": {}}]}]}]},
     "messages[0].content[0].content[0].text must be a string, got object"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[0].content[0].text must be a string, got null"),
    ({"tools": 5}, "field 'tools' must be an array, got number"),
    ({"stream": "false"}, "field 'stream' must be a boolean, got string"),
    ({"temperature": "hot"}, "field 'temperature' must be a number, got string"),
], ids=["system-text", "tool-result-text", "block-text", "tools", "stream", "temperature"])
def test_messages_fields_of_the_wrong_type_are_a_400_naming_them(served: _Served, body: dict[str, Any],
                                                                 message: str) -> None:
    answer = _post(served, "/v1/messages", {"model": "ok", "max_tokens": 5, "messages": HELLO, **body})
    assert answer.status == 400
    assert answer.json()["error"] == {"type": "invalid_request_error", "message": message}


@pytest.mark.parametrize(("body", "message"), [
    ({"stream": "yes"}, "field 'stream' must be a boolean, got string"),
    ({"text": 5}, "field 'text' must be an object, got number"),
    ({"reasoning": "high"}, "field 'reasoning' must be an object, got string"),
    ({"text": {"format": {"type": "text"}, "x": _deep(150)}}, "field 'text' cannot be encoded again: "),
    ({"tools": [{"type": "function", "name": "f", "x": _deep(150)}]}, "field 'tools' cannot be encoded again: "),
], ids=["stream", "text", "reasoning", "deep-text", "deep-tool"])
def test_responses_fields_of_the_wrong_type_or_too_deep_to_echo_are_a_400(served: _Served, body: dict[str, Any],
                                                                         message: str) -> None:
    answer = _post(served, "/v1/responses", {"model": "ok", "input": "hi", **body})
    assert answer.status == 400 and _error(answer)["message"].startswith(message), answer.raw[:600]


def test_embeddings_too_deep_to_send_on_are_a_400_naming_the_field(served: _Served) -> None:
    answer = _post(served, "/v1/embeddings", {"model": "emb-ok", "input": "hi", "user": _deep(150)})
    assert answer.status == 400 and _error(answer)["param"] == "user"
    assert _error(answer)["message"].startswith("field 'user' cannot be encoded again: ")


@pytest.mark.parametrize("stream", [False, True])
def test_garbled_upstream_usage_is_reported_as_zero_tokens_not_a_500(served: _Served, stream: bool) -> None:
    answer = _post(served, "/v1/responses", {"model": "bad-usage", "input": "hi", "stream": stream})
    assert answer.status == 200
    if stream:
        assert b'"input_tokens":0,"input_tokens_details":{"cached_tokens":0},"output_tokens":0' in answer.body
    else:
        assert answer.json()["usage"]["input_tokens"] == 0 and answer.json()["usage"]["total_tokens"] == 0
    answer = _post(served, "/v1/messages", {"model": "bad-usage", "max_tokens": 5, "messages": HELLO})
    assert answer.json()["usage"] == {"input_tokens": 0, "output_tokens": 0}


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_of_a_model_group_come_from_its_first_target(served: _Served, encoding: str) -> None:
    answer = _post(served, "/v1/embeddings", {"model": "emb-ok", "input": "hi", "encoding_format": encoding})
    assert answer.status == 200 and answer.json()["model"] == "emb-ok"
    expected = [0.5, 0.25] if encoding == "float" else "AAAAPwAAgD4="
    assert answer.json()["data"][0]["embedding"] == expected


@pytest.mark.parametrize("model", ["emb-ragged", "emb-strings", "emb-mixed", "emb-words"])
def test_embeddings_that_are_not_numbers_are_a_502_saying_so(served: _Served, model: str) -> None:
    answer = _post(served, "/v1/embeddings", {"model": model, "input": "hi"})
    assert answer.status == 502
    assert _error(answer) == {"message": "up answered an embedding that is not a list of numbers (nor of equally long "
                                         "lists of numbers)", "type": "upstream_error", "param": None, "code": None}


# -- odd methods, targets, keys, content types and lengths ---------------------------------------------

_PATHS = [*ROUTES, "/v1/models", "/v1/models/ok", "/v1/models/nope", "/v1/models/%00%ff", "/v1/models/a/b/../c",
          "/health", "/metrics", "/admin/usage", "/admin/reload", "/", "/status", "/static/chat.js",
          "/static/../netfly.toml", "/static/%2e%2e/x", "/v1/netfly/status", "/v1/chat/completions/", "//v1/models",
          "/v1//models", "/nope", "/V1/MODELS", "*"]
_QUERIES = ["", "?", "?a=b", "?stream=true&model=x", "?%zz", "?a=%00%ff", "?\xe2\x9c\x93".encode("latin-1").decode(),
            "#frag"]
_METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"get", b"FOO", b"TRACE"]
# Credentials: right, wrong, and wrong by a little.
_AUTH = [b"Authorization: Bearer " + CLIENT_KEY.encode(), b"Authorization: Bearer " + ADMIN_KEY.encode(),
         b"x-api-key: " + CLIENT_KEY.encode(), b"", b"Authorization: Bearer " + CLIENT_KEY.encode() + b"x",
         b"Authorization: Bearer " + CLIENT_KEY[:-1].encode(), b"Authorization: Bearer " + CLIENT_KEY.upper().encode(),
         b"Authorization: Basic " + CLIENT_KEY.encode(), b"Authorization: Bearer  \t" + CLIENT_KEY.encode(),
         b"Authorization: Bearer Bearer " + CLIENT_KEY.encode(), b"Authorization: " + CLIENT_KEY.encode(),
         b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\xff", b"Authorization: Bearer " + METRICS_TOKEN.encode(),
         b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nAuthorization: Bearer wrong"]
_CONTENT_TYPES = [b"application/json", b"", b"text/plain", b"application/json; charset=latin-1",
                  b"multipart/form-data; boundary=x", b"application/json\r\nContent-Type: text/html", b"\xff\xfe",
                  b"application/x-www-form-urlencoded"]


def _framed(body: bytes, framing: str) -> bytes:
    """The body's length headers and the body, framed one of the ways a client may get wrong."""
    chunked = {"chunked": b"%x" % len(body), "bad-chunk": b"zz", "huge-chunk": b"ffffffffffffffff"}
    if framing in chunked:
        return b"Transfer-Encoding: chunked\r\n\r\n%s\r\n%s\r\n0\r\n\r\n" % (chunked[framing], body)
    if framing == "both":  # the pair a request smuggler sends
        return b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    lengths = {"exact": [len(body)], "missing": [], "twice": [len(body), len(body)],
               "conflicting": [len(body), len(body) + 1], "huge": [10**13], "negative": [-1],
               "past-length": [max(len(body) - 3, 0)], "cut-short": [len(body) + 10]}[framing]
    return b"".join(b"Content-Length: %d\r\n" % n for n in lengths) + b"\r\n" + body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(_METHODS), path=st.sampled_from(_PATHS), query=st.sampled_from(_QUERIES),
       auth=st.sampled_from(_AUTH), content_type=st.sampled_from(_CONTENT_TYPES),
       framing=st.sampled_from(["exact", "missing", "twice", "conflicting", "huge", "negative", "past-length",
                                "cut-short", "chunked", "bad-chunk", "huge-chunk", "both"]),
       odd=st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
def test_odd_requests_to_any_route_never_get_a_500_a_leak_or_a_hang(
        served: _Served, method: bytes, path: str, query: str, auth: bytes, content_type: bytes, framing: str,
        odd: bytes) -> None:
    base = ROUTES.get(path, ({"model": "ok", "messages": HELLO}, []))[0]
    head = (method + b" " + (path + query).encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\nX-Request-Id: " + odd + b"\r\nContent-Type: " + content_type + b"\r\n")
    if auth:
        head += auth + b"\r\n"
    short = framing in ("cut-short", "huge-chunk")  # a body shorter than announced
    raw = _exchange(served.port, head + _framed(json.dumps(base).encode(), framing), half_close=short)
    # A request line the parser refuses (an unknown method, a byte no URL has) names no API: OpenAI's shape.
    line_read = method in (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE") and query.isascii()
    if raw or not short:  # a body cut short may get no answer: the connection closes
        _check(served, raw, path if line_read else "", method)
    else:
        _check_logs(served)


@pytest.mark.parametrize(("path", "place", "message"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "DEEP"}]},
     "messages[0]['content'][0] must be a content part mapping with a 'type'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "x": "DEEP"}]},
     "ok: no provider can take this request: up: request field 'messages' is not JSON-serialisable: "
     "Recursion limit reached"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "tool_use", "input": "DEEP"}]}]},
     "field 'messages[0].content[0].input' cannot be encoded again: Recursion limit reached"),
    ("/v1/responses", {"input": [{"type": "function_call_output", "output": "DEEP"}]},
     "field 'input[0].output' cannot be encoded again: Recursion limit reached"),
], ids=["chat-content", "chat-message-field", "messages-tool-input", "responses-call-output"])
def test_a_thousand_levels_deep_is_a_400_naming_the_field(served: _Served, path: str, place: dict[str, Any],
                                                          message: str) -> None:
    # Deeper than repr goes (a key's token estimate reads the content) and than the standard library encodes
    answer = _post(served, path, _nested({**ROUTES[path][0], **place}, 1000))
    assert answer.status == 400 and answer.json()["error"]["message"] == message


def test_the_library_names_a_field_nested_too_deep_to_send() -> None:
    deep: Any = "x"
    for _ in range(1000):
        deep = [deep]
    provider = OpenAICompatible.configure(url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigurationError, match=r"^request field 'x' is not JSON-serialisable: Recursion") as info:
        provider.stream("m", HELLO, extra_body={"x": deep})
    assert info.value.param == "x"


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "max_tokens"),
                                             ("/v1/chat/completions", "max_completion_tokens"),
                                             ("/v1/responses", "max_output_tokens"), ("/v1/messages", "max_tokens")])
def test_a_negative_token_cap_does_not_lock_the_key_out(served: _Served, path: str, field: str) -> None:
    # Charged as a negative number of tokens, its correction at the end left the key 10**18 tokens in debt.
    _post(served, path, {**ROUTES[path][0], field: -10**18}, key=LIMITED_KEY)
    answer = _post(served, path, ROUTES[path][0], key=LIMITED_KEY)
    assert answer.status == 200, answer.raw[:600]
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) > 900


# -- an upstream answering generated garbage ----------------------------------------------------------

_DELTA = st.fixed_dictionaries({}, optional={
    "role": st.just("assistant") | _JSON, "content": st.text(max_size=5) | _JSON, "reasoning_content": _JSON,
    "refusal": _JSON, "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
        "index": st.integers(-1, 3) | _JSON, "id": _JSON, "type": _JSON,
        "function": st.fixed_dictionaries({}, optional={"name": _JSON, "arguments": st.text(max_size=5) | _JSON})}),
        max_size=2) | _JSON})
_CHOICE = st.fixed_dictionaries({"index": st.just(0) | _JSON, "delta": _DELTA | _JSON}, optional={
    "finish_reason": st.sampled_from(["stop", "length", "tool_calls", "content_filter", None]) | _JSON,
    "logprobs": _JSON, "message": _DELTA})
_CHUNK = st.fixed_dictionaries({"choices": st.lists(_CHOICE, max_size=2) | _JSON}, optional={
    "id": _JSON, "model": _JSON, "object": _JSON, "error": _JSON,
    "usage": st.fixed_dictionaries({}, optional={n: _JSON for n in (
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details")}) | _JSON})
_EVENT = _CHUNK.map(lambda c: json.dumps(c).encode()) | st.sampled_from([b"[DONE]", b"{", b"", b"null", b"[]"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_EVENT, max_size=5), as_json=st.booleans())
def test_generated_upstream_answers_reach_every_api_cleanly(served: _Served, events: list[bytes],
                                                            as_json: bool) -> None:
    if as_json:  # one whole chat.completion-like object instead of a stream
        SCRIPT.update(body=events[0] if events else b"{}", type=b"application/json")
    else:
        SCRIPT.update(body=b"".join(b"data: " + event + b"\n\n" for event in events), type=b"text/event-stream")
    for stream in (False, True):
        for path, body in _bodies("scripted", stream).items():
            assert _post(served, path, body).status in (200, 502)


@pytest.mark.parametrize(("path", "anthropic"), [("/v1/messages", True), ("/v1/messages/count_tokens", True),
                                                 ("/v1/chat/completions", False)])
def test_a_head_refused_before_any_handler_has_the_error_shape_of_its_api(served: _Served, path: str,
                                                                         anthropic: bool) -> None:
    raw = _exchange(served.port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Content-Length: 3\r\n\r\n{}")
    error = {"message": "malformed HTTP request: Duplicate Content-Length", "type": "invalid_request_error"}
    shape = {"type": "error", "error": error} if anthropic else {"error": {
        **error, "param": None, "code": "malformed_request"}}
    assert _check(served, raw, path).json() == shape
