"""The cost of shared state (``netfly serve --state redis://…``), on loopback.

    python benchmarks/shared_state.py [--requests 400] [--streams 200] [--chunks 500] [--reps 3]

Needs ``redis-server`` on PATH (started here on a free port, no persistence) and the three
upstreams of benchmarks/server.py. Prints:

1. the latency Redis adds to a request: ``--requests`` one-chunk requests one after the other, with
   a key that has rpm, tpm and max_streams limits, against the same gateway with its state in memory
   (p50 and p99 of each, and the difference);
2. throughput of ``--workers 1`` and ``--workers 2`` (both on Redis) at ``--streams`` concurrent
   streams of ``--chunks`` chunks, with the gateway processes' CPU per chunk;
3. what Redis spends on netfly: its commands and CPU per request during (2), and so the requests
   per second one Redis core serves for netfly's calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from gateway_config import KEYS, config_file, cpu_seconds, drive, process
from run import HERE, free_port


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--appendonly", "no"]
    with process(argv, port, "redis-server", directory / "redis.log"):
        yield port


def redis_info(port: int) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"INFO all\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        header, _, data = data.partition(b"\r\n")  # a bulk string: $LENGTH, then the text
        while len(data) < int(header[1:]):
            data += sock.recv(65536)
    return dict(line.split(":", 1) for line in data.decode().splitlines() if ":" in line and not line.startswith("#"))


def redis_usage(port: int) -> tuple[float, int]:
    """Redis's CPU seconds and commands processed so far."""
    info = redis_info(port)
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), int(info["total_commands_processed"])


def children_cpu(pid: int) -> float:
    """CPU of a supervisor's workers (or of the process itself when it has none)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(cpu_seconds(int(kid)) for kid in kids) if kids else cpu_seconds(pid)


async def latencies(base: str, count: int) -> list[float]:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "bench", "stream": True, "max_tokens": 1, "messages": [{"role": "user", "content": "go"}]}
    found = []
    async with aiohttp.ClientSession() as session:
        for index in range(count + 20):
            began = time.perf_counter()
            async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            if index >= 20:  # warm-up excluded
                found.append(time.perf_counter() - began)
    return found


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    upstreams, gateway = [free_port() for _ in range(3)], free_port()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        for i, port in enumerate(upstreams):
            argv = [sys.executable, str(HERE / "server.py"), "--port", str(port), "--prebuild", str(args.chunks)]
            stack.enter_context(process(argv, port, f"upstream {i}", directory / f"upstream{i}.log"))
        redis_port = stack.enter_context(redis_server(directory))
        config = config_file(directory, upstreams)
        serve = [sys.executable, "-m", "netfly", "serve", "--config", str(config), "--port", str(gateway)]
        state = ["--state", f"redis://127.0.0.1:{redis_port}/0"]
        base = f"http://127.0.0.1:{gateway}"

        print(f"1. latency of one-chunk requests, one at a time ({args.requests}), key with rpm/tpm/max_streams:\n")
        print("| state | p50 ms | p99 ms |\n|---|---:|---:|")
        measured = {}
        for name, extra in (("memory", []), ("redis", state)):
            with process([*serve, *extra], gateway, name, directory / "gateway.log"):
                measured[name] = asyncio.run(latencies(base, args.requests))
            print(f"| {name} | {percentile(measured[name], 0.5) * 1000:.2f} | "
                  f"{percentile(measured[name], 0.99) * 1000:.2f} |")
        for share, label in ((0.5, "p50"), (0.99, "p99")):
            added = percentile(measured["redis"], share) - percentile(measured["memory"], share)
            print(f"| added by Redis, {label} | {added * 1000:+.2f} | |" if label == "p50" else
                  f"| added by Redis, {label} | | {added * 1000:+.2f} |")

        print(f"\n2. {args.streams} concurrent streams x {args.chunks} chunks, state in Redis "
              f"(median of {args.reps}):\n")
        print("| workers | chunks/s | gateway CPU µs/chunk | Redis commands/request | Redis CPU µs/request |")
        print("|---|---:|---:|---:|---:|")
        for workers in (1, 2):
            runs = []
            for _ in range(args.reps):
                argv = [*serve, *state, "--workers", str(workers)]
                with process(argv, gateway, f"{workers} worker(s)", directory / "gateway.log") as child:
                    time.sleep(1.0)  # every worker listening
                    cpu_before, (redis_cpu, commands) = children_cpu(child.pid), redis_usage(redis_port)
                    rate, _ = asyncio.run(drive(base, args.streams, args.chunks, True, child.pid))
                    gateway_cpu = children_cpu(child.pid) - cpu_before
                    redis_after, commands_after = redis_usage(redis_port)
                requests = args.streams + 1
                runs.append((rate, gateway_cpu * 1e6 / (args.streams * args.chunks),
                             (commands_after - commands) / requests, (redis_after - redis_cpu) * 1e6 / requests))
                fallbacks = [line for line in (directory / "gateway.log").read_text().splitlines()
                             if "unavailable" in line]
                if fallbacks:
                    print(f"  ({workers} worker(s): state fell back to memory {len(fallbacks)} time(s): "
                          f"{fallbacks[0]})")
            rate, cpu, commands_each, redis_each = (statistics.median(r[i] for r in runs) for i in range(4))
            print(f"| {workers} | {rate:,.0f} | {cpu:.1f} | {commands_each:.1f} | {redis_each:.0f} |")
        print(f"\n3. one Redis core at that cost serves about {1e6 / redis_each:,.0f} netfly requests/s "
              "(its CPU per request above; loopback, this machine)")


if __name__ == "__main__":
    main()
