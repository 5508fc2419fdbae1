"""Where the gateway's part of the time to first token goes: timestamps inside ``netfly serve``.

    python benchmarks/first_token.py              # 600 streams of 16 chunks, uvloop
    python benchmarks/first_token.py --loop asyncio --count 1000

Runs the upstream (benchmarks/server.py) in its own process, the gateway in this one with a few of its
functions wrapped to note the time they are first entered per request, and the raw-aiohttp client
(benchmarks/gateway_client.py) in a third, which sends the streams one at a time. The phases, medians
over the streams after the first 100:

  server      the request's first bytes read → the chat handler entered (HTTP parsing, the task,
              the middlewares)
  handler     → the provider called (reading and checking the body, routing, admission)
  provider    → the upstream request written (building it, the stream and its source, the client)
  upstream    → the upstream's first bytes read (the upstream's own time and two loopback hops)
  answer      → the first bytes written to the client (the upstream's head, interpreting the answer
              up to its first output, encoding it, the response head)

The wrappers add about a microsecond each. The functions wrapped are netfly's internals: when one is
renamed, this script says which.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from run import HERE, background, free_port

import netfly._http1 as upstream_http
import netfly.gateway.http1 as server_http
from netfly import OpenAICompatible
from netfly.cli.loops import chosen_loop, run
from netfly.gateway.app import Gateway, create_app
from netfly.gateway.server import start
from netfly.provider import Provider

PHASES = ["server", "handler", "provider", "upstream", "answer"]
MARKS = ["request", "handler", "provider", "upstream write", "upstream read", "first write"]


class Marks:
    """The first time each mark is reached, per request."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.requests: list[dict[str, float]] = []

    def note(self, name: str) -> None:
        self.current.setdefault(name, time.perf_counter())

    def begin(self) -> None:
        if self.current:
            self.requests.append(self.current)
        self.current = {}
        self.note("request")


def wrap(owner: type, name: str, before: Callable[[tuple[Any, ...]], None]) -> None:
    """Call ``before(args)`` each time ``owner.name`` (a method, a coroutine method or a classmethod) is entered."""
    declared = owner.__dict__.get(name)
    if declared is None:
        sys.exit(f"{owner.__name__}.{name} is gone: update benchmarks/first_token.py")
    function = declared.__func__ if isinstance(declared, classmethod) else declared
    if asyncio.iscoroutinefunction(function):
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            before(args)
            return await function(*args, **kwargs)
        wrapper: Callable[..., Any] = async_wrapper
    else:
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            before(args)
            return function(*args, **kwargs)
        wrapper = sync_wrapper
    setattr(owner, name, classmethod(wrapper) if isinstance(declared, classmethod) else wrapper)


def instrument(marks: Marks) -> None:
    def request_bytes(args: tuple[Any, ...]) -> None:
        if bytes(args[1][:5]) == b"POST ":
            marks.begin()

    wrap(server_http.Connection, "data_received", request_bytes)
    wrap(Gateway, "chat_completions", lambda _: marks.note("handler"))
    wrap(Provider, "stream", lambda _: marks.note("provider"))
    wrap(upstream_http.Connection, "send", lambda _: marks.note("upstream write"))
    wrap(upstream_http.Connection, "data_received", lambda _: marks.note("upstream read"))
    wrap(server_http.Connection, "send", lambda _: marks.note("first write"))


async def serve_and_measure(upstream: str, count: int) -> list[dict[str, float]]:
    marks = Marks()
    instrument(marks)

    class Upstream(OpenAICompatible):
        url = upstream + "/v1"
        api_key = "bench"

    port = free_port()
    runner = await start(create_app(Upstream), "127.0.0.1", port)
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "gateway_client.py"), "latency", "--base", f"http://127.0.0.1:{port}",
            "--n", "16", "--count", str(count), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        out, _ = await client.communicate()
        if b'"ok": true' not in out:
            sys.exit(f"the client failed: {out.decode()[-300:]}")
    finally:
        await runner.cleanup()
    marks.begin()
    return marks.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    port = free_port()
    argv = [sys.executable, str(HERE / "server.py"), "--port", str(port), "--prebuild", "16"]
    with background(argv, port, "upstream", subprocess.DEVNULL):
        requests = run(serve_and_measure(f"http://127.0.0.1:{port}", args.count), chosen_loop(args.loop))
    rows = [r for r in requests[100:] if all(m in r for m in MARKS)]
    print(f"\nThe gateway's part of the time to first token ({args.loop}, median of {len(rows)} streams of 16 "
          "chunks):\n\n| phase | µs |\n|---|---:|")
    for phase, start_mark, end_mark in zip(PHASES, MARKS[:-1], MARKS[1:], strict=True):
        print(f"| {phase} | {1e6 * statistics.median(r[end_mark] - r[start_mark] for r in rows):.1f} |")
    own = [r["upstream write"] - r["request"] + r["first write"] - r["upstream read"] for r in rows]
    print(f"| the gateway's own (all but upstream) | {1e6 * statistics.median(own):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
