"""Shared fixtures: real aiohttp servers on 127.0.0.1 that serve scripted byte streams and faults."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import netfly
from netfly import FreeNetfly
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.server import Runner

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chunk(content: str | None = None, *, finish: str | None = None, role: str | None = None,
          reasoning: str | None = None, usage: dict[str, int] | None = None, model: str = "test-model",
          choices: bool = True) -> dict[str, Any]:
    """A realistic chat.completion.chunk object."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    obj: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return obj


def sse(*objects: Any, done: bool = True, eol: str = "\n") -> bytes:
    """Encode chunk objects (or raw strings) as an event stream."""
    out = []
    for obj in objects:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        out.append(f"data: {data}{eol}{eol}")
    if done:
        out.append(f"data: [DONE]{eol}{eol}")
    return "".join(out).encode()


def answer(*pieces: str, finish: str = "stop") -> bytes:
    """The event stream of an answer made of ``pieces``: role chunk, content chunks, finish, [DONE]."""
    return sse(chunk(role="assistant"), *(chunk(p) for p in pieces), chunk(finish=finish))


async def stream_bytes(request: web.Request, *slices: bytes, status: int = 200,
                       content_type: str = "text/event-stream", delay: float = 0.0) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    await response.prepare(request)
    for piece in slices:
        await response.write(piece)
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


class ScriptedServer:
    """A real HTTP server; each POST is answered by the next handler of the script (last one repeats)."""

    def __init__(self, server: TestServer, script: list[Handler]) -> None:
        self.server = server
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects = 0

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def provider(self, base: type[netfly.Provider] = FreeNetfly, **attributes: Any) -> type[netfly.Provider]:
        attributes.setdefault("retry_delay", 0.01)
        return base.configure(url=self.url, **attributes)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        raw = await request.read()
        self.requests.append(json.loads(raw) if raw else {})
        handler = self.script[min(len(self.requests) - 1, len(self.script) - 1)]
        try:
            return await handler(request)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise


@pytest.fixture
async def scripted(aiohttp_server: Any) -> Callable[..., Awaitable[ScriptedServer]]:
    async def start(*script: Handler) -> ScriptedServer:
        app = web.Application()
        holder: dict[str, ScriptedServer] = {}

        async def route(request: web.Request) -> web.StreamResponse:
            return await holder["s"].handle(request)

        app.router.add_route("*", "/{tail:.*}", route)
        server = await aiohttp_server(app)
        holder["s"] = ScriptedServer(server, list(script))
        return holder["s"]

    return start


@pytest.fixture(autouse=True)
async def _close_pool() -> AsyncIterator[None]:
    yield
    await netfly.transport.aclose()  # connections only: the local model server is shared by the session


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the gateway -----------------------------------------------------------------------------------


async def netfly_serve(*args: str, env: dict[str, str] | None = None,
                       timeout: float = 30.0) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """Start ``netfly serve --port 0 ARGS`` and wait for its "listening" line: the process, the port
    it bound and the log lines so far. Not a port guessed free beforehand: another process (a
    parallel test run) could take it and answer in the gateway's place."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netfly", "serve", "--port", "0", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        while not lines or not (found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", lines[-1])):
            line = await asyncio.wait_for(process.stderr.readline(), timeout)
            if not line:
                raise AssertionError("netfly serve ended before listening: " + "".join(lines))
            lines.append(line.decode())
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process, int(found.group(1)), lines


TOKEN = "gw-token-5b1c9e"


class Gateway:
    def __init__(self, url: str) -> None:
        self.url = url
        self.base_url = url + "/v1"

    def client(self, token: str = TOKEN, **options: Any) -> openai.AsyncOpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 10)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=token, **options)

    def sync_client(self, token: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=10)


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start the gateway with the production runner (``start``) on a free port of 127.0.0.1."""
    runners: list[Runner] = []

    async def launch(provider: type[netfly.Provider] | str, **options: Any) -> Gateway:
        options.setdefault("auth_token", TOKEN)
        runner = await start(create_app(provider, **options), "127.0.0.1", 0)
        runners.append(runner)
        return Gateway(f"http://127.0.0.1:{bound_port(runner)}")

    yield launch
    for runner in runners:
        await runner.cleanup()


# The loops `netfly serve` runs on (uvloop by default). A test module that sets ON_BOTH_LOOPS = True
# runs each of its tests on both: the server's timers and transports behave differently on the two
# (uvloop's call_at for a past time returns a plain Handle; its transports are not asyncio.Transport
# subclasses).
def _uvloop_loop() -> asyncio.AbstractEventLoop:
    return pytest.importorskip("uvloop").new_event_loop()  # type: ignore[no-any-return]


_ASYNCIO_ONLY: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
_BOTH_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {**_ASYNCIO_ONLY, "uvloop": _uvloop_loop}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    module = getattr(item, "module", None)
    return _BOTH_LOOPS if getattr(module, "ON_BOTH_LOOPS", False) else _ASYNCIO_ONLY
