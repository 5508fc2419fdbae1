"""Profile netfly's streaming hot path against the benchmark server, with pyinstrument.

    python benchmarks/profile_netfly.py                 # orjson, if installed
    python benchmarks/profile_netfly.py --stdlib-json   # the json fallback
    python benchmarks/profile_netfly.py --gateway single|concurrent|requests [--api chat]

Streams ``--n`` chunks ``--reps`` times through ``FreeNetfly.create_async_generator`` and prints
pyinstrument's call tree of that loop only (imports and server start-up are left out). With
``--gateway MODE``, the gateway's app runs in this process under the profiler instead, and
benchmarks/gateway_client.py drives ``MODE`` against it from its own process ``--reps`` times. For a
sampling profile of a whole process, ``py-spy record -o out.svg -- python ...`` works as well.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from netfly import OpenAICompatible

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--stdlib-json", action="store_true", help="hide orjson from netfly")
    parser.add_argument("--gateway", choices=["single", "latency", "concurrent", "requests"],
                        help="profile netfly serve")
    parser.add_argument("--api", default="chat", help="the gateway's wire API: chat, responses, messages")
    parser.add_argument("--all", action="store_true", help="show library frames too (asyncio, aiohttp)")
    args = parser.parse_args()
    if args.stdlib_json:
        sys.modules["orjson"] = None  # type: ignore[assignment]  # makes `import orjson` fail
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("profile_netfly.py needs pyinstrument: pip install pyinstrument", file=sys.stderr)
        return 2

    import clients
    import payload
    import run

    port = run.free_port()
    base = f"http://127.0.0.1:{port}"
    server = [sys.executable, str(HERE / "server.py"), "--port", str(port), "--prebuild", str(args.n)]
    with run.background(server, port, "benchmark server"):
        if args.gateway:
            profiler = Profiler(interval=0.0002)
            asyncio.run(profile_gateway(profiler, base, args))
            print(profiler.output_text(unicode=True, color=False, show_all=args.all))
            return 0
        client = clients.Netfly()
        expected = payload.expected_text(args.n)

        async def loop(profiler: Profiler) -> float:
            await client.start(base)
            await clients._consume(client, clients.WARMUP_CHUNKS)
            started = time.perf_counter()
            profiler.start()
            for _ in range(args.reps):
                text, *_ = await clients._consume(client, args.n)
                if text != expected:
                    raise SystemExit("netfly received the wrong text")
            profiler.stop()
            elapsed = time.perf_counter() - started
            await client.close()
            return elapsed

        profiler = Profiler(interval=0.0002)
        elapsed = asyncio.run(loop(profiler))
    from netfly import _json

    print(profiler.output_text(unicode=True, color=False))
    rate = args.n * args.reps / elapsed
    print(f"{args.reps} x {args.n} chunks in {elapsed:.3f} s ({rate:,.0f} chunks/s, profiler on; "
          f"JSON: {_json.loads.__module__})")
    return 0


async def profile_gateway(profiler: Any, upstream: str, args: argparse.Namespace) -> None:
    """The gateway app here, under ``profiler``; the client in its own process, ``args.reps`` runs."""
    from netfly.gateway import bound_port, create_app, start

    runner = await start(create_app(OpenAICompatible.configure(url=upstream)), "127.0.0.1", 0)
    port = bound_port(runner)
    n = {"single": args.n, "latency": 16, "concurrent": 500, "requests": 64}[args.gateway]
    argv = [sys.executable, str(HERE / "gateway_client.py"), args.gateway, "--base", f"http://127.0.0.1:{port}",
            "--n", str(n), "--api", args.api, "--count", "1000" if args.gateway == "requests" else "300"]
    for _ in range(args.reps):
        child = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert child.stdin is not None and child.stderr is not None
        await child.stderr.readline()  # warmed up
        profiler.start()
        out, _ = await child.communicate(b"go\n")
        profiler.stop()
        print(out.decode().strip(), file=sys.stderr)
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
