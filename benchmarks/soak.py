"""Soak: ``netfly serve`` under mixed normal, faulty and hostile traffic for a bounded time.

    python benchmarks/soak.py                 # 60 s
    python benchmarks/soak.py --seconds 300 --concurrency 32
    python benchmarks/soak.py --seconds 180 --without huge_event --sample 15
    MALLOC_ARENA_MAX=2 python benchmarks/soak.py --probe /tmp/probe   # see benchmarks/gateway_probe.py

Runs a loopback upstream in this process and ``netfly serve`` as a child process in front of it
(127.0.0.1 only). Workers send, until the time is up:

- normal chat completions, streamed and not, whose text must come back exactly;
- faulty ones: the upstream answers 500, cuts the stream, sends a malformed chunk, reports an error
  in-stream, or sends one event larger than the decoder's limit (each must fail cleanly, not hang);
- hostile ones: heads that never finish, bodies sent byte by byte, idle connections, non-UTF-8
  Authorization bytes, junk bodies and 64 KiB model names with control characters.

Prints requests served, faults injected, hostile requests, the gateway's RSS and open file
descriptors at start, every ``--sample`` seconds (a curve that flattens is allocator high-water,
one that keeps climbing is a leak) and at end, and every request whose text was not exact (or that
got a 5xx where none was due). ``--without KIND`` leaves a fault kind out; the gateway inherits the
environment (``MALLOC_ARENA_MAX`` and the like). ``--probe DIR`` runs the gateway under
``gateway_probe.py``, which writes tracemalloc and object-count reports to DIR at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import socket
import sys
import time

import aiohttp
from aiohttp import web

TOKEN = "soak-token-0f3a"
FAULTS = ("status500", "cut", "malformed", "instream_error", "huge_event")


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def expected_text(seed: int) -> str:
    rng = random.Random(seed)
    pieces = ["alpha ", "beta ", "\u00e9t\u00e9 ", "\U0001f600 ", "\u4e2d\u6587 ", "\\n ", '"q" ']
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))


async def upstream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = body["model"]
    if model == "status500":
        return web.json_response({"error": {"message": "upstream broke"}}, status=500)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if model.startswith("normal-"):
        text = expected_text(int(model.split("-")[1]))
        for i in range(0, len(text), 7):
            await response.write(_chunk(text[i : i + 7]))
        await response.write(_chunk(finish="stop") + b"data: [DONE]\n\n")
    elif model == "cut":
        await response.write(_chunk("partial "))
        request.transport.close()  # type: ignore[union-attr]
        return response
    elif model == "malformed":
        await response.write(b"data: {not json\n\n" + _chunk("after ") + _chunk(finish="stop") + b"data: [DONE]\n\n")
    elif model == "instream_error":
        await response.write(_chunk("x") + b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    elif model == "huge_event":
        try:
            for _ in range(160):  # 10 MiB of data lines, never a blank line: over the 8 MiB event limit
                await response.write(b"data: xxxxxxxxxxxxxxxx\n" * 2900)
        except ConnectionError:
            return response
    await response.write_eof()
    return response


class Tally:
    def __init__(self, faults: tuple[str, ...] = FAULTS) -> None:
        self.faults = faults
        self.counts: collections.Counter[str] = collections.Counter()
        self.wrong: list[str] = []
        self.samples: list[tuple[float, float, int]] = []  # seconds in, RSS MiB, open FDs


async def normal(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    seed = random.randrange(10**6)
    stream = random.random() < 0.7
    body = {"model": f"normal-{seed}", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with session.post(url, json=body) as response:
        if stream:
            text = ""
            async for line in response.content:
                if line.startswith(b"data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        else:
            text = (await response.json())["choices"][0]["message"]["content"]
    tally.counts["normal"] += 1
    if response.status != 200 or text != expected_text(seed):
        tally.wrong.append(f"normal seed={seed} stream={stream} status={response.status} text={text[:60]!r}")


async def faulty(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    fault = random.choice(tally.faults)
    body = {"model": fault, "messages": [{"role": "user", "content": "hi"}], "stream": random.random() < 0.5}
    async with session.post(url, json=body) as response:
        await response.read()
    tally.counts[f"fault {fault}"] += 1
    if response.status == 500:
        tally.wrong.append(f"fault {fault}: 500 (an error of the gateway itself)")


async def hostile(port: int, url: str, session: aiohttp.ClientSession, tally: Tally) -> None:
    kind = random.choice(["slow_head", "slow_body", "idle", "bad_auth", "junk_body", "evil_model"])
    tally.counts[f"hostile {kind}"] += 1
    if kind in ("slow_head", "slow_body", "idle", "bad_auth"):
        await _raw(port, kind, tally)
        return
    headers = {"Content-Type": "application/json"}
    data = os.urandom(random.randint(0, 300)) if kind == "junk_body" else json.dumps(
        {"model": "\x1b[31m" + "m" * 65536, "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with session.post(url, data=data, headers=headers) as response:
        await response.read()
    if response.status >= 500:
        tally.wrong.append(f"hostile {kind}: {response.status}")


async def _raw(port: int, kind: str, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "slow_head":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        elif kind == "slow_body":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nContent-Length: 100000\r\n\r\n{")
        elif kind == "bad_auth":
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(-1), 30)
        if kind == "bad_auth" and not answer.startswith(b"HTTP/1.1 401"):
            tally.wrong.append(f"hostile bad_auth: {answer[:40]!r}")
    except asyncio.TimeoutError:
        tally.wrong.append(f"hostile {kind}: connection still open after 30 s")
    finally:
        writer.close()


async def worker(port: int, deadline: float, tally: Tally) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
        while time.monotonic() < deadline:
            roll = random.random()
            kind = "normal" if roll < 0.7 else "faulty" if roll < 0.9 else "hostile"
            try:
                if kind == "normal":
                    await normal(session, url, tally)
                elif kind == "faulty":
                    await faulty(session, url, tally)
                else:
                    await hostile(port, url, session, tally)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                tally.counts["client-side errors"] += 1
                tally.wrong.append(f"client error in a {kind} request: {type(exc).__name__}: {exc}")


def gateway_figures(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_gateway(upstream_url: str, port: int, probe: str | None) -> asyncio.subprocess.Process:
    runner = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "gateway_probe.py"), probe] if probe else [
        "-m", "netfly"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *runner, "serve", "--port", str(port), "--url", upstream_url, "--retries", "1",
        "--header-timeout", "2", "--body-timeout", "2", "--keepalive-timeout", "5",
        env={**os.environ, "NETFLY_AUTH_TOKEN": TOKEN, "NETFLY_API_KEY": "upstream-key"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"http://127.0.0.1:{port}/health"):
                    return process
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    process.kill()
    raise SystemExit("netfly serve did not start")


async def sample(pid: int, every: float, tally: Tally) -> None:
    start = time.monotonic()
    while True:
        await asyncio.sleep(every)
        tally.samples.append((time.monotonic() - start, *gateway_figures(pid)))


async def probe_report(process: asyncio.subprocess.Process, probe: str | None, name: str) -> None:
    """Ask gateway_probe.py for a report (SIGUSR1) and wait until it is written."""
    if probe is None:
        return
    path = os.path.join(probe, f"{name}.txt")
    with open(os.path.join(probe, "next"), "w") as marker:
        marker.write(name)
    process.send_signal(signal.SIGUSR1)
    for _ in range(600):
        if os.path.exists(path):
            return
        await asyncio.sleep(0.1)


async def main(seconds: float, concurrency: int, faults: tuple[str, ...], every: float, probe: str | None) -> int:
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # the upstream cuts streams on purpose
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/{tail:.*}", upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    port = free_port()
    process = await start_gateway(upstream_url, port, probe)
    tally = Tally(faults)
    try:
        await worker(port, time.monotonic() + 3, Tally(faults))  # warm-up, not counted
        rss0, fds0 = gateway_figures(process.pid)
        await probe_report(process, probe, "start")
        deadline = time.monotonic() + seconds
        sampler = asyncio.create_task(sample(process.pid, every, tally))
        await asyncio.gather(*(worker(port, deadline, tally) for _ in range(concurrency)))
        await asyncio.sleep(3)  # let timed-out connections close
        sampler.cancel()
        rss1, fds1 = gateway_figures(process.pid)
        await probe_report(process, probe, "end")
    finally:
        process.terminate()
        await process.wait()
        await runner.cleanup()
    report(tally, seconds, concurrency, (rss0, fds0), (rss1, fds1))
    return 1 if tally.wrong else 0


def report(tally: Tally, seconds: float, concurrency: int, start: tuple[float, int], end: tuple[float, int]) -> None:
    total = sum(tally.counts.values())
    faults = sum(n for kind, n in tally.counts.items() if kind.startswith("fault"))
    hostile = sum(n for kind, n in tally.counts.items() if kind.startswith("hostile"))
    print(f"soak: {seconds:g} s, {concurrency} workers, {total} requests "
          f"({tally.counts['normal']} normal, {faults} faults injected, {hostile} hostile)")
    for kind, count in sorted(tally.counts.items()):
        print(f"  {kind:28} {count}")
    print(f"gateway RSS  {start[0]:7.1f} MiB at start, {end[0]:7.1f} MiB at end")
    print(f"gateway FDs  {start[1]:7d} at start,     {end[1]:7d} at end")
    curve = ", ".join(f"{t:.0f}s {rss:.1f}/{fds}" for t, rss, fds in tally.samples)
    print(f"gateway RSS MiB/FDs over time: {curve}")
    print(f"requests not exact: {len(tally.wrong)}")
    for line in tally.wrong[:20]:
        print(f"  {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--without", action="append", choices=FAULTS, default=[], metavar="FAULT",
                        help=f"leave out a fault kind (repeatable): {', '.join(FAULTS)}")
    parser.add_argument("--sample", type=float, default=10.0, metavar="SECONDS",
                        help="record the gateway's RSS and FDs this often (default: 10)")
    parser.add_argument("--probe", metavar="DIR", help="run the gateway under gateway_probe.py, reports in DIR")
    options = parser.parse_args()
    kept = tuple(fault for fault in FAULTS if fault not in options.without)
    sys.exit(asyncio.run(main(options.seconds, options.concurrency, kept, options.sample, options.probe)))
