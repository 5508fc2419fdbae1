"""API keys reach the server as ``Authorization: Bearer`` and nowhere else a person could read them."""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

import pytest
from aiohttp import web

import netfly
from netfly import AuthenticationError, OpenAICompatible, UpstreamError
from netfly.redact import redact_headers, redact_url

from .conftest import answer, chunk, sse, stream_bytes

KEY = "sk-test-Zq9xKey1234567890abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]


def _shown(error: BaseException) -> list[str]:
    """Every text a user could see of an error: message, repr, traceback, attributes."""
    return [
        str(error),
        repr(error),
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        repr(vars(error)),
    ]


def _assert_hidden(texts: list[str], secret: str = KEY) -> None:
    for text in texts:
        assert secret not in text


async def _echo_401(request: web.Request) -> web.StreamResponse:
    """A 401 whose body repeats the key it was sent, as OpenAI's does ("Incorrect API key provided")."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    body = {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error",
                      "code": "invalid_api_key", "param": key}}
    return web.json_response(body, status=401)


async def _hello(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, answer("ok"))


def _with_key(base: type[netfly.Provider], how: str, monkeypatch: pytest.MonkeyPatch) -> tuple[
    type[netfly.Provider], dict[str, Any]
]:
    """A provider (and call kwargs) that gets KEY in one of the three documented ways."""
    if how == "kwarg":
        return base, {"api_key": KEY}
    if how == "class attribute":
        return base.configure(api_key=KEY), {}
    monkeypatch.setenv("NETFLY_TEST_KEY", KEY)
    return base.configure(api_key_env="NETFLY_TEST_KEY"), {}


HOW = ["kwarg", "class attribute", "env var"]


@pytest.mark.parametrize("how", HOW)
async def test_key_is_sent_as_bearer(scripted: Any, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    server = await scripted(_hello)
    provider, kwargs = _with_key(server.provider(OpenAICompatible), how, monkeypatch)
    assert await provider.create_async("", MESSAGES, **kwargs) == "ok"
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert "api_key" not in server.requests[0]  # an option, never a body field


async def test_kwarg_key_beats_class_and_env(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await scripted(_hello)
    monkeypatch.setenv("NETFLY_TEST_KEY", "env-key-value")
    provider = server.provider(OpenAICompatible, api_key_env="NETFLY_TEST_KEY")
    await provider.create_async("", MESSAGES)
    await provider.create_async("", MESSAGES, api_key=KEY)
    assert [h["Authorization"] for h in server.headers] == ["Bearer env-key-value", f"Bearer {KEY}"]


async def test_no_key_no_authorization_header(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETFLY_API_KEY", raising=False)
    server = await scripted(_hello)
    await server.provider(OpenAICompatible).create_async("", MESSAGES)
    assert "Authorization" not in server.headers[0]


@pytest.mark.parametrize("how", HOW)
async def test_401_echoing_the_key_never_shows_it(
    scripted: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="netfly")
    server = await scripted(_echo_401)
    provider, kwargs = _with_key(server.provider(OpenAICompatible), how, monkeypatch)
    with pytest.raises(AuthenticationError) as caught:
        await provider.create_async("", MESSAGES, **kwargs)
    error = caught.value
    assert error.status == 401
    assert "Incorrect API key provided" in str(error)  # the server's message is kept, minus the key
    assert error.body is not None and error.body["error"]["code"] == "invalid_api_key"
    _assert_hidden(_shown(error))
    _assert_hidden([json.dumps(error.body)])
    _assert_hidden([r.getMessage() for r in caplog.records])
    assert len(server.requests) == 1  # 401 is not retried


async def test_plain_text_401_echoing_the_key(scripted: Any) -> None:
    async def text_401(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, text=f"bad token {request.headers['Authorization']}")

    server = await scripted(text_401)
    with pytest.raises(AuthenticationError) as caught:
        await server.provider(OpenAICompatible).create_async("", MESSAGES, api_key=KEY)
    assert "bad token Bearer ***" in str(caught.value)
    _assert_hidden(_shown(caught.value))


async def test_in_stream_error_echoing_the_key(scripted: Any) -> None:
    async def in_stream(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": f"key {KEY} has no quota left", "code": "insufficient_quota"}}
        return await stream_bytes(request, sse(error, done=False))

    server = await scripted(in_stream)
    with pytest.raises(UpstreamError) as caught:
        await server.provider(OpenAICompatible).create_async("", MESSAGES, api_key=KEY)
    assert str(caught.value) == "key *** has no quota left"
    assert caught.value.message == "key *** has no quota left"
    _assert_hidden(_shown(caught.value))


async def test_error_after_partial_text_echoing_the_key(scripted: Any) -> None:
    async def partial_then_error(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": f"upstream rejected {KEY}"}}
        return await stream_bytes(request, sse(chunk("Hel"), error, done=False))

    server = await scripted(partial_then_error)
    received: list[str] = []
    with pytest.raises(netfly.NetflyError) as caught:
        async for text in server.provider(OpenAICompatible).create_async_generator("", MESSAGES, api_key=KEY):
            received.append(text)
    assert received == ["Hel"]
    assert "upstream rejected ***" in str(caught.value)
    _assert_hidden(_shown(caught.value))


async def test_malformed_chunk_echoing_the_key_is_scrubbed_in_warning_and_strict_error(
    scripted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def malformed(request: web.Request) -> web.StreamResponse:
        # Not JSON, with the key near the 200-character cut of the quoted data.
        return await stream_bytes(request, sse("x" * 190 + f"{{bad {KEY}", chunk("ok"), chunk(finish="stop")))

    caplog.set_level(logging.WARNING, logger="netfly")
    server = await scripted(malformed)
    provider = server.provider(OpenAICompatible)
    assert await provider.create_async("", MESSAGES, api_key=KEY) == "ok"
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "***" in warnings[0]
    _assert_hidden(warnings)
    assert KEY[:8] not in warnings[0]  # no prefix left behind by the cut either

    with pytest.raises(netfly.StreamDecodeError) as caught:
        await provider.create_async("", MESSAGES, api_key=KEY, strict=True)
    _assert_hidden(_shown(caught.value))


async def test_retries_log_without_the_key(scripted: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def echo_503(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"overloaded for {KEY}"}}, status=503)

    caplog.set_level(logging.DEBUG, logger="netfly")
    server = await scripted(echo_503, _hello)
    provider = server.provider(OpenAICompatible)
    stream = provider.stream("", MESSAGES, api_key=KEY)
    assert "".join([t async for t in stream]) == "ok"
    assert len(server.requests) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying" in m and "overloaded for ***" in m for m in messages), messages
    assert any("ChatRequest(" in m for m in messages)
    _assert_hidden(messages)
    assert stream.stats.attempts[0].error is not None
    _assert_hidden([stream.stats.attempts[0].error, repr(stream.stats)])


def test_chat_request_repr_hides_the_key_and_proxy_password() -> None:
    request = OpenAICompatible.build_request(
        "m", MESSAGES, proxy=f"http://user:{KEY}@127.0.0.1:3128", api_key=KEY,
        headers={"X-Api-Key": KEY, "Cookie": f"session={KEY}"},
    )
    assert request.headers["authorization"] == f"Bearer {KEY}"  # it is really there, to be sent
    for text in (repr(request), str(request), f"{request}", repr(request.proxy), str(request.proxy)):
        assert KEY not in text
    assert "user:***@127.0.0.1:3128" in repr(request)
    assert redact_headers(request.headers)["authorization"] == "***"
    assert redact_headers(request.headers)["X-Api-Key"] == "***"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"http://user:{KEY}@proxy.example:3128", "http://user:***@proxy.example:3128"),
        (f"socks5h://user:{KEY}@proxy.example", "socks5h://user:***@proxy.example"),
        (f"https://{KEY}@api.example/v1?x=1", "https://***@api.example/v1?x=1"),
        (f"https://user:{KEY}@[::1]:8443/p", "https://user:***@[::1]:8443/p"),
        ("http://proxy.example:3128", "http://proxy.example:3128"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert KEY not in redact_url(url)


def test_proxy_str_and_repr_hide_the_password() -> None:
    proxy = netfly.Proxy.parse(f"socks5://user:{KEY}@127.0.0.1:1080")
    assert proxy.password == KEY
    assert str(proxy) == "socks5://user:***@127.0.0.1:1080"
    assert repr(proxy) == "Proxy('socks5://user:***@127.0.0.1:1080')"
