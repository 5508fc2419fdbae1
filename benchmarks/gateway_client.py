"""The raw aiohttp client of benchmarks/gateway.py: one measurement in its own process, JSON out.

    python benchmarks/gateway_client.py MODE --base URL --n N [--api chat|responses|messages]
        MODE: single (one stream of N chunks), latency (--count short streams in a row),
              concurrent (--streams streams at once), requests (--count non-streamed requests,
              --concurrency at a time)

The same few lines read every target (the upstream directly, netfly, the peers): block reads, lines
split, ``json.loads`` of each ``data:`` line, the text picked out as the wire API puts it. The text
of every answer is checked against :func:`payload.expected_text`, so a fast but wrong path cannot win.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import payload

MESSAGES = [{"role": "user", "content": "Write a long poem about nature, in English and Russian."}]
WARMUP_CHUNKS = 64
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}


def _chat_text(event: dict[str, Any]) -> str | None:
    choices = event.get("choices")
    return choices[0]["delta"].get("content") if choices else None


def _responses_text(event: dict[str, Any]) -> str | None:
    return event["delta"] if event.get("type") == "response.output_text.delta" else None


def _messages_text(event: dict[str, Any]) -> str | None:
    if event.get("type") == "content_block_delta" and event["delta"].get("type") == "text_delta":
        return str(event["delta"]["text"])
    return None


STREAM_TEXT: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "chat": _chat_text, "responses": _responses_text, "messages": _messages_text,
}


def whole_text(api: str, body: dict[str, Any]) -> str:
    """The answer's text in a non-streamed reply of ``api``."""
    if api == "chat":
        return str(body["choices"][0]["message"]["content"])
    if api == "responses":
        return "".join(part["text"] for item in body["output"] if item.get("type") == "message"
                       for part in item["content"] if part.get("type") == "output_text")
    return "".join(block["text"] for block in body["content"] if block.get("type") == "text")


class Target:
    def __init__(self, base: str, api: str, model: str, key: str | None, extra: dict[str, Any]) -> None:
        self.url = base + PATHS[api]
        self.api = api
        self.model = model
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.extra = extra
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=900))

    def body(self, n: int, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": stream, **self.extra}
        if self.api == "responses":
            body.update(input=MESSAGES, max_output_tokens=n)
        else:
            body.update(messages=MESSAGES, max_tokens=n)
        return body

    async def stream(self, n: int) -> AsyncIterator[str]:
        pick = STREAM_TEXT[self.api]
        async with self.session.post(self.url, json=self.body(n, True), headers=self.headers) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            rest = b""
            async for block in response.content.iter_any():  # to the end, so the connection is reused
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        text = pick(json.loads(line[6:]))
                        if text:
                            yield text

    async def whole(self, n: int) -> str:
        async with self.session.post(self.url, json=self.body(n, False), headers=self.headers) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            return whole_text(self.api, json.loads(await response.read()))


async def consume(target: Target, n: int) -> tuple[str, float, float | None, float]:
    """(text, start, first-text time, end) of one stream."""
    parts: list[str] = []
    first = None
    started = time.perf_counter()
    async for piece in target.stream(n):
        if first is None:
            first = time.perf_counter()
        parts.append(piece)
    return "".join(parts), started, first, time.perf_counter()


async def single(target: Target, n: int, _args: argparse.Namespace) -> dict[str, Any]:
    text, started, first, ended = await consume(target, n)
    ok = text == payload.expected_text(n)
    return {"ok": ok, "error": None if ok else f"text differs: {len(text)} chars", "wall": ended - started,
            "ttft": None if first is None else first - started}


async def latency(target: Target, n: int, args: argparse.Namespace) -> dict[str, Any]:
    firsts, ok = [], True
    for _ in range(args.count):
        text, started, first, _ended = await consume(target, n)
        ok = ok and text == payload.expected_text(n) and first is not None
        if first is not None:
            firsts.append(first - started)
    return {"ok": ok, "error": None if ok else "text differs", "ttft": statistics.median(firsts) if firsts else None}


async def _outcomes(count: int, concurrency: int, one: Callable[[], Any]) -> tuple[float, Counter[str]]:
    gate = asyncio.Semaphore(concurrency)

    async def guarded() -> str | None:
        async with gate:
            try:
                return await one()  # type: ignore[no-any-return]
            except Exception as exc:
                return type(exc).__name__

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(guarded() for _ in range(count)))
    return time.perf_counter() - started, Counter(o for o in outcomes if o is not None)


async def concurrent(target: Target, n: int, args: argparse.Namespace) -> dict[str, Any]:
    expected = payload.expected_text(n)

    async def one() -> str | None:
        text, *_ = await consume(target, n)
        return None if text == expected else "wrong text"

    wall, errors = await _outcomes(args.streams, args.streams, one)
    return {"ok": not errors, "wall": wall, "failures": sum(errors.values()), "errors": dict(errors)}


async def requests(target: Target, n: int, args: argparse.Namespace) -> dict[str, Any]:
    expected = payload.expected_text(n)

    async def one() -> str | None:
        return None if await target.whole(n) == expected else "wrong text"

    wall, errors = await _outcomes(args.count, args.concurrency, one)
    return {"ok": not errors, "wall": wall, "failures": sum(errors.values()), "errors": dict(errors),
            "requests_per_s": args.count / wall}


MODES = {"single": single, "latency": latency, "concurrent": concurrent, "requests": requests}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.base, args.api, args.model, args.key, json.loads(args.extra))
    try:
        text, *_ = await consume(target, WARMUP_CHUNKS)  # the connection and first-request costs out
        if text != payload.expected_text(WARMUP_CHUNKS):
            return {"ok": False, "error": f"warm-up text differs: {text[:80]!r}"}
        print("ready", file=sys.stderr, flush=True)
        sys.stdin.readline()  # the orchestrator reads the gateway's CPU, then says go
        return await MODES[args.mode](target, args.n, args)
    finally:
        await target.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--base", required=True)
    parser.add_argument("--api", choices=sorted(PATHS), default="chat")
    parser.add_argument("--model", default=payload.MODEL)
    parser.add_argument("--key")
    parser.add_argument("--extra", default="{}", help="JSON object merged into every request body")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    try:
        result = asyncio.run(measure(args))
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
