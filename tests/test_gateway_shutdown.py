"""SIGTERM on a real ``netfly serve``: requests in flight get the grace, the rest are cut in-band."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .conftest import ScriptedServer, chunk, netfly_serve, sse

TOKEN = "gw-token-shutdown-9c2e"
GRACE = 1.0
Scripted = Callable[..., Awaitable[ScriptedServer]]


def _slow_answer(pieces: int, delay: float, first_delay: float = 0.0) -> Callable[..., Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(first_delay)
        await response.write(sse(chunk(role="assistant"), done=False))
        for i in range(pieces):
            await response.write(sse(chunk(f"p{i} "), done=False))
            await asyncio.sleep(delay)
        await response.write(sse(chunk(finish="stop")))
        await response.write_eof()
        return response

    return handler


async def _serve(upstream: ScriptedServer) -> tuple[asyncio.subprocess.Process, int]:
    process, port, _ = await netfly_serve("--url", upstream.url, "--retries", "1", "--shutdown-grace", str(GRACE),
                                          env={"NETFLY_AUTH_TOKEN": TOKEN})
    return process, port


async def _chat(session: aiohttp.ClientSession, port: int, events: list[str]) -> int:
    """Stream one chat completion, collecting its ``data:`` payloads; returns the status."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            events.append(await response.text())
            return response.status
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
        return response.status


async def test_sigterm_lets_short_streams_finish_and_cuts_long_ones_in_band(scripted: Scripted) -> None:
    upstream = await scripted(_slow_answer(6, 0.1), _slow_answer(100, 0.1), _slow_answer(1, 0.0, first_delay=30))
    process, port = await _serve(upstream)
    short: list[str] = []
    long: list[str] = []
    unstarted: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            tasks = []
            for events in (short, long, unstarted):  # one at a time: each meets its own upstream script
                tasks.append(asyncio.create_task(_chat(session, port, events)))
                while len(upstream.requests) < len(tasks):
                    await asyncio.sleep(0.01)
            while len(long) < 3:
                await asyncio.sleep(0.02)
            assert "[DONE]" not in short  # still running when the signal comes
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), 15)
            cut_after = time.monotonic() - signalled
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert statuses == [200, 200, 503]
    # Finished within the grace: complete, with [DONE].
    assert short[-1] == "[DONE]" and "p5 " in "".join(short)
    # Outlived the grace: an error event of type server_shutdown is the last thing sent, and no [DONE].
    assert GRACE <= cut_after < GRACE + 3
    last = json.loads(long[-1])
    assert last["error"]["type"] == "server_shutdown" and last["error"]["code"] == "server_shutdown"
    assert "after the 1 s grace" in last["error"]["message"]
    assert "[DONE]" not in long
    # Never started: a 503 of the same type.
    assert json.loads(unstarted[0])["error"]["type"] == "server_shutdown"
    log = stderr.decode()
    assert log.count("server shutdown: cut after the grace period") == 2
    assert "POST /v1/chat/completions 200 " in log and "POST /v1/chat/completions 503 " in log
    assert " 499 " not in log and "client disconnected" not in log
    assert "shutdown grace of 1 s over: cutting 2 request(s) still running" in log
