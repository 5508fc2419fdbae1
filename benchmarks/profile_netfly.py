"""Profile netfly's streaming hot path against the benchmark server, with pyinstrument.

    python benchmarks/profile_netfly.py                 # orjson, if installed
    python benchmarks/profile_netfly.py --stdlib-json   # the json fallback

Streams ``--n`` chunks ``--reps`` times through ``FreeNetfly.create_async_generator`` and prints
pyinstrument's call tree of that loop only (imports and server start-up are left out). For a
sampling profile of a whole process, ``py-spy record -o out.svg -- python ...`` works as well.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--stdlib-json", action="store_true", help="hide orjson from netfly")
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


if __name__ == "__main__":
    sys.exit(main())
