"""Redirects (issue 12, item 3): netfly never follows one, so no credential reaches another host and
no POST silently becomes a GET. Two real loopback servers: different ports are different origins."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp import web

import netfly
from netfly import OpenAICompatible, RedirectError

from .conftest import answer, stream_bytes

KEY = "sk-redirect-Qw8ExampleKey0042"
TEAM_TOKEN = "team-token-7c1e5f90"
MESSAGES = [{"role": "user", "content": "hi"}]


async def _hello(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, answer("answer of the other host"))


def _redirect(status: int, location: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler


def _provider(server: Any) -> type[netfly.Provider]:
    return server.provider(
        OpenAICompatible, api_key=KEY, secret_headers=("x-team-token",),
        headers={"x-api-key": KEY, "api-key": KEY, "x-team-token": TEAM_TOKEN},
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_not_followed(scripted: Any, status: int) -> None:
    other = await scripted(_hello)
    first = await scripted(_redirect(status, other.url + "/v1/chat/completions"))
    with pytest.raises(RedirectError, match=rf"HTTP {status}: redirected to '{other.url}/v1/chat/completions'; "
                       "netfly does not follow redirects") as caught:
        await _provider(first).create_async("", MESSAGES)
    assert caught.value.status == status
    assert caught.value.location == other.url + "/v1/chat/completions"
    assert other.headers == []  # the other host got nothing: no key, no GET in place of the POST
    assert len(first.requests) == 1  # a redirect is not retried


async def test_a_same_origin_redirect_is_not_followed_either(scripted: Any) -> None:
    server = await scripted(_redirect(307, "/v2/chat/completions"), _hello)
    with pytest.raises(RedirectError, match="redirected to '/v2/chat/completions'"):
        await _provider(server).create_async("", MESSAGES)
    assert len(server.requests) == 1


async def test_the_location_is_shown_without_passwords_or_keys(scripted: Any) -> None:
    other = await scripted(_hello)
    host = other.url.removeprefix("http://")
    first = await scripted(_redirect(302, f"http://user:hunter2pw@{host}/v1?key={KEY}&t={TEAM_TOKEN}"))
    with pytest.raises(RedirectError) as caught:
        await _provider(first).create_async("", MESSAGES)
    assert caught.value.location == f"http://user:***@{host}/v1?key=***&t=***"
    for text in (str(caught.value), repr(caught.value), repr(vars(caught.value))):
        assert "hunter2pw" not in text and KEY not in text and TEAM_TOKEN not in text
    assert other.headers == []


async def test_list_models_does_not_follow_a_redirect(scripted: Any) -> None:
    other = await scripted(_hello)
    first = await scripted(_redirect(307, other.url + "/v1/models"))
    with pytest.raises(RedirectError, match="redirected to"):
        await _provider(first).list_models(api_key=KEY)
    assert other.headers == []


async def test_the_gateway_reports_a_redirected_upstream_as_502(scripted: Any, gateway: Any) -> None:
    other = await scripted(_hello)
    first = await scripted(_redirect(302, other.url + "/elsewhere"))
    gw = await gateway(_provider(first))
    async with gw.client() as client:
        with pytest.raises(openai.APIStatusError, match="redirected to") as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert other.headers == []
