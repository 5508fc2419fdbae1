"""A real Prometheus scrapes the gateway; its own HTTP API must see the traffic that was sent.

Needs the ``prometheus`` binary (Debian/Ubuntu: ``apt-get install -y prometheus``); skipped without
it. About 25 seconds: Prometheus scrapes every second, traffic runs at a known rate for 12 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netfly.config import parse_config
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.operations import Operations

from .test_operate import MESSAGES, Scripted, free_port, named_answer

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="the prometheus binary is not installed (Debian: apt-get install -y prometheus)"),
]

KEY = "nf-prom-key-6a1f"
RATE = 5.0  # requests a second
TTFT = 0.2  # the upstream's delay before its first chunk


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: netfly\n    static_configs:\n      - targets: ['{target}']\n"
    )
    process = await asyncio.create_subprocess_exec(
        "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)


async def query(session: aiohttp.ClientSession, base: str, promql: str, at: float) -> list[dict[str, Any]]:
    async with session.get(base + "/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def traffic(base: str, seconds: float) -> list[float]:
    """POST a streamed completion every 1/RATE seconds (on a fixed schedule, not waiting for the
    answers); the wall-clock times the answers ended."""
    sent: list[asyncio.Task[float]] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:

        async def one() -> float:
            body = {"model": "m", "messages": MESSAGES, "stream": True}
            async with session.post(base + "/v1/chat/completions", json=body) as response:
                await response.read()
                assert response.status == 200
            return time.time()

        started = time.monotonic()
        for n in range(int(seconds * RATE)):
            await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
            sent.append(asyncio.create_task(one()))
        return list(await asyncio.gather(*sent))


async def test_prometheus_sees_the_request_rate_and_time_to_first_token(scripted: Scripted, tmp_path: Path) -> None:
    upstream = await scripted(named_answer("X", first_delay=TTFT))
    config = parse_config({
        "providers": {"up": {"url": upstream.url}},
        "models": {"m": {"targets": [{"provider": "up"}]}},
        "keys": {"k": {"sha256": hashlib.sha256(KEY.encode()).hexdigest()}},
    })
    runner = await start(create_app(operations=Operations(config)), "127.0.0.1", 0)
    gateway = f"127.0.0.1:{bound_port(runner)}"
    try:
        async with prometheus(tmp_path, gateway) as base, aiohttp.ClientSession() as session:
            ended = await traffic(f"http://{gateway}", 14)
            at = max(ended) - 0.5  # the window's end: inside the traffic, after the first scrapes by 10 s
            await asyncio.sleep(2)  # the last scrapes
            rate = await query(session, base, 'sum(rate(netfly_requests_total{route="/v1/chat/completions"}[10s]))',
                               at)
            ttft = await query(session, base, "histogram_quantile(0.5, sum by (le) "
                                              "(rate(netfly_time_to_first_token_seconds_bucket[10s])))", at)
            up = await query(session, base, 'up{job="netfly"}', at)
    finally:
        await runner.cleanup()
    sent_rate = sum(at - 10 < t <= at for t in ended) / 10
    assert [r["value"][1] for r in up] == ["1"]
    assert len(rate) == 1 and abs(float(rate[0]["value"][1]) - sent_rate) <= 0.25 * sent_rate, (rate, sent_rate)
    # The upstream waits 0.2 s; the bucket holding it is (0.1, 0.25], so the median lands inside it.
    assert len(ttft) == 1 and 0.1 < float(ttft[0]["value"][1]) <= 0.25, ttft
