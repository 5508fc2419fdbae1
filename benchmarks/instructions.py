"""Instructions ``netfly serve`` runs per request or per chunk, counted by callgrind.

    python benchmarks/instructions.py                       # this checkout, every case
    python benchmarks/instructions.py --cases requests,keyed
    python benchmarks/instructions.py --src /other/tree/src # another tree's code, for an A/B

The steadiest figure of what a change costs: on a shared 2-core machine the walls of
benchmarks/gateway.py move by up to 1.5x between runs, a count of instructions by about 1 %. It says
nothing of system calls, waits or caches (an instruction of a cold path costs several of a warm
loop's), so it complements the walls, it does not replace them.

The gateway runs under ``valgrind --tool=callgrind`` (``apt-get install valgrind``) with counting
off; a first client run warms it up, then counting is switched on for exactly one measured client run
(benchmarks/gateway_client.py, raw aiohttp in its own process, exact text checked). Cases:

  requests   a non-streamed request, one at a time (flags only: ``--url``)
  keyed      the same with a key, RPM/TPM/stream limits and metrics (benchmarks/gateway.py's file)
  latency    a 16-chunk stream, one at a time
  chunk200   a chunk of 200 concurrent streams x 500 chunks
  chunk      a chunk of one 20,000-chunk stream

Prints Markdown and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway import NETFLY_KEY, env_set, netfly_config
from run import HERE, RESULTS, background, free_port

SRC = HERE.parent / "src"


@dataclass(frozen=True)
class Case:
    """One measured client run: its mode and arguments, and how many units it is divided by."""

    mode: str
    args: tuple[str, ...]
    units: int
    unit: str
    keyed: bool = False


def cases(count: int) -> dict[str, Case]:
    requests = ("--n", "16", "--count", str(count), "--concurrency", "1")
    return {
        "requests": Case("requests", requests, count, "request"),
        "keyed": Case("requests", requests, count, "request", keyed=True),
        "latency": Case("latency", ("--n", "16", "--count", str(count)), count, "stream"),
        "chunk200": Case("concurrent", ("--n", "500", "--streams", "200"), 200 * 500, "chunk"),
        "chunk": Case("single", ("--n", "20000"), 20_000, "chunk"),
    }


def client(base: str, case: Case, counted_pid: int | None) -> dict[str, Any]:
    """One client run; with ``counted_pid``, callgrind counts exactly its measured part."""
    argv = [sys.executable, str(HERE / "gateway_client.py"), case.mode, "--base", base, *case.args]
    if case.keyed:
        argv += ["--model", "bench", "--key", NETFLY_KEY]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        for line in process.stderr:  # its warm-up done, it waits for a line on stdin
            if line.strip() == "ready":
                break
        if counted_pid is not None:
            callgrind(counted_pid, "-i", "on")
        process.stdin.write("\n")
        process.stdin.flush()
        out = process.stdout.read()
        process.wait()
    if counted_pid is not None:
        callgrind(counted_pid, "-i", "off")
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"ok": False, "error": f"client exit {process.returncode}"}


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(name: str, case: Case, src: Path, work: Path, upstream: str) -> dict[str, Any]:
    """Instructions per unit of ``case`` on a gateway of ``src`` (a fresh process under callgrind)."""
    out = work / f"{name}.callgrind"
    how = ["--config", str(netfly_config(work, upstream))] if case.keyed else ["--url", upstream]
    port = free_port()
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "netfly", "serve", "--host", "127.0.0.1", "--port", str(port), *how]
    env = {"PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(env_set(env))
        log = stack.enter_context((work / f"{name}.log").open("wb"))
        gateway = stack.enter_context(background(argv, port, f"netfly serve under callgrind ({name})", log))
        base = f"http://127.0.0.1:{port}"
        client(base, case, None)  # warm-up: first-call paths and caches out of the count
        result = client(base, case, gateway.pid)
        callgrind(gateway.pid, "-d")
    total = sum(int(line.split()[1]) for path in work.glob(f"{name}.callgrind*")
                for line in path.read_text().splitlines() if line.startswith("totals:"))
    return {"ok": bool(result.get("ok")), "error": result.get("error"), "instructions": total,
            "units": case.units, "unit": case.unit, "per_unit": round(total / case.units)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="requests,keyed,latency,chunk200,chunk")
    parser.add_argument("--src", type=Path, default=SRC, help="the netfly sources to measure (default: this tree's)")
    parser.add_argument("--count", type=int, default=300, help="requests or streams of the per-request cases")
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)}: apt-get install valgrind", file=sys.stderr)
        return 2
    known = cases(args.count)
    chosen = [c for c in args.cases.split(",") if c]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="netfly-instructions-") as tmp:
        work, port = Path(tmp), free_port()
        upstream_argv = [sys.executable, str(HERE / "server.py"), "--port", str(port), "--prebuild", "16,500,20000"]
        with (work / "upstream.log").open("wb") as log, background(upstream_argv, port, "upstream", log):
            for name in chosen:
                results[name] = measure(name, known[name], args.src.resolve(), work, f"http://127.0.0.1:{port}")
    report(results, args.src.resolve(), started)
    return 0 if all(r["ok"] for r in results.values()) else 1


def report(results: dict[str, dict[str, Any]], src: Path, started: datetime) -> None:
    print(f"\nInstructions of `netfly serve` ({src}), callgrind, {started:%Y-%m-%d %H:%M} UTC:\n")
    print("| case | instructions per unit | units | text |")
    print("|---|---:|---:|---|")
    for name, r in results.items():
        text = "exact" if r["ok"] else f"FAILED: {r['error']}"
        print(f"| {name} | {r['per_unit']:,} a {r['unit']} | {r['units']:,} | {text} |")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"instructions-{started:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps({"started": started.isoformat(), "src": str(src), "results": results}, indent=2))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    sys.exit(main())
