"""Hostile client input to the gateway: bad header bytes, forged log text, fuzzed bodies. Never a 500."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfly import OpenAICompatible
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.logfmt import MAX_FIELD_CHARS, access_line, log_field
from netfly.gateway.server import Runner

from .conftest import answer

TOKEN = "gw-token-input-63aa"


async def _upstream(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(answer("ok"))
    await response.write_eof()
    return response


async def _start_pair() -> tuple[list[Runner | web.AppRunner], int]:
    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", _upstream)
    upstream = web.AppRunner(upstream_app, access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{upstream.addresses[0][1]}/v1"
    provider = OpenAICompatible.configure(url=url, retry_delay=0.01)
    gateway = await start(create_app(provider, auth_token=TOKEN, max_retries=1), "127.0.0.1", 0)
    return [gateway, upstream], bound_port(gateway)


def _exchange(port: int, raw: bytes) -> bytes:
    """Send raw request bytes (``Connection: close``) on a blocking socket; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while piece := sock.recv(65536):
            chunks.append(piece)
    return b"".join(chunks)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _post(body: bytes, *, auth: bytes = b"Bearer " + TOKEN.encode(), content_type: bytes = b"application/json",
          extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nContent-Type: " + content_type + b"\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


GOOD = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class _Errors(logging.Handler):
    """Collects ERROR records of the gateway, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Served:
    def __init__(self, port: int, errors: _Errors) -> None:
        self.port = port
        self.errors = errors


@pytest.fixture(scope="module")
def served() -> Iterator[_Served]:
    """The gateway and its upstream on a loop of their own, for blocking sockets and hypothesis."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners, port = asyncio.run_coroutine_threadsafe(_start_pair(), loop).result(30)
    errors = _Errors()
    logging.getLogger("netfly").addHandler(errors)
    try:
        yield _Served(port, errors)
    finally:
        logging.getLogger("netfly").removeHandler(errors)
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _no_error_logged(served: _Served) -> None:
    messages = [record.getMessage() for record in served.errors.records]
    served.errors.records.clear()
    assert messages == []


# -- Authorization bytes --------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [b"Bearer \xff\xfe\x80", b"\xc3\x28 " + TOKEN.encode(), b"Bearer " + TOKEN.encode()
                                  + b"\xe9", b"\xff"], ids=["bad-token", "bad-scheme", "token-plus-byte", "one-byte"])
def test_authorization_that_is_not_utf8_is_a_401(served: _Served, auth: bytes) -> None:
    raw = _exchange(served.port, _post(GOOD, auth=auth))
    assert _status(raw) == 401
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_api_key"
    _no_error_logged(served)


def test_the_right_token_is_still_accepted_on_a_raw_socket(served: _Served) -> None:
    raw = _exchange(served.port, _post(GOOD))
    assert _status(raw) == 200 and b'"content":"ok"' in raw


# -- the access log ---------------------------------------------------------------------------------


@pytest.fixture
async def gateway_port(aiohttp_server: Any) -> AsyncIterator[int]:
    upstream = web.Application(client_max_size=8 << 20)
    upstream.router.add_route("*", "/{tail:.*}", _upstream)
    server = await aiohttp_server(upstream)
    provider = OpenAICompatible.configure(url=str(server.make_url("/v1")))
    runner = await start(create_app(provider, auth_token=TOKEN), "127.0.0.1", 0)
    yield bound_port(runner)
    await runner.cleanup()


async def _chat_with_model(port: int, model: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=io.BytesIO(body),
                                headers=headers) as response:
            await response.read()
            return response.status


async def test_control_characters_in_a_model_name_are_escaped_in_the_log(
    gateway_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    assert await _chat_with_model(gateway_port, "evil\x1b[31mRED\x1b[0m\nFAKE 200 line\u202e\\x") == 200
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions")]
    assert len(lines) == 1
    assert "model=evil\\x1b[31mRED\\x1b[0m\\x0aFAKE 200 line\\u202e\\\\x" in lines[0]
    assert "\x1b" not in lines[0] and "\n" not in lines[0] and "\u202e" not in lines[0]


async def test_a_one_mebibyte_model_name_makes_a_bounded_log_line(
    gateway_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "netfly.gateway")
    model = "m" * (1 << 20)
    assert await _chat_with_model(gateway_port, model) == 200
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions"))
    assert len(line) < 1000
    cut = len("model=") + (1 << 20) - MAX_FIELD_CHARS
    assert f"model={'m' * (MAX_FIELD_CHARS - len('model='))}...[{cut} more chars]; provider=" in line


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text", "plain text"),
    ("\x00\x07\x1b\x7f", "\\x00\\x07\\x1b\\x7f"),
    ("tab\tand\r\nnewline", "tab\\x09and\\x0d\\x0anewline"),
    ("C1 \x85 \x9b", "C1 \\x85 \\x9b"),
    ("back\\slash", "back\\\\slash"),
    ("bidi \u202e \u2066 \u200f and \u2028", "bidi \\u202e \\u2066 \\u200f and \\u2028"),
    ("ünïcödé ✓ 中文", "ünïcödé ✓ 中文"),
])
def test_log_field_escapes(text: str, shown: str) -> None:
    assert log_field(text) == shown


def test_log_field_escapes_every_ascii_character_that_needs_it_and_only_those() -> None:
    for code in range(128):
        char = chr(code)
        shown = "\\\\" if char == "\\" else char if " " <= char <= "~" else f"\\x{code:02x}"
        assert log_field(f"a{char}b") == f"a{shown}b", repr(char)


def test_log_field_cuts_and_says_how_much() -> None:
    assert log_field("abcdef", 6) == "abcdef"
    assert log_field("abcdefg", 6) == "abcdef...[1 more chars]"
    assert log_field("\x1b" * 10, 2) == "\\x1b\\x1b...[8 more chars]"  # cut before escaping: bounded


def test_access_line_shape() -> None:
    line = access_line("GET", "/v1/models", 200, 0.01234, [])
    assert line == "GET /v1/models 200 12.3ms"
    line = access_line("POST", "/p", 400, 0.0, ["model=a\nb", "x"])
    assert line == "POST /p 400 0.0ms (model=a\\x0ab; x)"


# -- fuzzing the request parser ---------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Known request fields, gateway settings a client must not set, and names that are Python keywords
# or parameters somewhere on the way to the upstream. ``cls`` is tested on its own below.
_FIELDS = st.sampled_from([
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "stop",
    "tools", "tool_choice", "response_format", "seed", "user", "logprobs", "top_logprobs", "logit_bias",
    "metadata", "store", "reasoning_effort", "functions", "modalities", "timeout", "headers", "proxy",
    "api_key", "max_retries", "strict", "max_line_bytes", "self", "kwargs", "class", "def", "None", "",
]) | st.text(max_size=8).filter(lambda name: name != "cls")
_MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | _JSON,
    "content": st.text(max_size=10) | _JSON,
    "tool_calls": _JSON, "name": _JSON,
})
_CHAT = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["m", "OpenAICompatible/m", "nope/m", "", "/"]) | _JSON,
    "messages": st.lists(_MESSAGE, max_size=3) | _JSON,
}).flatmap(lambda base: st.dictionaries(_FIELDS, _JSON, max_size=4).map(lambda extra: {**extra, **base}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_CHAT | _JSON)
def test_fuzzed_json_bodies_never_get_a_500(served: _Served, body: Any) -> None:
    raw = _exchange(served.port, _post(json.dumps(body).encode()))
    assert _status(raw) < 500, raw[:500]
    _no_error_logged(served)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=64))
def test_fuzzed_body_bytes_never_get_a_500(served: _Served, body: bytes) -> None:
    raw = _exchange(served.port, _post(body))
    assert _status(raw) < 500, raw[:500]
    _no_error_logged(served)


_HEADER_BYTES = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=100, deadline=None)
@given(auth=_HEADER_BYTES, content_type=_HEADER_BYTES, other=_HEADER_BYTES)
def test_fuzzed_header_bytes_never_get_a_500(served: _Served, auth: bytes, content_type: bytes, other: bytes) -> None:
    for credentials in (auth, b"Bearer " + TOKEN.encode() + auth):
        raw = _exchange(served.port, _post(GOOD, auth=credentials, content_type=content_type,
                                           extra=b"X-Anything: " + other + b"\r\n"))
        assert _status(raw) < 500, raw[:500]
    _no_error_logged(served)


def test_a_body_field_named_cls_is_not_a_500(served: _Served) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "cls": 1}).encode()
    try:
        assert _status(_exchange(served.port, _post(body))) < 500
    finally:
        served.errors.records.clear()



def _exchange_half_closed(port: int, raw: bytes) -> bytes:
    """Send raw bytes, say there are no more (so no request can wait for its end), read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while piece := sock.recv(65536):
                chunks.append(piece)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


_TOKENS = st.sampled_from([b"GET", b"POST", b"HEAD", b"/v1/chat/completions", b"/health", b"HTTP/1.1", b"HTTP/1.0",
                           b" ", b"\r\n", b"\n", b":", b"Content-Length: ", b"Transfer-Encoding: chunked",
                           b"Expect: 100-continue", b"0", b"5", b"ffffffff", b"%00", b"\x00", b"\xff", b"?a=b"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.lists(_TOKENS | st.binary(max_size=6), max_size=24).map(b"".join))
def test_fuzzed_request_heads_never_get_a_500_or_an_error_log(served: _Served, head: bytes) -> None:
    raw = _exchange_half_closed(served.port, head + b"\r\n\r\n")
    assert not raw or (raw.startswith(b"HTTP/1.1 ") and (_status(raw) < 500 or _status(raw) == 505)), raw[:300]
    _no_error_logged(served)
