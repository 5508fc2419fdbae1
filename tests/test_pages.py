"""The pages for people (``/``, ``/status``) and the status JSON, served by the real gateway; the
``browser`` tests drive them in Debian's headless Chromium through Playwright."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netfly import OpenAICompatible, RetryProvider
from netfly.stream import ChatStream

from .conftest import TOKEN, Gateway, ScriptedServer, answer, chunk, sse, stream_bytes

UPSTREAM_KEY = "sk-upstream-secret-4f1d2a"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"  # git-ignored
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def get(url: str, token: str | None = None) -> tuple[int, str, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.content_type, await response.text(), dict(response.headers)


async def reply_hello(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, answer("Hello ", "there."))


def chat_only(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``handler`` for chat requests; the gateway's ``GET /v1/models`` gets this upstream's one model."""
    async def serve(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.json_response({"object": "list", "data": [{"id": "poet-1", "object": "model"}]})
        return await handler(request)
    return serve


async def test_pages_and_assets_load_without_a_token_with_their_content_types(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]]) -> None:
    upstream = await scripted(chat_only(reply_hello))
    gw = await gateway(upstream.provider(OpenAICompatible))
    expected = {"/": "text/html", "/status": "text/html", "/static/netfly.js": "text/javascript",
                "/static/netfly.css": "text/css", "/static/vendor/marked.umd.js": "text/javascript",
                "/static/vendor/purify.min.js": "text/javascript", "/static/vendor/VERSIONS.txt": "text/plain"}
    for path, content_type in expected.items():
        status, got, _, headers = await get(gw.url + path)
        assert (path, status, got) == (path, 200, content_type)
        assert "script-src 'self'" in headers["Content-Security-Policy"]
    for path in ("/static/nothing.js", "/static/../pyproject.toml", "/static/vendor/x.map"):
        assert (await get(gw.url + path))[0] in (401, 404)  # never a file outside static/, never a 500
    assert (await get(gw.url + "/v1/netfly/status"))[0] == 401  # the data needs the token


async def test_the_html_references_only_local_assets(scripted: Any, gateway: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await gateway((await scripted(chat_only(reply_hello))).provider(OpenAICompatible))
    for path in ("/", "/status"):
        html = (await get(gw.url + path))[2]
        assert not re.search(r"https?://", html), path
        for reference in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert reference.startswith("/"), reference
            assert (await get(gw.url + reference))[0] == 200, reference


async def test_status_has_the_figures_and_no_secret(scripted: Any, gateway: Callable[..., Awaitable[Gateway]]) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"key {UPSTREAM_KEY} is revoked"}}, status=403)

    good = await scripted(chat_only(reply_hello))
    bad = await scripted(chat_only(refuse))
    Good = good.provider(OpenAICompatible, name="Good", api_key=UPSTREAM_KEY)
    Bad = bad.provider(OpenAICompatible, name="Bad", api_key=UPSTREAM_KEY)
    Pool = RetryProvider([Bad, Good], name="Pool", failure_threshold=2, cooldown=60)
    gw = await gateway(Pool)
    assert [(p["name"], p["router"], p["circuit"]) for p in (await status_of(gw))["providers"]] == [
        ("Bad", "Pool", "closed"), ("Good", "Pool", "closed")]
    async with gw.client() as client:
        await two_requests_through_a_failing_provider(client)
    status = await status_of(gw)
    rows = {p["name"]: p for p in status["providers"]}
    assert rows["Bad"]["circuit"] == "open" and rows["Bad"]["consecutive_failures"] == 2
    assert (rows["Bad"]["attempts"], rows["Bad"]["errors"], rows["Bad"]["error_rate"]) == (2, 2, 1.0)
    assert rows["Bad"]["last_error"]["message"].startswith("AuthenticationError")
    assert (rows["Good"]["circuit"], rows["Good"]["error_rate"]) == ("closed", 0.0)
    assert rows["Good"]["ttft_median"] is not None and rows["Good"]["ttft_last"] is not None
    assert (status["in_flight"], status["requests_per_minute"], status["requests_total"]) == (0, 2, 2)
    raw = (await get(gw.url + "/v1/netfly/status", TOKEN))[2]
    assert UPSTREAM_KEY not in raw and TOKEN not in raw
    assert UPSTREAM_KEY[-8:] not in raw


async def two_requests_through_a_failing_provider(client: Any) -> None:
    for _ in range(2):
        stream = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert (stream.headers["x-netfly-provider"], stream.headers["x-netfly-attempts"]) == ("Good", "2")
        assert "".join([c.choices[0].delta.content or "" async for c in stream.parse() if c.choices]) == "Hello there."


async def status_of(gw: Gateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            gw.url + "/v1/netfly/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        return await response.json()  # type: ignore[no-any-return]


async def test_a_stream_in_flight_is_counted(scripted: Any, gateway: Callable[..., Awaitable[Gateway]]) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), chunk("Once"), done=False))
        await asyncio.wait_for(release.wait(), 10)
        await response.write(sse(chunk(finish="stop")))
        return response

    gw = await gateway((await scripted(chat_only(slow))).provider(OpenAICompatible))
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        assert await stream.__anext__() is not None
        assert (await status_of(gw))["in_flight"] == 1
        release.set()
        async for _ in stream:
            pass
    assert (await status_of(gw))["in_flight"] == 0


# -- in a real browser -----------------------------------------------------------------------------

browser = pytest.mark.browser


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install -y chromium (Debian's package; Playwright drives it)")
    playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (the test extra)")
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        # bypass_csp: the tests' own probes are evaluated scripts; and without the page's CSP, the
        # Markdown test shows the sanitizer alone keeps hostile HTML inert.
        context = await chromium.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        try:
            yield await context.new_page()
        finally:
            await context.close()
            await chromium.close()


async def open_with_token(page: Any, url: str, token: str = TOKEN) -> None:
    await page.goto(url)
    await page.fill("#token", token)
    await page.dispatch_event("#token", "change")


class Stepped:
    """An upstream that sends each piece only when the test releases it."""

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces
        self.steps = [asyncio.Event() for _ in pieces]

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), done=False))
        for piece, step in zip(self.pieces, self.steps, strict=True):
            await asyncio.wait_for(step.wait(), 20)
            await response.write(sse(chunk(piece), done=False))
        await response.write(sse(chunk(finish="stop"), chunk(usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                                      "total_tokens": 7}, choices=False)))
        return response


async def send(page: Any, text: str) -> None:
    await page.fill("#prompt", text)
    await page.click("#send")


@browser
async def test_an_answer_appears_piece_by_piece_with_its_figures(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    upstream = Stepped("Pines ", "whisper ", "**softly**.")
    server = await scripted(chat_only(upstream))
    gw = await gateway(server.provider(OpenAICompatible, name="Upstream"))
    await open_with_token(page, gw.url + "/")
    await page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    await send(page, "Write a poem")
    content = page.locator(".message.assistant .content")
    upstream.steps[0].set()
    await page.wait_for_function("document.querySelector('.message.assistant .content')"
                                 "?.textContent.trim() === 'Pines'")
    assert "whisper" not in await content.inner_text()  # the first piece is shown before the second arrives
    assert await page.locator(".message.assistant.streaming").count() == 1
    upstream.steps[1].set()
    await page.wait_for_function("document.querySelector('.message.assistant .content')?.textContent"
                                 ".includes('whisper')")
    upstream.steps[2].set()
    await page.wait_for_selector(".message.assistant footer.figures")
    assert await page.locator(".message.assistant .content strong").inner_text() == "softly"  # Markdown rendered
    figures = await page.locator(".message.assistant footer.figures").inner_text()
    assert "TTFT" in figures and "tokens/s" in figures and "provider Upstream" in figures and "attempts 1" in figures
    assert server.requests[-1]["stream"] is True
    assert server.requests[-1]["model"] == "poet-1"  # picked from the gateway's /v1/models
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "chat.png"))


@browser
async def test_stop_cancels_the_upstream_request(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    upstream = Stepped("Once upon ", "a time")
    server = await scripted(chat_only(upstream))
    gw = await gateway(server.provider(OpenAICompatible))
    await open_with_token(page, gw.url + "/")
    await send(page, "A long story")
    upstream.steps[0].set()
    await page.wait_for_function("document.querySelector('.message.assistant .content')?.textContent"
                                 ".includes('Once upon')")
    await page.click("#stop")
    await page.wait_for_selector(".message.assistant.stopped")
    await wait_until(lambda: server.disconnects == 1, "the upstream saw no disconnect")
    assert await page.is_enabled("#send")


async def wait_until(condition: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, message
        await asyncio.sleep(0.05)


@browser
async def test_markdown_with_script_and_onerror_renders_inert(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    hostile = ("Look:\n\n<script>window.pwned = 1</script>\n\n<img src=x onerror=\"window.pwned = 2\">\n\n"
               "[click](javascript:window.pwned=3)\n\n```python\nprint('<b>kept</b>')\n```\n")

    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer(hostile))

    gw = await gateway((await scripted(chat_only(reply))).provider(OpenAICompatible))
    await open_with_token(page, gw.url + "/")
    await send(page, "Show me")
    await page.wait_for_selector(".message.assistant footer.figures")
    await asyncio.sleep(0.3)  # time for an image error handler to have fired, were there one
    content = page.locator(".message.assistant .content")
    assert await page.evaluate("window.pwned === undefined")
    assert await content.locator("script").count() == 0
    assert await content.locator("img[onerror]").count() == 0
    assert await content.locator("a[href^='javascript']").count() == 0
    assert await content.locator("pre code").inner_text() == "print('<b>kept</b>')\n"  # code kept as text


@browser
@pytest.mark.skipif(not hasattr(ChatStream, "events"), reason="the gateway relays tool calls and reasoning once "
                    "the engine's typed events (ChatStream.events) are on this branch")
async def test_a_tool_call_is_shown_as_a_tool_call_and_reasoning_folded(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    args = {"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}

    async def reply(request: web.Request) -> web.StreamResponse:
        first = chunk(role="assistant", reasoning="The user wants weather.")
        tool = chunk()
        tool["choices"][0]["delta"]["tool_calls"] = [call]
        more = chunk()
        more["choices"][0]["delta"]["tool_calls"] = [args]
        return await stream_bytes(request, sse(first, tool, more, chunk(finish="tool_calls")))

    gw = await gateway((await scripted(chat_only(reply))).provider(OpenAICompatible))
    await open_with_token(page, gw.url + "/")
    await send(page, "Weather in Oslo?")
    await page.wait_for_selector(".message.assistant footer.figures")
    assert "tool call: get_weather" in await page.locator(".tool-call .tool-name").inner_text()
    assert '"city": "Oslo"' in await page.locator(".tool-call pre").inner_text()
    reasoning = page.locator("details.reasoning")
    assert await reasoning.get_attribute("open") is None  # folded
    assert not await page.locator("details.reasoning > div").is_visible()


@browser
async def test_a_wrong_token_and_a_gateway_down_are_clear(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    gw = await gateway((await scripted(chat_only(reply_hello))).provider(OpenAICompatible))
    await open_with_token(page, gw.url + "/", token="not-the-token")
    await page.wait_for_selector("#notice:not([hidden])")
    assert "refused the token" in await page.locator("#notice").inner_text()
    await open_with_token(page, gw.url + "/")
    await page.wait_for_selector("#notice", state="hidden")
    await page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    await send(page, "hello?")
    await page.wait_for_selector(".message.assistant.failed")
    assert "not reachable" in await page.locator(".message.assistant .error").inner_text()


@browser
async def test_the_status_page_shows_a_provider_going_from_closed_to_open(
        scripted: Any, gateway: Callable[..., Awaitable[Gateway]], page: Any) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    bad: ScriptedServer = await scripted(chat_only(fail))
    good = await scripted(chat_only(reply_hello))
    Pool = RetryProvider([bad.provider(OpenAICompatible, name="Flaky", max_retries=1),
                          good.provider(OpenAICompatible, name="Steady")], name="Pool", failure_threshold=2)
    gw = await gateway(Pool)
    await open_with_token(page, gw.url + "/status")
    flaky = page.locator("tr[data-provider='Flaky'] td.circuit")
    await page.wait_for_function("document.querySelector(\"tr[data-provider='Flaky'] td.circuit\")"
                                 "?.textContent === 'closed'")
    async with gw.client() as client:
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await page.wait_for_function("document.querySelector(\"tr[data-provider='Flaky'] td.circuit\")"
                                 "?.textContent === 'open'", timeout=10_000)
    assert await flaky.get_attribute("class") == "circuit open"
    row = await page.locator("tr[data-provider='Flaky']").inner_text()
    assert "100 %" in row and "overloaded" in row
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "status.png"))
