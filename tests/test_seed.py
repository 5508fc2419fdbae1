"""The seed's example, verbatim but for the import, against a local server."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from aiohttp import web

from netfly import FreeNetfly

from .conftest import answer, stream_bytes


async def test_seed_example_runs_as_written(scripted: Any) -> None:
    async def poem(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("Leaves ", "whisper, ", "rivers ", "hum."))

    server = await scripted(poem)

    class LocalNetfly(FreeNetfly):
        url = server.url

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # -- the seed's code, with only the class name pointing at the local server --
        model = "gpt-3.5-turbo"
        messages = [{"role": "user", "content": "Write a short poem about nature."}]
        try:
            async for chunk in LocalNetfly.create_async_generator(model=model, messages=messages):
                print(chunk, end="")
        except Exception as e:
            print(f"An error occurred: {e}")
    assert out.getvalue() == "Leaves whisper, rivers hum."

    body = server.requests[0]
    assert body == {
        "messages": messages, "stream": True, "model": "gpt-3.5-turbo", "temperature": 0.5,
        "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1,
    }
    headers = server.headers[0]
    assert headers["Content-Type"] == "application/json"
    assert "text/event-stream" in headers["Accept"]
    assert headers["Origin"] == server.url
    assert headers["Referer"] == server.url + "/"
    assert headers["User-Agent"].startswith("Mozilla/5.0")
