"""Several gateway processes on one real redis-server: limits, stream slots, usage and circuit
breakers are shared; Redis down or slow never fails a client request."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netfly.config import parse_config
from netfly.gateway import bound_port, create_app, start
from netfly.gateway.operations import Operations
from netfly.gateway.redisstore import DEFAULT_STATE_TIMEOUT, RedisStore, redis_key

from .conftest import ScriptedServer
from .redis_server import RedisServer, redis_server
from .test_operate import ALICE, MESSAGES, Running, digest, free_port, named_answer, wait_until_serving
from .test_pages import wait_until

__all__ = ["redis_server"]  # the fixture, imported to be used here

Scripted = Callable[..., Awaitable[ScriptedServer]]


def config_toml(upstream: ScriptedServer, redis: RedisServer, key: str, **state: Any) -> str:
    settings = "".join(f"{name} = {value}\n" for name, value in state.items())
    return (f'[state]\nurl = "{redis.url}"\n{settings}\n[providers.up]\nurl = "{upstream.url}"\n\n'
            f'[models.m]\ntargets = [{{ provider = "up" }}]\n\n[keys.alice]\nsha256 = "{digest(ALICE)}"\n{key}\n')


class Process:
    """``netfly serve`` in a child process, its log in a file."""

    def __init__(self, process: asyncio.subprocess.Process, gateway: Running, log: Path) -> None:
        self.process, self.gateway, self.log = process, gateway, log

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Process]]]:
    started: list[Process] = []

    async def launch(config: str, *args: str) -> Process:
        path = tmp_path / f"netfly{len(started)}.toml"
        path.write_text(config)
        port, log = free_port(), tmp_path / f"gateway{len(started)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "netfly", "serve", "--config", str(path), "--port", str(port), *args,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            )
        running = Process(process, Running(f"http://127.0.0.1:{port}"), log)
        started.append(running)
        await wait_until_serving(running.gateway)
        return running

    yield launch
    for running in started:
        running.stop(signal.SIGKILL)
        await running.process.wait()


async def post(gateway: Running, *, stream: bool = False) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(
        gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
        json={"model": "m", "messages": MESSAGES, "stream": stream},
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_a_key_gets_its_requests_per_minute_across_two_processes(
    scripted: Scripted, redis_server: RedisServer, serve_process: Any
) -> None:
    upstream = await scripted(named_answer("hi"))
    # A generous timeout: this test counts across processes, a late answer would count in memory.
    config = config_toml(upstream, redis_server, "rpm = 30", timeout=0.5)
    a, b, c = await serve_process(config), await serve_process(config), await serve_process(config, "--workers", "2")
    answers = await asyncio.gather(*(post((a, b, c)[i % 3].gateway) for i in range(40)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 30 and statuses.count(429) == 10
    refused = [headers for status, headers in answers if status == 429]
    waits = {int(headers["Retry-After"]) for headers in refused}
    assert waits <= {1, 2}  # one request more every 2 s (30 a minute)
    assert (await post(a.gateway))[0] == 429
    await asyncio.sleep(max(waits))
    assert (await post(b.gateway))[0] == 200  # Retry-After was long enough, and not longer
    _status, _, usage = await a.gateway.raw("GET", "/health", None)
    assert usage["state"] == {"backend": "redis", "url": redis_server.url, "shared": True,
                              "fallbacks": 0, "timeouts": usage["state"]["timeouts"]}


async def test_the_stream_slots_of_a_killed_process_expire(
    scripted: Scripted, redis_server: RedisServer, serve_process: Any
) -> None:
    upstream = await scripted(named_answer("slow", first_delay=6))
    config = config_toml(upstream, redis_server, "max_streams = 2", lease_ttl=1)
    a, b = await serve_process(config), await serve_process(config)
    held = [asyncio.create_task(post(a.gateway, stream=True)) for _ in range(2)]
    while len(upstream.requests) < 2:
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.5)  # past the lease's time to live: renewed while the streams run
    status, headers = await post(b.gateway, stream=True)
    assert status == 429 and headers["Retry-After"] == "1"
    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.gather(*held, return_exceptions=True)
    while (await post(b.gateway))[0] != 200:
        assert time.monotonic() - killed < 3, "the dead process's slots were not freed"
        await asyncio.sleep(0.1)


async def gateway_on_redis(redis: RedisServer | None, upstream: ScriptedServer, *,
                           state_timeout: float = DEFAULT_STATE_TIMEOUT, **key: Any) -> tuple[Running, Any]:
    """A gateway with one key, its state in ``redis`` (None: in its own memory)."""
    config = parse_config({
        "providers": {"up": {"url": upstream.url}}, "models": {"m": {"targets": [{"provider": "up"}]}},
        "keys": {"alice": {"sha256": digest(ALICE), **key}},
    })
    store = RedisStore(redis.url, timeout=state_timeout) if redis is not None else None
    operations = Operations(config, store=store)
    runner = await start(create_app(operations=operations), "127.0.0.1", 0)
    return Running(f"http://127.0.0.1:{bound_port(runner)}", operations), runner


async def test_redis_killed_under_load_fails_no_request_and_comes_back(
    scripted: Scripted, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="netfly.gateway")
    upstream = await scripted(named_answer("hi", delay=0.01))
    gw, runner = await gateway_on_redis(redis_server, upstream, rpm=100000, max_streams=50)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            statuses.append((await post(gw, stream=True))[0])

    try:
        clients = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(0.5)
        redis_server.kill()
        await asyncio.sleep(0.7)
        health = (await gw.raw("GET", "/health", None))[2]["state"]
        metrics = (await gw.raw("GET", "/metrics", None))[2]
        redis_server.start()
        deadline = time.monotonic() + 5
        while not (await gw.raw("GET", "/health", None))[2]["state"]["shared"]:
            assert time.monotonic() < deadline, "did not reconnect to Redis"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        await runner.cleanup()
    assert len(statuses) > 50 and set(statuses) == {200}
    assert health["shared"] is False and health["fallbacks"] == 1
    assert "netfly_state_shared 0.0" in metrics and "netfly_state_fallbacks_total 1.0" in metrics
    downs = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(downs) == 1 and "serving with this process's memory" in downs[0]
    assert any("is back after" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "memory"])
async def test_a_client_that_hangs_up_at_the_end_of_the_answer_frees_its_slot_and_is_counted(
    scripted: Scripted, request: pytest.FixtureRequest, shared: bool
) -> None:
    # The client closes (a reset) the moment it has the last byte: the gateway's handler is cancelled
    # while it still settles the request (with Redis: in a shielded task; in memory: in place, where
    # nothing suspends). That settling must finish all the same.
    upstream = await scripted(named_answer("hi"))
    redis = request.getfixturevalue("redis_server") if shared else None
    gw, runner = await gateway_on_redis(redis, upstream, rpm=100000, max_streams=2)
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    served = 0
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + body)
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"):  # the end of the chunked body
                piece = await reader.read(65536)
                assert piece, answer
                answer += piece
                if answer.startswith(b"HTTP/1.1 429 "):
                    break  # the hang-up just before still settling (with Redis, in a task of its own)
            if answer.startswith(b"HTTP/1.1 429 "):
                writer.close()
                await asyncio.sleep(0.05)
                continue
            assert b"data: [DONE]" in answer
            served += 1
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset at once
            writer.close()
        await asyncio.sleep(0.3)  # the last settling
        statuses = [(await post(gw, stream=True))[0] for _ in range(3)]
        assert gw.operations is not None
        (usage,) = await gw.operations.usage.report()  # what /admin/usage serves
    finally:
        await runner.cleanup()
    assert statuses == [200, 200, 200]  # max_streams=2: no slot was left taken by those that hung up
    assert served >= 10 and usage["requests"] == served + 3  # each counted, the refused ones not


async def test_a_slow_redis_does_not_stall_a_stream(scripted: Scripted, redis_server: RedisServer) -> None:
    upstream = await scripted(named_answer("hi"))
    gw, runner = await gateway_on_redis(redis_server, upstream, rpm=1000)
    try:
        assert (await post(gw))[0] == 200
        sleeper = asyncio.create_task(asyncio.to_thread(redis_server.command, "DEBUG", "SLEEP", "2"))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        for _ in range(5):
            assert (await post(gw, stream=True))[0] == 200
        assert time.monotonic() - began < 1.0
        await sleeper
    finally:
        await runner.cleanup()


async def test_a_lease_call_that_times_out_is_undone_once_redis_answers_and_no_socket_outlives_the_gateway(
    scripted: Scripted, redis_server: RedisServer
) -> None:
    upstream = await scripted(named_answer("hi"))
    # A 100 ms state timeout: the lease Redis took too late is removed no sooner than 1.25 s after the
    # call (10 timeouts + 0.25 s), long after Redis wakes from its 0.8 s sleep, when it is looked at.
    gw, runner = await gateway_on_redis(redis_server, upstream, state_timeout=0.1, max_streams=2)
    leases = "{netfly:key:alice}:streams"
    try:
        assert (await post(gw, stream=True))[0] == 200  # the pool is warm, the scripts loaded
        # Its slot is released after the client has the answer: wait for that, or the release call
        # could time out in the sleep below, and the lease call reconnect on its closed connection.
        await wait_until(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", "no release", timeout=5)
        await asyncio.sleep(0.1)
        warm = redis_server.client_sockets()
        sleeper = asyncio.create_task(asyncio.to_thread(redis_server.command, "DEBUG", "SLEEP", "0.8"))
        await asyncio.sleep(0.2)
        assert (await post(gw, stream=True))[0] == 200  # its lease call timed out: a slot from memory
        await sleeper
        # Redis ran the lease call after netfly gave up on it (had it answered in time, the release at
        # the end of the request would have removed it); the socket of that call is closed.
        assert redis_server.command("ZCARD", leases) == b":1\r\n"
        assert redis_server.client_sockets() <= warm
        await wait_until(lambda: redis_server.command("ZCARD", leases) == b":0\r\n",
                         "the lease of the timed-out call was not removed", timeout=5)
    finally:
        await runner.cleanup()
    assert redis_server.client_sockets() == 0  # closing the gateway closed every Redis connection


async def test_a_call_after_the_store_closed_is_answered_from_memory_and_opens_no_socket(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    await store.open()
    assert store.shared
    await store.close()
    assert redis_server.client_sockets() == 0
    await store.add("usage:late", {"requests": 1})  # a request that settles after the gateway stopped
    assert await store.lease("streams:late", 1, 30.0) is not None
    assert redis_server.client_sockets() == 0
    assert redis_server.command("EXISTS", redis_key("usage:late")) == b":0\r\n"  # counted in memory


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_workers_share_one_port_a_dead_one_is_replaced_and_sigterm_drains(
    scripted: Scripted, redis_server: RedisServer, serve_process: Any
) -> None:
    upstream = await scripted(named_answer("slow", delay=0.3, pieces=4))
    supervisor = await serve_process(config_toml(upstream, redis_server, "rpm = 1000"), "--workers", "2")
    first = children(supervisor.process.pid)
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while len(now := children(supervisor.process.pid)) < 2 or first[0] in now:
        assert time.monotonic() < deadline, "the dead worker was not replaced"
        await asyncio.sleep(0.1)
    await wait_until_serving(supervisor.gateway)
    streams = [asyncio.create_task(supervisor.gateway.ask("m")) for _ in range(6)]
    while len(upstream.requests) < 6:
        await asyncio.sleep(0.02)
    supervisor.stop(signal.SIGTERM)
    assert await asyncio.gather(*streams) == ["slow " * 4] * 6  # drained, not cut
    assert await asyncio.wait_for(supervisor.process.wait(), 15) == 0
    log = supervisor.log.read_text()
    assert f"gateway worker {first[0]} exited (killed by SIGKILL); starting a new one" in log


async def test_no_worker_outlives_a_killed_supervisor(
    scripted: Scripted, redis_server: RedisServer, serve_process: Any
) -> None:
    upstream = await scripted(named_answer("hi"))
    supervisor = await serve_process(
        config_toml(upstream, redis_server, "rpm = 1000"), "--workers", "2", "--shutdown-grace", "1")
    workers = children(supervisor.process.pid)
    assert len(workers) == 2
    supervisor.stop(signal.SIGKILL)  # no chance to stop them: the closed pipe must
    deadline = time.monotonic() + 10
    while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
        await asyncio.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


async def test_workers_refuse_per_process_limits_without_state(scripted: Scripted, tmp_path: Path) -> None:
    upstream = await scripted(named_answer("hi"))
    path = tmp_path / "netfly.toml"
    path.write_text(f'[providers.up]\nurl = "{upstream.url}"\n[models.m]\ntargets = [{{ provider = "up" }}]\n'
                    f'[keys.alice]\nsha256 = "{digest(ALICE)}"\nrpm = 30\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netfly", "serve", "--config", str(path), "--port", str(free_port()),
        "--workers", "2", stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0
    assert ("--workers 2 without --state: the limits of key(s) alice would count per worker (2 times what they "
            "say); share them with --state redis://HOST:PORT/DB") in stderr.decode()


def two_targets(first: ScriptedServer, second: ScriptedServer, redis: RedisServer, threshold: int) -> str:
    return (f'[state]\nurl = "{redis.url}"\n\n[providers.first]\nurl = "{first.url}"\nretries = 1\n\n'
            f'[providers.second]\nurl = "{second.url}"\nretries = 1\n\n[models.m]\nfailure_threshold = {threshold}\n'
            'cooldown = 30\ntargets = [{ provider = "first" }, { provider = "second" }]\n')


async def skipped_elsewhere_within_a_second(a: Process, b: Process, first: ScriptedServer) -> None:
    assert await a.gateway.ask("m") == "second second "
    benched = time.monotonic()
    tried = len(first.requests)
    await asyncio.sleep(1.0)
    assert await b.gateway.ask("m") == "second second "
    assert len(first.requests) == tried, "the other process still tried the benched provider"
    assert time.monotonic() - benched < 2


@pytest.mark.parametrize("status", [500, 429])
async def test_a_provider_benched_by_one_process_is_skipped_by_the_others(
    scripted: Scripted, redis_server: RedisServer, serve_process: Any, status: int
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no", "type": "server_error"}}, status=status,
                                 headers={"Retry-After": "20"} if status == 429 else {})

    first, second = await scripted(*[refuse] * 5), await scripted(named_answer("second"))
    # 500: the circuit opens at the first failure; 429 + Retry-After: benched though far from the threshold.
    config = two_targets(first, second, redis_server, threshold=1 if status == 500 else 5)
    a, b = await serve_process(config), await serve_process(config, "--workers", "2")
    await skipped_elsewhere_within_a_second(a, b, first)
    assert await b.gateway.ask("m") == "second second "  # the other worker of b too
    assert len(first.requests) == 1
