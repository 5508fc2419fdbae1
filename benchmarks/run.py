"""netfly against its peers, on the same bytes, in one run on this machine.

    python benchmarks/run.py            # the full run (several minutes)
    python benchmarks/run.py --quick    # a smoke run (under a minute)

Starts the upstream (benchmarks/server.py) in its own process, then measures every client in a
fresh process of its own per run (so CPU time and peak RSS are the client's alone), interleaving the
clients across repetitions so a noisy neighbour hurts them all alike. Prints Markdown tables with
ratios to the raw-aiohttp floor and writes the figures as JSON to benchmarks/results/.

Modes: ``single`` (one stream of 20,000 chunks, median of >= 5 runs), ``concurrent`` (200 streams x
500 chunks through one client) and ``gateway`` (the openai SDK through ``netfly serve`` vs directly).
Peers come from the ``bench`` extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALL_CLIENTS = ["floor", "netfly", "netfly-json", "httpx-sse", "g4f", "openai"]
NAMES = {
    "floor": "aiohttp (floor)",
    "netfly": "netfly",
    "netfly-json": "netfly, stdlib json (no orjson)",
    "httpx-sse": "httpx + httpx-sse",
    "g4f": "gpt4free (g4f)",
    "openai": "openai SDK",
}
PACKAGES = ["netfly", "aiohttp", "orjson", "openai", "httpx", "httpx-sse", "g4f"]
WORKER_TIMEOUT = 900
LATENCY_CHUNKS = 16  # short streams for time to first token, so throughput does not blur it
LATENCY_STREAMS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening: {error[-300:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {limit} s")


@contextlib.contextmanager
def background(
    argv: Sequence[str], port: int, what: str, log: Any = subprocess.PIPE
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, stopped (by its own pid) on the way out; its stderr goes to ``log`` (an open
    file for a chatty server: an unread pipe would fill and stall it)."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for_port(port, process, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_worker(client: str, mode: str, base: str, n: int, streams: int = 0) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "clients.py"), client, mode, "--base", base, "--n", str(n)]
    if streams:
        argv += ["--streams", str(streams)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"worker timed out after {WORKER_TIMEOUT} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        return {"ok": False, "error": f"worker exit {done.returncode}: {tail[:300]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def measure_stream(client: str, base: str, n: int) -> dict[str, Any]:
    """One long stream (throughput, CPU, TTFT inside a burst) then short streams (TTFT alone)."""
    result = run_worker(client, "single", base, n)
    if result.get("skipped"):
        return result
    latency = run_worker(client, "latency", base, LATENCY_CHUNKS, LATENCY_STREAMS)
    result["latency"] = latency
    result["ok"] = bool(result.get("ok") and latency.get("ok"))
    if not latency.get("ok"):
        result["error"] = result.get("error") or f"short streams: {latency.get('error')}"
    return result


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def interleaved(clients: list[str], reps: int, measure: Any, label: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``measure(client)`` ``reps`` times per client, rotating the order every repetition."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
    skipped: set[str] = set()
    for rep in range(reps):
        order = clients[rep % len(clients):] + clients[: rep % len(clients)]
        for client in order:
            if client in skipped:
                continue
            result = measure(client)
            runs[client].append(result)
            status = result.get("skipped") or result.get("error") or f"{result.get('wall', 0):.3f} s"
            print(f"  [{label} {rep + 1}/{reps}] {client:<12} {status}", file=sys.stderr, flush=True)
            if result.get("skipped"):
                skipped.add(client)
    return runs


def summarise_single(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok": False, "error": next((r.get("skipped") or r.get("error") for r in runs), "no runs")}
    wall = median(good, "wall")
    assert wall is not None
    latencies = [r["latency"] for r in good if r.get("latency", {}).get("ttft") is not None]
    return {
        "ok": len(good) == len(runs),
        "latency_ttft": median(latencies, "ttft"),
        "runs": len(runs),
        "wall": wall,
        "chunks_per_s": n / wall,
        "cpu": median(good, "cpu"),
        "ttft": median(good, "ttft"),
        "json": good[0].get("json"),
    }


def summarise_concurrent(runs: list[dict[str, Any]], n: int, streams: int) -> dict[str, Any]:
    measured = [r for r in runs if "wall" in r]
    if not measured:
        return {"ok": False, "error": next((r.get("skipped") or r.get("error") for r in runs), "no runs")}
    errors: dict[str, int] = {}
    for r in measured:
        for name, count in r.get("errors", {}).items():
            errors[name] = errors.get(name, 0) + count
    wall = median(measured, "wall")
    assert wall is not None
    return {
        "ok": all(r.get("ok") for r in runs),
        "runs": len(runs),
        "wall": wall,
        "chunks_per_s": n * streams / wall,
        "cpu": median(measured, "cpu"),
        "failures": max(r["failures"] for r in measured),
        "errors": errors,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in measured),
        "rss_before_mib": median(measured, "rss_before_mib"),
    }


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}x"


def single_table(summary: dict[str, dict[str, Any]], n: int, reps: int) -> str:
    floor = summary.get("floor", {}).get("wall")
    rows = [
        f"One stream of {n:,} chunks (median of {reps} interleaved runs). TTFT: time to the first text, "
        f"inside that stream and over {LATENCY_STREAMS} short streams of {LATENCY_CHUNKS} chunks per run",
        "",
        "| client | wall (s) | chunks/s | wall vs floor | CPU (s) | TTFT (ms) | TTFT short (ms) | text |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for client, s in summary.items():
        if "wall" not in s:
            rows.append(f"| {NAMES[client]} | — | — | — | — | — | — | {s.get('error')} |")
            continue
        ttft = s["ttft"] * 1000 if s["ttft"] is not None else None
        short = s["latency_ttft"] * 1000 if s.get("latency_ttft") is not None else None
        rows.append(
            f"| {NAMES[client]} | {s['wall']:.3f} | {s['chunks_per_s']:,.0f} | {ratio(s['wall'], floor)} | "
            f"{fmt(s['cpu'], '.3f')} | {fmt(ttft, '.2f')} | {fmt(short, '.2f')} | {'exact' if s['ok'] else 'WRONG'} |"
        )
    return "\n".join(rows)


def concurrent_table(summary: dict[str, dict[str, Any]], n: int, streams: int, reps: int) -> str:
    floor = summary.get("floor", {}).get("wall")
    rows = [
        f"{streams} concurrent streams x {n} chunks through one client (median wall of {reps} runs; "
        "failures and RSS: worst run)",
        "",
        "| client | wall (s) | wall vs floor | chunks/s | failures | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for client, s in summary.items():
        if "wall" not in s:
            rows.append(f"| {NAMES[client]} | — | — | — | {s.get('error')} | — |")
            continue
        failures = str(s["failures"])
        if s["errors"]:
            failures += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) + ")"
        rows.append(
            f"| {NAMES[client]} | {s['wall']:.3f} | {ratio(s['wall'], floor)} | {s['chunks_per_s']:,.0f} | "
            f"{failures} | {s['peak_rss_mib']:.0f} |"
        )
    return "\n".join(rows)


def gateway_table(summary: dict[str, dict[str, Any]], n: int, reps: int) -> str:
    direct = summary.get("direct", {})
    rows = [
        f"The openai SDK through `netfly serve` vs directly: one stream of {n:,} chunks (median of {reps} runs); "
        f"time to first token: median over {reps} x {LATENCY_STREAMS} short streams of {LATENCY_CHUNKS} chunks",
        "",
        "| path | wall (s) | chunks/s | chunks/s vs direct | TTFT (ms) | TTFT added (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, s in summary.items():
        if "wall" not in s:
            rows.append(f"| {path} | — | — | — | — | {s.get('error')} |")
            continue
        share = s["chunks_per_s"] / direct["chunks_per_s"] * 100 if "chunks_per_s" in direct else None
        ttft = s.get("latency_ttft")
        added = None
        if path != "direct" and ttft is not None and direct.get("latency_ttft") is not None:
            added = (ttft - direct["latency_ttft"]) * 1000
        rows.append(
            f"| {path} | {s['wall']:.3f} | {s['chunks_per_s']:,.0f} | {fmt(share, '.0f')}% | "
            f"{fmt(ttft and ttft * 1000, '.2f')} | {fmt(added, '+.2f')} |"
        )
    return "\n".join(rows)


def gateway_available() -> bool:
    """Whether this netfly has the ``serve`` command (the gateway)."""
    probe = [sys.executable, "-m", "netfly", "serve", "--help"]
    return subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer, smaller runs")
    parser.add_argument("--modes", default="single,concurrent,gateway")
    parser.add_argument("--clients", default=",".join(ALL_CLIENTS))
    parser.add_argument("--reps", type=int, help="single-stream repetitions (default 5; --quick 2)")
    parser.add_argument("--n", type=int, help="chunks in the single stream (default 20000; --quick 5000)")
    parser.add_argument("--streams", type=int, help="concurrent streams (default 200; --quick 50)")
    parser.add_argument("--stream-chunks", type=int, help="chunks per concurrent stream (default 500)")
    parser.add_argument("--concurrent-reps", type=int, help="concurrent repetitions (default 3; --quick 1)")
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/bench-<time>.json)")
    args = parser.parse_args()
    quick = args.quick
    reps = args.reps or (2 if quick else 5)
    n = args.n or (5000 if quick else 20000)
    streams = args.streams or (50 if quick else 200)
    stream_chunks = args.stream_chunks or (200 if quick else 500)
    creps = args.concurrent_reps or (1 if quick else 3)
    modes = [m for m in args.modes.split(",") if m]
    clients = [c for c in args.clients.split(",") if c]
    unknown = [c for c in clients if c not in NAMES]
    unknown += [m for m in modes if m not in ("single", "concurrent", "gateway")]
    if unknown:
        parser.error(f"unknown client or mode: {', '.join(unknown)}")

    started = datetime.now(timezone.utc)
    command = "python benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    report: dict[str, Any] = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "versions": versions(),
        "parameters": {"reps": reps, "n": n, "streams": streams, "stream_chunks": stream_chunks,
                       "concurrent_reps": creps},
    }
    tables: list[str] = []
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = [sys.executable, str(HERE / "server.py"), "--port", str(port),
              "--prebuild", f"{n},{stream_chunks},64"]
    with background(server, port, "benchmark server"):
        if "single" in modes:
            print(f"single stream: {n} chunks x {reps} runs", file=sys.stderr)
            runs = interleaved(clients, reps, lambda c: measure_stream(c, base, n), "single")
            summary = {c: summarise_single(r, n) for c, r in runs.items()}
            report["single"] = {"summary": summary, "runs": runs}
            tables.append(single_table(summary, n, reps))
        if "concurrent" in modes:
            print(f"concurrent: {streams} x {stream_chunks} chunks x {creps} runs", file=sys.stderr)
            runs = interleaved(
                clients, creps, lambda c: run_worker(c, "concurrent", base, stream_chunks, streams), "concurrent"
            )
            summary = {c: summarise_concurrent(r, stream_chunks, streams) for c, r in runs.items()}
            report["concurrent"] = {"summary": summary, "runs": runs}
            tables.append(concurrent_table(summary, stream_chunks, streams, creps))
        if "gateway" in modes:
            tables.append(gateway_mode(report, base, n, reps))

    heading = (
        f"`{command}` — {started:%Y-%m-%d}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
        f"(load average at start {os.getloadavg()[0]:.2f})"
    )
    print("\n" + heading + "\n\n" + "\n\n".join(tables))
    RESULTS.mkdir(exist_ok=True)
    output = args.output or RESULTS / f"bench-{started:%Y%m%d-%H%M%S}.json"
    output.write_text(json.dumps(report, indent=2))
    (RESULTS / "latest.md").write_text(heading + "\n\n" + "\n\n".join(tables) + "\n")
    print(f"\nJSON written to {output}", file=sys.stderr)
    return 0


def gateway_mode(report: dict[str, Any], base: str, n: int, reps: int) -> str:
    """The openai SDK against the server directly and through ``netfly serve``, interleaved."""
    if not gateway_available():
        report["gateway"] = {"skipped": "this netfly has no `serve` command"}
        return "Gateway: skipped (this netfly has no `netfly serve` command yet)"
    port = free_port()
    gateway = [sys.executable, "-m", "netfly", "serve", "--url", base, "--host", "127.0.0.1", "--port", str(port)]
    print(f"gateway: openai SDK, {n} chunks x {reps} runs, direct and through {' '.join(gateway[1:])}",
          file=sys.stderr)
    targets = {"direct": base, "through netfly serve": f"http://127.0.0.1:{port}"}

    try:
        with background(gateway, port, "netfly serve"):
            runs = interleaved(list(targets), reps, lambda t: measure_stream("openai", targets[t], n), "gateway")
    except RuntimeError as exc:
        report["gateway"] = {"command": gateway, "error": str(exc)}
        return f"Gateway: failed to start `{' '.join(gateway[1:])}`: {exc}"
    summary = {t: summarise_single(r, n) for t, r in runs.items()}
    report["gateway"] = {"command": gateway, "summary": summary, "runs": runs}
    return gateway_table(summary, n, reps)


if __name__ == "__main__":
    sys.exit(main())
