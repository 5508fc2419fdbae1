"""The streaming clients under test, and the worker that measures one of them in its own process.

Each client turns one request for ``n`` chunks into an async iterator of answer text; the worker
checks the text against :func:`payload.expected_text` so a fast-but-wrong client cannot win.

    python benchmarks/clients.py CLIENT single --base URL --n 20000
    python benchmarks/clients.py CLIENT concurrent --base URL --n 500 --streams 200
    python benchmarks/clients.py CLIENT latency --base URL --n 16 --streams 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import payload

MESSAGES = [{"role": "user", "content": "Write a long poem about nature, in English and Russian."}]
WARMUP_CHUNKS = 64


class Client:
    """One library, set up once per process, then asked for streams."""

    name = ""

    async def start(self, base: str) -> None:
        raise NotImplementedError

    def stream(self, n: int) -> AsyncIterator[str]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class Floor(Client):
    """Raw aiohttp, the least a Python client can do: block reads, split lines, json.loads."""

    name = "aiohttp (floor)"

    async def start(self, base: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.url = base + "/v1/chat/completions"

    async def stream(self, n: int) -> AsyncIterator[str]:
        body = {"model": payload.MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with self.session.post(self.url, json=body) as response:
            response.raise_for_status()
            rest = b""
            async for block in response.content.iter_any():
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.startswith(b"data: "):
                        data = line[6:]
                        if data == b"[DONE]":
                            return
                        choices = json.loads(data)["choices"]
                        if choices:
                            content = choices[0]["delta"].get("content")
                            if content:
                                yield content

    async def close(self) -> None:
        await self.session.close()


class OpenAISDK(Client):
    """The official SDK, default settings: ``AsyncOpenAI(...).chat.completions.create(stream=True)``."""

    name = "openai SDK"

    async def start(self, base: str) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base + "/v1", api_key="sk-bench")

    async def stream(self, n: int) -> AsyncIterator[str]:
        stream = await self.client.chat.completions.create(
            model=payload.MODEL, messages=cast(Any, MESSAGES), max_tokens=n, stream=True
        )
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    yield content

    async def close(self) -> None:
        await self.client.close()


class HttpxSSE(Client):
    """httpx + httpx-sse, default client settings."""

    name = "httpx + httpx-sse"

    async def start(self, base: str) -> None:
        import httpx

        self.client = httpx.AsyncClient()
        self.url = base + "/v1/chat/completions"

    async def stream(self, n: int) -> AsyncIterator[str]:
        from httpx_sse import aconnect_sse

        body = {"model": payload.MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with aconnect_sse(self.client, "POST", self.url, json=body) as source:
            source.response.raise_for_status()
            async for event in source.aiter_sse():
                if event.data == "[DONE]":
                    break
                choices = json.loads(event.data)["choices"]
                if choices:
                    content = choices[0]["delta"].get("content")
                    if content:
                        yield content

    async def close(self) -> None:
        await self.client.aclose()


class GPT4Free(Client):
    """gpt4free's generic OpenAI template provider (``g4f.Provider.template.OpenaiTemplate``)."""

    name = "gpt4free (g4f)"

    async def start(self, base: str) -> None:
        from g4f.Provider.template import OpenaiTemplate  # type: ignore[import-untyped]

        class Bench(OpenaiTemplate):  # type: ignore[misc]
            label = "Bench"
            url = base
            base_url = base + "/v1"
            working = True
            needs_auth = False
            default_model = payload.MODEL
            models = [payload.MODEL]  # noqa: RUF012 - g4f's own attribute style

        self.provider = Bench

    async def stream(self, n: int) -> AsyncIterator[str]:
        async for item in self.provider.create_async_generator(
            model=payload.MODEL, messages=MESSAGES, max_tokens=n, stream=True
        ):
            if isinstance(item, str):  # the rest are request/usage/finish records
                yield item

    async def close(self) -> None:
        from g4f.requests import close_shared_connectors  # type: ignore[import-untyped]

        await close_shared_connectors()


class Netfly(Client):
    """netfly: a ``FreeNetfly`` subclass pointed at the server, through the seed's interface."""

    name = "netfly"

    async def start(self, base: str) -> None:
        from netfly import FreeNetfly

        self.provider = FreeNetfly.configure(url=base, name="BenchNetfly")

    def stream(self, n: int) -> AsyncIterator[str]:
        return self.provider.create_async_generator(model="gpt-4", messages=MESSAGES, max_tokens=n)

    async def close(self) -> None:
        import netfly

        await netfly.aclose()


class NetflyStdlibJSON(Netfly):
    """netfly with orjson hidden, to measure what orjson is worth."""

    name = "netfly (stdlib json)"


CLIENTS: dict[str, type[Client]] = {
    "floor": Floor,
    "openai": OpenAISDK,
    "httpx-sse": HttpxSSE,
    "g4f": GPT4Free,
    "netfly": Netfly,
    "netfly-json": NetflyStdlibJSON,
}


async def _consume(client: Client, n: int) -> tuple[str, float, float | None, float]:
    """(text, start, first-text time, end) of one stream."""
    parts: list[str] = []
    first = None
    started = time.perf_counter()
    async for piece in client.stream(n):
        if first is None:
            first = time.perf_counter()
        parts.append(piece)
    return "".join(parts), started, first, time.perf_counter()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def single(client: Client, base: str, n: int) -> dict[str, Any]:
    await client.start(base)
    try:
        text, *_ = await _consume(client, WARMUP_CHUNKS)  # opens the connection, warms the code paths
        if text != payload.expected_text(WARMUP_CHUNKS):
            return {"ok": False, "error": "warm-up text differs from the expected text"}
        expected = payload.expected_text(n)
        cpu = time.process_time()
        text, started, first, ended = await _consume(client, n)
        cpu = time.process_time() - cpu
    finally:
        await client.close()
    wall = ended - started
    return {
        "ok": text == expected,
        "error": None if text == expected else f"text differs: got {len(text)} chars, expected {len(expected)}",
        "wall": wall,
        "cpu": cpu,
        "ttft": (first - started) if first is not None else None,
        "chunks_per_s": n / wall,
    }


async def latency(client: Client, base: str, n: int, count: int) -> dict[str, Any]:
    """Median time to first text over ``count`` short streams one after another (after a warm-up)."""
    await client.start(base)
    expected = payload.expected_text(n)
    firsts: list[float] = []
    ok = True
    try:
        await _consume(client, WARMUP_CHUNKS)
        for _ in range(count):
            text, started, first, _ended = await _consume(client, n)
            ok = ok and text == expected and first is not None
            if first is not None:
                firsts.append(first - started)
    finally:
        await client.close()
    return {
        "ok": ok,
        "error": None if ok else "text differs from the expected text",
        "ttft": statistics.median(firsts) if firsts else None,
        "ttft_min": min(firsts) if firsts else None,
        "count": count,
    }


async def concurrent(client: Client, base: str, n: int, streams: int) -> dict[str, Any]:
    await client.start(base)
    expected = payload.expected_text(n)
    rss_before = _rss_mib()

    async def one() -> str | None:
        try:
            text, *_ = await _consume(client, n)
        except Exception as exc:
            return type(exc).__name__
        return None if text == expected else "wrong text"

    try:
        await _consume(client, WARMUP_CHUNKS)
        cpu = time.process_time()
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        await client.close()
    errors = Counter(o for o in outcomes if o is not None)
    return {
        "ok": not errors,
        "wall": wall,
        "cpu": cpu,
        "failures": sum(errors.values()),
        "errors": dict(errors),
        "rss_before_mib": rss_before,
        "peak_rss_mib": _rss_mib(),
        "chunks_per_s": n * (streams - sum(errors.values())) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("mode", choices=["single", "concurrent", "latency"])
    parser.add_argument("--base", required=True, help="server root URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--streams", type=int, default=200, help="concurrent: streams; latency: streams in a row")
    args = parser.parse_args()
    if args.client == "netfly-json":
        sys.modules["orjson"] = None  # type: ignore[assignment]  # makes `import orjson` fail
    client = CLIENTS[args.client]()
    try:
        if args.mode == "single":
            result = asyncio.run(single(client, args.base, args.n))
        elif args.mode == "latency":
            result = asyncio.run(latency(client, args.base, args.n, args.streams))
        else:
            result = asyncio.run(concurrent(client, args.base, args.n, args.streams))
    except ImportError as exc:  # a peer that is not installed: pip install -e ".[bench]"
        print(json.dumps({"ok": False, "skipped": f"not installed ({exc.name})"}))
        return
    if args.client.startswith("netfly"):
        from netfly import _json

        result["json"] = _json.loads.__module__ or "json"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
