"""Gateways against talking to the upstream directly: netfly serve, LiteLLM's proxy, g4f's API server.

    python benchmarks/gateway.py            # the full run (netfly ~2 min; each peer several more)
    python benchmarks/gateway.py --quick    # a smoke run
    python benchmarks/gateway.py --targets direct,netfly,netfly-limits   # a subset

Starts the upstream (benchmarks/server.py), ``netfly serve`` (flags only, on uvloop; the same on
asyncio's loop; a config file with a key, limits and metrics), a bare aiohttp relay
(benchmarks/aiohttp_relay.py: bytes passed on unread, the floor of any aiohttp gateway), the same
relay without aiohttp (benchmarks/lean_relay.py: asyncio protocols and httptools, on asyncio's loop
and on uvloop), and — when installed — LiteLLM's proxy (``litellm --config``, one worker, no
database) and g4f's API server
(benchmarks/g4f_api.py), each in its own process. Every
measurement runs in a fresh client process (benchmarks/gateway_client.py, raw aiohttp) that checks
the exact text; targets are interleaved so a noisy neighbour hurts them all alike. The gateway's CPU
seconds (``/proc/PID/stat``) and peak RSS (``VmHWM``, reset before each measurement) are its own.

Measurements: one stream of 20,000 chunks (median of 5), time to first token over 30 streams of 16
chunks (median per run, median of 5 runs), 200 concurrent streams x 500 chunks (median of 3), and
1,000 non-streamed requests at concurrency 50 (median of 7: a run lasts under half a second, so one
slow moment moves it by a third). The Responses and Messages adapters of netfly get their own rows,
compared with direct chat completions. Prints Markdown, writes JSON to
benchmarks/results/ (goals: issue 15).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import payload
from gateway_config import cpu_seconds
from run import HERE, RESULTS, background, free_port, versions

NETFLY_KEY = "nf-bench-key-0"
LITELLM_KEY = "sk-netfly-bench-0123456789abcdef0123456789"  # LiteLLM refuses to start without a master key
WORKER_TIMEOUT = 900


@dataclass
class Target:
    """One way of reaching the upstream: where, with which API, and the process in between."""

    name: str
    base: str
    pid: int | None  # the gateway's process (None: direct)
    api: str = "chat"
    model: str = payload.MODEL
    key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- the processes -------------------------------------------------------------------------------


def netfly_config(directory: Path, upstream: str) -> Path:
    """One provider, one model group, one key with every limit (high enough to refuse nothing),
    metrics on: what an operator runs."""
    digest = hashlib.sha256(NETFLY_KEY.encode()).hexdigest()
    path = directory / "netfly.toml"
    path.write_text(
        f'[server]\nmetrics = true\n\n[providers.up]\nurl = "{upstream}"\n\n'
        f'[models.bench]\ntargets = [{{ provider = "up" }}]\n\n'
        f'[keys.team]\nsha256 = "{digest}"\nmodels = ["bench"]\nrpm = 1000000\ntpm = 1000000000\n'
        f"max_streams = 10000\n"
    )
    return path


def litellm_config(directory: Path, upstream: str) -> Path:
    path = directory / "litellm.yaml"
    path.write_text(
        f"model_list:\n  - model_name: {payload.MODEL}\n    litellm_params:\n"
        f"      model: openai/{payload.MODEL}\n      api_base: {upstream}/v1\n      api_key: sk-bench\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\n"
    )
    return path


def servers(names: set[str], upstream: str, directory: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """argv and extra environment of each gateway process wanted."""
    serve = [sys.executable, "-m", "netfly", "serve", "--host", "127.0.0.1"]
    wanted: dict[str, tuple[list[str], dict[str, str]]] = {}
    if names & {"netfly", "netfly-responses", "netfly-messages"}:
        wanted["netfly"] = ([*serve, "--url", upstream], {})
    if "netfly-asyncio" in names:
        wanted["netfly-asyncio"] = ([*serve, "--url", upstream, "--loop", "asyncio"], {})
    if "aiohttp-relay" in names:
        wanted["aiohttp-relay"] = ([sys.executable, str(HERE / "aiohttp_relay.py"), "--upstream", upstream], {})
    lean = [sys.executable, str(HERE / "lean_relay.py"), "--upstream", upstream]
    if "lean-relay" in names and not missing("lean-relay"):
        wanted["lean-relay"] = (lean, {})
    if "lean-relay-uvloop" in names and not missing("lean-relay-uvloop"):
        wanted["lean-relay-uvloop"] = ([*lean, "--uvloop"], {})
    if "netfly-limits" in names:
        wanted["netfly-limits"] = ([*serve, "--config", str(netfly_config(directory, upstream))], {})
    litellm = shutil.which("litellm") or str(Path(sys.executable).with_name("litellm"))
    if "litellm" in names and Path(litellm).exists():
        wanted["litellm"] = ([litellm, "--config", str(litellm_config(directory, upstream)), "--host", "127.0.0.1",
                              "--num_workers", "1", "--telemetry", "False"],
                             {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})  # no cost map from the internet
    if "g4f" in names and importlib.util.find_spec("g4f") is not None:
        wanted["g4f"] = ([sys.executable, str(HERE / "g4f_api.py"), "--upstream", upstream, "--model",
                          payload.MODEL], {})
    return wanted


@contextlib.contextmanager
def gateway(argv: list[str], env: dict[str, str], name: str, log: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    with log.open("wb") as out, env_set(env), background([*argv, "--port", str(port)], port, name, out) as child:
        yield f"http://127.0.0.1:{port}", child.pid


@contextlib.contextmanager
def env_set(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def targets_for(names: list[str], upstream: str, started: dict[str, tuple[str, int]]) -> list[Target]:
    """The rows, in the order asked for; a gateway that did not start has none."""
    make: dict[str, Callable[[], Target]] = {
        "direct": lambda: Target("direct", upstream, None),
        "aiohttp-relay": lambda: Target("bare aiohttp relay (yardstick)", *started["aiohttp-relay"]),
        "lean-relay": lambda: Target("bare lean relay (asyncio + httptools)", *started["lean-relay"]),
        "lean-relay-uvloop": lambda: Target("bare lean relay (uvloop + httptools)", *started["lean-relay-uvloop"]),
        "netfly": lambda: Target("netfly serve", *started["netfly"]),
        "netfly-asyncio": lambda: Target("netfly serve --loop asyncio", *started["netfly-asyncio"]),
        "netfly-limits": lambda: Target("netfly serve, key + limits + metrics", *started["netfly-limits"],
                                        model="bench", key=NETFLY_KEY),
        "netfly-responses": lambda: Target("netfly serve, Responses API", *started["netfly"], api="responses"),
        "netfly-messages": lambda: Target("netfly serve, Messages API", *started["netfly"], api="messages"),
        "litellm": lambda: Target("LiteLLM proxy", *started["litellm"], key=LITELLM_KEY),
        "g4f": lambda: Target("g4f api", *started["g4f"]),
    }
    server_of = {"netfly-responses": "netfly", "netfly-messages": "netfly"}
    return [make[n]() for n in names if n == "direct" or server_of.get(n, n) in started]


# -- one measurement -----------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError):  # Linux 4.0+; else the peak is since the process started
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure(target: Target, mode: str, n: int, **options: int) -> dict[str, Any]:
    """One run of ``mode`` in a fresh client process, with the gateway's CPU and peak RSS over it."""
    argv = [sys.executable, str(HERE / "gateway_client.py"), mode, "--base", target.base, "--api", target.api,
            "--model", target.model, "--n", str(n), "--extra", json.dumps(target.extra)]
    argv += [f"--{k}={v}" for k, v in options.items()]
    if target.key:
        argv += ["--key", target.key]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert client.stdin is not None and client.stderr is not None
    try:
        client.stderr.readline()  # "ready": warmed up
        if target.pid is not None:
            reset_peak_rss(target.pid)
            cpu = cpu_seconds(target.pid)
        out, err = client.communicate("go\n", timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        return {"ok": False, "error": f"client timed out after {WORKER_TIMEOUT} s"}
    lines = out.strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"ok": False, "error": err.strip()[-300:]}
    if target.pid is not None:
        result["gateway_cpu"] = cpu_seconds(target.pid) - cpu
        result["gateway_peak_rss_mib"] = peak_rss_mib(target.pid)
    return result


def interleaved(targets: list[Target], reps: int, label: str, run: Callable[[Target], dict[str, Any]]
                ) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for rep in range(reps):
        for target in targets[rep % len(targets):] + targets[: rep % len(targets)]:
            result = run(target)
            runs[target.name].append(result)
            status = result.get("error") or " ".join(
                f"{k}={result[k]:.4g}" for k in ("wall", "ttft", "requests_per_s", "gateway_cpu") if result.get(k))
            print(f"  [{label} {rep + 1}/{reps}] {target.name:<40} {status}", file=sys.stderr, flush=True)
    return runs


# -- summaries -----------------------------------------------------------------------------------


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "wall" in r or "ttft" in r]
    return {
        "ok": bool(runs) and all(r.get("ok") for r in runs),
        "error": next((r.get("error") for r in runs if r.get("error")), None),
        "runs": len(runs),
        "wall": med(good, "wall"),
        "walls": [r.get("wall") for r in runs],
        "ttft": med(good, "ttft"),
        "requests_per_s": med(good, "requests_per_s"),
        "failures": max((r.get("failures", 0) for r in good), default=0),
        "gateway_cpu": med(good, "gateway_cpu"),
        "gateway_peak_rss_mib": max((r.get("gateway_peak_rss_mib", 0.0) for r in good), default=None),
    }


def cell(s: dict[str, Any], direct: dict[str, Any], key: str) -> str:
    """A figure with its ratio to direct (for req/s: the share of direct's), or the error."""
    value, base = s.get(key), direct.get(key)
    if value is None:
        return f"— ({(s.get('error') or 'no result')[:60]})"
    if key == "ttft":
        added = "" if s is direct or base is None else f" (+{(value - base) * 1000:.2f})"
        return f"{value * 1000:.2f} ms{added}"
    if key == "requests_per_s":
        return f"{value:,.0f} req/s" + ("" if s is direct or not base else f" ({value / base:.2f})")
    return f"{value:.3f} s" + ("" if s is direct or not base else f" ({value / base:.2f}x)")


def table(summary: dict[str, dict[str, dict[str, Any]]], names: list[str], params: dict[str, Any]) -> str:
    p = params
    head = [
        "| target | one stream, {n:,} chunks (median of {reps}) | TTFT, {ln}-chunk streams (median of {reps}x{lc}) "
        "| {streams} streams x {sc} chunks (median of {creps}) | {count:,} non-streamed at concurrency {conc} "
        "(median of {rreps}) |".format(**p),
        "|---|---|---|---|---|",
    ]
    direct = {mode: summary[mode].get("direct", {}) for mode in summary}
    rows = []
    for name in names:
        parts = []
        for mode, key in (("single", "wall"), ("latency", "ttft"), ("concurrent", "wall"),
                          ("requests", "requests_per_s")):
            s = summary.get(mode, {}).get(name)
            text = "—" if s is None else cell(s, direct[mode], key)
            if s is not None and mode == "concurrent" and s.get("wall") is not None:
                text += f", {s['failures']} failed"
                if s.get("gateway_peak_rss_mib"):
                    text += f", {s['gateway_peak_rss_mib']:.0f} MiB"
            if s is not None and s.get("wall") is not None and not s["ok"]:
                text += " WRONG"
            parts.append(text)
        rows.append(f"| {name} | " + " | ".join(parts) + " |")
    return "\n".join(head + rows)


def cpu_table(summary: dict[str, dict[str, dict[str, Any]]], names: list[str], params: dict[str, Any]) -> str:
    rows = ["| target | CPU s, one stream | µs/chunk | CPU s, concurrent | µs/chunk | CPU ms/request |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in names[1:]:
        single = summary.get("single", {}).get(name, {}).get("gateway_cpu")
        conc = summary.get("concurrent", {}).get(name, {}).get("gateway_cpu")
        reqs = summary.get("requests", {}).get(name, {}).get("gateway_cpu")
        per = params["streams"] * params["sc"]
        rows.append(
            f"| {name} | {_f(single, '.3f')} | {_f(single and single * 1e6 / params['n'], '.2f')} | "
            f"{_f(conc, '.3f')} | {_f(conc and conc * 1e6 / per, '.2f')} | "
            f"{_f(reqs and reqs * 1e3 / params['count'], '.3f')} |")
    return "\n".join(rows)


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


# -- the run -------------------------------------------------------------------------------------


ALL_TARGETS = ["direct", "aiohttp-relay", "lean-relay", "lean-relay-uvloop", "netfly", "netfly-asyncio",
               "netfly-limits", "netfly-responses", "netfly-messages", "litellm", "g4f"]
PACKAGES = ["netfly", "aiohttp", "orjson", "httptools", "uvloop", "litellm", "g4f"]
NEEDS = {"lean-relay": ("httptools",), "lean-relay-uvloop": ("httptools", "uvloop")}  # beyond netfly's own


def missing(name: str) -> list[str]:
    """The modules a target needs that are not installed."""
    return [module for module in NEEDS.get(name, ()) if importlib.util.find_spec(module) is None]


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "n": args.n or (5000 if quick else 20000), "reps": args.reps or (2 if quick else 5),
        "ln": 16, "lc": 10 if quick else 30,
        "streams": 50 if quick else 200, "sc": 200 if quick else 500,
        "creps": args.reps or (1 if quick else 3),
        "count": 200 if quick else 1000, "conc": 50, "rn": 64, "rreps": args.reps or (1 if quick else 7),
    }


def run_all(targets: list[Target], p: dict[str, Any], modes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    plans: dict[str, tuple[int, Callable[[Target], dict[str, Any]]]] = {
        "single": (p["reps"], lambda t: measure(t, "single", p["n"])),
        "latency": (p["reps"], lambda t: measure(t, "latency", p["ln"], count=p["lc"])),
        "concurrent": (p["creps"], lambda t: measure(t, "concurrent", p["sc"], streams=p["streams"])),
        "requests": (p["rreps"], lambda t: measure(t, "requests", p["rn"], count=p["count"], concurrency=p["conc"])),
    }
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        reps, run = plans[mode]
        runs = interleaved(targets, reps, mode, run)
        summary[mode] = {name: summarise(r) for name, r in runs.items()}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"of: {', '.join(ALL_TARGETS)}")
    parser.add_argument("--modes", default="single,latency,concurrent,requests")
    parser.add_argument("--reps", type=int,
                        help="repetitions of every mode (default: 5 single and latency, 3 concurrent, 7 non-streamed)")
    parser.add_argument("--n", type=int)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    names = ["direct", *(n for n in args.targets.split(",") if n and n != "direct")]
    unknown = set(names) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown target: {', '.join(sorted(unknown))}")
    p = parameters(args)
    started = datetime.now(timezone.utc)
    report: dict[str, Any] = {"command": " ".join(["python benchmarks/gateway.py", *sys.argv[1:]]),
                              "started": started.isoformat(timespec="seconds"), "parameters": p,
                              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                                          "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
                              "versions": versions(PACKAGES), "skipped": {}}
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    prebuild = f"{p['n']},{p['sc']},{p['ln']},{p['rn']}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        stack.enter_context(background([sys.executable, str(HERE / "server.py"), "--port", str(upstream_port),
                                        "--prebuild", prebuild], upstream_port, "upstream"))
        started_gateways = start_gateways(stack, set(names), upstream, directory, report)
        targets = targets_for(names, upstream, started_gateways)
        summary = run_all(targets, p, [m for m in args.modes.split(",") if m])
    report["summary"] = summary
    report["load_average_at_end"] = os.getloadavg()
    print_report(report, [t.name for t in targets], p, started, args.output)
    return 0


def start_gateways(stack: contextlib.ExitStack, names: set[str], upstream: str, directory: Path,
                   report: dict[str, Any]) -> dict[str, tuple[str, int]]:
    started: dict[str, tuple[str, int]] = {}
    for name, (argv, env) in servers(names, upstream, directory).items():
        print(f"starting {name}: {' '.join(argv[1:4])}…", file=sys.stderr, flush=True)
        try:
            started[name] = stack.enter_context(gateway(argv, env, name, directory / f"{name}.log"))
        except RuntimeError as exc:  # a peer that cannot start offline in bounded time: say why, skip it
            report["skipped"][name] = str(exc)
            print(f"  skipped {name}: {exc}", file=sys.stderr)
    for name in names - set(started) - {"direct", "netfly-responses", "netfly-messages"}:
        if name not in report["skipped"]:
            absent = missing(name)
            report["skipped"][name] = f"{', '.join(absent)} not installed (pip install -e '.[bench]')" if absent \
                else "not installed"
            print(f"  skipped {name}: {report['skipped'][name]}", file=sys.stderr)
    return started


def print_report(report: dict[str, Any], names: list[str], p: dict[str, Any], started: datetime,
                 output: Path | None) -> None:
    v = report["versions"]
    heading = (f"`{report['command']}` — {started:%Y-%m-%d}, Python {platform.python_version()}, "
               f"{os.cpu_count()} CPUs, load average {report['machine']['load_average_at_start'][0]:.2f} at start, "
               f"{report['load_average_at_end'][0]:.2f} at end; " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    skipped = "".join(f"\n\nSkipped {k}: {why}" for k, why in report["skipped"].items())
    text = (heading + "\n\n" + table(report["summary"], names, p) + "\n\nGateway CPU (median run):\n\n"
            + cpu_table(report["summary"], names, p) + skipped)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    path = output or RESULTS / f"gateway-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    (RESULTS / "gateway-latest.md").write_text(text + "\n")
    print(f"\nJSON written to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
