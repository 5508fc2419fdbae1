"""Nothing an upstream sends back leaves netfly with the call's secrets in it (issue 12, items 4 and
9): every field of an error (message, code, type, param, body, also ``\\/``-escaped), what the
gateway relays, a password in the provider's URL, and texts cut for quoting (scrub, then cut)."""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import netfly
from netfly import AuthenticationError, OpenAICompatible, StreamDecodeError, UpstreamError
from netfly.chunks import ChunkInterpreter
from netfly.cli._providers import resolve_provider
from netfly.redact import drop_secret_prefix, scrub
from netfly.sse import ServerSentEvent

from .conftest import TOKEN, chunk, sse, stream_bytes
from .test_cli import run_cli

KEY = "sk-leak-Zq9x/Key+1234567890abcdef"  # a "/" so that JSON may escape it as "\/"
PASSWORD = "url-pass-w0rd-91ab"
MESSAGES = [{"role": "user", "content": "hi"}]


def _shown(error: BaseException) -> str:
    """Every text a user could see of an error: message, repr, traceback, attributes."""
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return "\n".join([str(error), repr(error), trace, repr(vars(error))])


def _key_everywhere(request: web.Request) -> dict[str, Any]:
    return {"error": {"message": f"no quota for {KEY}", "code": KEY, "type": f"type-{KEY}", "param": [KEY]}}


async def _in_stream_error(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, sse(chunk(role="assistant"), _key_everywhere(request), done=False))


async def test_every_field_of_an_in_stream_error_is_scrubbed(scripted: Any) -> None:
    server = await scripted(_in_stream_error)
    with pytest.raises(UpstreamError, match=r"^no quota for \*\*\*$") as caught:
        await server.provider(OpenAICompatible).create_async("", MESSAGES, api_key=KEY)
    error = caught.value
    assert (error.code, error.type, error.param) == ("***", "type-***", ["***"])
    assert KEY not in _shown(error)


async def test_a_slash_escaped_key_in_an_error_body_is_scrubbed(scripted: Any) -> None:
    async def escaped_401(request: web.Request) -> web.StreamResponse:
        text = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "param": KEY}})
        return web.Response(status=401, text=text.replace("/", "\\/"), content_type="application/json")

    server = await scripted(escaped_401)
    with pytest.raises(AuthenticationError, match=r"Incorrect API key provided: \*\*\*$") as caught:
        await server.provider(OpenAICompatible).create_async("", MESSAGES, api_key=KEY)
    assert caught.value.body == {"error": {"message": "Incorrect API key provided: ***", "param": "***"}}
    assert KEY not in _shown(caught.value) and KEY.replace("/", "\\/") not in _shown(caught.value)


async def test_credential_headers_echoed_back_are_scrubbed(scripted: Any) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"bad {request.headers['x-api-key']}",
                                             "code": request.headers["x-vendor-secret"]}}, status=400)

    server = await scripted(echo)
    provider = server.provider(OpenAICompatible, secret_headers=("X-Vendor-Secret",),
                               headers={"x-api-key": KEY, "x-vendor-secret": "vendor-" + KEY})
    with pytest.raises(netfly.BadRequestError, match=r"HTTP 400: bad \*\*\*$") as caught:
        await provider.create_async("", MESSAGES)
    assert caught.value.body == {"error": {"message": "bad ***", "code": "***"}}
    assert KEY not in _shown(caught.value)


async def test_a_url_password_never_shows(scripted: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def echo_basic(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user_pass = aiohttp.BasicAuth.decode(auth)
        return web.json_response({"error": {"message": f"{auth} means {user_pass.password}"}}, status=503)

    caplog.set_level(logging.DEBUG, logger="netfly")
    server = await scripted(echo_basic)
    url = server.url.replace("http://", f"http://user:{PASSWORD}@")
    provider = OpenAICompatible.configure(url=url, retry_delay=0.01, max_retries=2)
    request = provider.build_request("m", MESSAGES)
    assert "user:***@" in repr(request) and PASSWORD not in repr(request)
    with pytest.raises(netfly.ServerError, match=r"HTTP 503: Basic \*\*\* means \*\*\*$") as caught:
        await provider.create_async("m", MESSAGES)
    assert server.headers[0]["Authorization"].startswith("Basic ")  # the password was really sent
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ChatRequest(" in logged and "retrying" in logged
    assert PASSWORD not in logged and PASSWORD not in _shown(caught.value)
    assert server.headers[0]["Authorization"].removeprefix("Basic ") not in logged


@pytest.mark.parametrize("how", ["api_key", "headers"])
async def test_a_url_password_and_an_authorization_header_are_refused_before_any_io(scripted: Any, how: str) -> None:
    # Both would be the Authorization header; the HTTP client raised a bare ValueError mid-call.
    server = await scripted(lambda request: stream_bytes(request, sse(chunk("ok"))))
    provider = OpenAICompatible.configure(url=server.url.replace("http://", f"http://user:{PASSWORD}@"))
    extra = {"api_key": KEY} if how == "api_key" else {"headers": {"Authorization": f"Bearer {KEY}"}}
    with pytest.raises(netfly.ConfigurationError, match=r"the credentials in its url \(user:\*\*\*@\) and an "
                                                      r"Authorization header .* cannot both be sent") as caught:
        await provider.create_async("m", MESSAGES, **extra)
    assert caught.value.param == "url" and server.requests == []
    assert PASSWORD not in _shown(caught.value) and KEY not in _shown(caught.value)


async def test_the_cli_says_a_url_password_and_an_api_key_clash_without_a_traceback(scripted: Any) -> None:
    server = await scripted(lambda request: stream_bytes(request, sse(chunk("ok"))))
    url = server.url.replace("http://", f"http://user:{PASSWORD}@")
    for command in (["chat", "hi"], ["models"]):
        code, out, err = await run_cli(*command, "--url", url, "--api-key", KEY)
        assert (code, out) == (2, "")
        assert err.startswith("netfly: error: ConfigurationError: ") and "cannot both be sent" in err
        assert "Traceback" not in err and PASSWORD not in err and KEY not in err
    assert server.requests == []


async def test_a_gateway_refuses_at_start_a_url_password_with_an_api_key(tmp_path: Any) -> None:
    # The operator's mistake: said once, at start-up (serve exits 2; config check names it), never a
    # 400 to every client.
    url = f"http://user:{PASSWORD}@127.0.0.1:9/v1"
    code, out, served = await run_cli("serve", "--url", url, "--port", "0", env={"NETFLY_API_KEY": KEY})
    assert (code, out) == (2, "") and "cannot both be sent" in served
    config = tmp_path / "netfly.toml"
    config.write_text(f'[providers.up]\nurl = "{url}"\napi_key = "${{UP_KEY}}"\n')
    code, out, checked = await run_cli("config", "check", str(config), env={"UP_KEY": KEY})
    assert (code, out) == (2, "") and "up: the credentials in its url (user:***@)" in checked
    for err in (served, checked):
        assert "Traceback" not in err and PASSWORD not in err and KEY not in err
    code, out, err = await run_cli("config", "check", str(config), env={"UP_KEY": ""})
    assert code == 0, err  # no key in the environment: nothing clashes


def test_a_url_password_is_not_in_the_cli_provider_name_or_errors() -> None:
    provider = resolve_provider(None, f"http://user:{PASSWORD}@127.0.0.1:1/v1", url_label=f"http://user:{PASSWORD}@h")
    assert provider.name() == "http://user:***@h"
    bad = OpenAICompatible.configure(url=f"ftp://user:{PASSWORD}@host")
    with pytest.raises(netfly.ConfigurationError, match=r"got 'ftp://user:\*\*\*@host'") as caught:
        bad.endpoint_url()
    assert PASSWORD not in _shown(caught.value)


@pytest.mark.parametrize("stream", [True, False])
async def test_the_gateway_relays_no_upstream_key(
    scripted: Any, gateway: Any, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await scripted(_in_stream_error)
    gw = await gateway(server.provider(OpenAICompatible, api_key=KEY, max_retries=1))
    body = {"model": "m", "messages": MESSAGES, "stream": stream}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/chat/completions", json=body, headers=headers) as response:
            text = await response.text()
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert "no quota for ***" in text and '"type-***"' in text
    assert KEY not in text and KEY.replace("/", "\\/") not in text
    assert KEY not in "\n".join(r.getMessage() for r in caplog.records)
    if stream:
        assert response.status == 200 and "[DONE]" not in text
    else:
        error = json.loads(text)["error"]
        assert (response.status, error["code"], error["param"]) == (502, "***", None)


# -- scrub, then cut (item 9) ----------------------------------------------------------------------

SHORT_KEY = "sk-SECRETKEY-0123456789"


def _across_200(prefix_len: int) -> str:
    """Text where the key starts ``prefix_len`` characters before character 200 of ``str(value)``."""
    return "x" * (200 - prefix_len - len("{'choices': '"))


@pytest.mark.parametrize("strict", [False, True])
def test_a_key_across_the_cut_of_a_quoted_chunk_leaves_no_prefix(
    strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    interpreter = ChunkInterpreter(strict=strict, secrets=(SHORT_KEY,))
    data = json.dumps({"choices": _across_200(8) + SHORT_KEY})  # "choices" is not a list
    if strict:
        with pytest.raises(StreamDecodeError, match=r"choices is not a list") as caught:
            interpreter.interpret(ServerSentEvent(data=data))
        shown = str(caught.value)
    else:
        with caplog.at_level(logging.WARNING, logger="netfly"):
            assert interpreter.interpret(ServerSentEvent(data=data)) is None
        shown = caplog.records[-1].getMessage()
        assert "skipping malformed stream chunk: choices is not a list" in shown
    assert "'choices': 'xxx" in shown and SHORT_KEY[:6] not in shown and "***" in shown


@pytest.mark.parametrize("body", [{"choices": "x" * 180 + SHORT_KEY}, {"choices": ["x" * 180 + SHORT_KEY]}])
def test_a_key_across_the_cut_of_a_json_reply_leaves_no_prefix(body: dict[str, Any]) -> None:
    interpreter = ChunkInterpreter(secrets=(SHORT_KEY,))
    with pytest.raises(StreamDecodeError, match=r"JSON reply is not a chat.completion: .*\*\*\*") as caught:
        interpreter.interpret_completion(body)
    assert SHORT_KEY[:6] not in str(caught.value)


async def test_a_key_across_the_cut_of_an_html_page_leaves_no_prefix(scripted: Any) -> None:
    async def html(request: web.Request) -> web.StreamResponse:
        page = "<p>" + "x" * 190 + SHORT_KEY + "</p>"
        return web.Response(text=page, content_type="text/html")

    server = await scripted(html)
    with pytest.raises(UpstreamError, match=r"got an HTML page: .*\*\*\*") as caught:
        await server.provider(OpenAICompatible).create_async("", MESSAGES, api_key=SHORT_KEY)
    assert SHORT_KEY[:6] not in _shown(caught.value)


def test_a_reader_cut_through_a_key_leaves_no_prefix() -> None:
    assert drop_secret_prefix("abc sk-SEC", [SHORT_KEY]) == "abc "
    assert drop_secret_prefix("abc sk-SEC", ["zzzz", SHORT_KEY, "EC-long"]) == "abc "
    assert drop_secret_prefix("whole ***", [SHORT_KEY]) == "whole ***"
    assert drop_secret_prefix("ends with s", ["sk"]) == "ends with s"  # too short to be a secret


def test_scrub_masks_the_longer_of_two_overlapping_secrets_whole() -> None:
    assert scrub("token sk-abcd-efgh", ["sk-abcd", "sk-abcd-efgh"]) == "token ***"
