"""The gateway with a configuration file (3 providers, 5 keys, limits on) against flags only.

    python benchmarks/gateway_config.py [--streams 200] [--chunks 500] [--reps 5]

Starts three upstreams (benchmarks/server.py, one process each), then runs ``netfly serve`` twice,
each in its own process: once with ``--url`` (flag-only: no keys, no limits) and once with a
``--config`` file whose model group spreads over the three upstreams by weight and whose five keys
all have requests-per-minute, tokens-per-minute and concurrent-stream limits (high enough not to
refuse anything: the cost of checking them is what is measured). A client in this process opens
``--streams`` streamed completions at once (keys taken in turn) and counts the chunks relayed.
Runs rotate through the gateways (a third: the same file without keys, to tell the cost of routing
from the cost of keys and limits); medians, ratios and the gateway's CPU per chunk are printed
(goal: the file with limits >= 90 % of flags only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
from run import HERE, background, free_port

KEYS = [f"nf-bench-key-{i}" for i in range(5)]


@contextlib.contextmanager
def process(argv: Sequence[str], port: int, what: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, its output in ``log``; stopped by its own pid on the way out."""
    with log.open("wb") as out, background(argv, port, what, out) as child:
        yield child


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config_file(directory: Path, upstreams: list[int], keyed: bool = True) -> Path:
    providers = "\n".join(f'[providers.up{i}]\nurl = "http://127.0.0.1:{port}"\n' for i, port in enumerate(upstreams))
    targets = ", ".join(f'{{ provider = "up{i}", weight = {i + 1} }}' for i in range(len(upstreams)))
    keys = "\n".join(
        f'[keys.team{i}]\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        f'models = ["bench"]\nrpm = 100000\ntpm = 1000000000\nmax_streams = 1000\n'
        for i, key in enumerate(KEYS)
    ) if keyed else ""
    path = directory / ("netfly.toml" if keyed else "netfly-open.toml")
    path.write_text(f'{providers}\n[models.bench]\nstrategy = "weighted"\ntargets = [{targets}]\n\n{keys}')
    return path


async def drive(base: str, streams: int, chunks: int, keyed: bool | None, pid: int) -> tuple[float, float]:
    """Chunks relayed per second with ``streams`` streams at once, and the gateway's CPU µs a chunk."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(index: int) -> int:
            headers = {"Authorization": f"Bearer {KEYS[index % len(KEYS)]}"} if keyed else {}
            body = {"model": "m" if keyed is False else "bench", "stream": True, "max_tokens": chunks,
                    "messages": [{"role": "user", "content": "go"}]}
            async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200 or not data.rstrip().endswith(b"data: [DONE]"):
                    raise RuntimeError(f"stream {index}: HTTP {response.status}: {data[:200]!r}")
                return data.count(b"\ndata: ") + 1

        await one(0)  # warm-up: connections and first-request costs out of the figure
        cpu, started = cpu_seconds(pid), time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        return sum(counts) / wall, cpu * 1e6 / sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    upstreams = [free_port() for _ in range(3)]
    gateway = free_port()
    serve = [sys.executable, "-m", "netfly", "serve", "--host", "127.0.0.1", "--port", str(gateway)]
    modes = {
        "flags only (--url, no keys)": (lambda d: [*serve, "--url", f"http://127.0.0.1:{upstreams[0]}"], False),
        "config: 3 providers, 5 keys, limits": (lambda d: [*serve, "--config", str(config_file(d, upstreams))], True),
        "config: 3 providers, no keys": (lambda d: [*serve, "--config", str(config_file(d, upstreams, False))], None),
    }
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        for i, port in enumerate(upstreams):
            argv = [sys.executable, str(HERE / "server.py"), "--port", str(port), "--prebuild", str(args.chunks)]
            stack.enter_context(process(argv, port, f"upstream {i}", directory / f"upstream{i}.log"))
        for rep in range(args.reps):
            for name, (argv_for, keyed) in (modes.items() if rep % 2 == 0 else reversed(modes.items())):
                with process(argv_for(directory), gateway, name, directory / "gateway.log") as child:
                    rate, cpu = asyncio.run(drive(f"http://127.0.0.1:{gateway}", args.streams, args.chunks, keyed,
                                                  child.pid))
                figures[name].append((rate, cpu))
                print(f"  rep {rep + 1}: {name}: {rate:,.0f} chunks/s, gateway CPU {cpu:.1f} µs/chunk", flush=True)
    print(f"\n{args.streams} concurrent streams x {args.chunks} chunks through netfly serve "
          f"(median of {args.reps}):\n")
    print("| gateway | chunks/s | vs flags only | gateway CPU µs/chunk |\n|---|---:|---:|---:|")
    baseline = statistics.median(rate for rate, _ in next(iter(figures.values())))
    for name, runs in figures.items():
        rate, cpu = statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.0%} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
