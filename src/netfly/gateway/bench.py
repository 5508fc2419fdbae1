"""Providers benched for every gateway process: circuit breakers and ``Retry-After`` waits in Redis.

A router that opens a circuit (or gets a ``Retry-After``) calls :meth:`RedisBench.bench`: the bench
is kept here at once, then written to Redis as a key that expires with it and announced on a
pub/sub channel; every process listening updates its own copy within milliseconds. A process that
starts (or reconnects) reads the keys still there. The routing hot path only reads the local copy:
no request waits for Redis. Redis away: each process keeps its own breakers (they still work).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["RedisBench", "cancel_and_wait", "redis_errors"]

logger = logging.getLogger("netfly.gateway")

CHANNEL = "netfly:breakers"
_KEY = "{netfly:breaker:%s}"
_RESUBSCRIBE_EVERY = 0.5


class RedisBench:
    """A :class:`netfly.routing.SharedBench` over a ``redis.asyncio.Redis`` client."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self._until: dict[str, tuple[float, str]] = {}  # name -> (monotonic end, reason)
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None

    # -- the SharedBench protocol (no waiting) -------------------------------------------------

    def benched(self, name: str) -> tuple[float, str] | None:
        found = self._until.get(name)
        if found is None:
            return None
        remaining = found[0] - time.monotonic()
        if remaining <= 0:
            del self._until[name]
            return None
        return remaining, found[1]

    def bench(self, name: str, seconds: float, reason: str) -> None:
        self._note(name, seconds, reason)
        self._send(self._publish(name, seconds, reason))

    def clear(self, name: str) -> None:
        self._until.pop(name, None)
        self._send(self._publish(name, 0.0, ""))

    # -- Redis ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *([self._listener] if self._listener else [])])

    def _note(self, name: str, seconds: float, reason: str) -> None:
        if seconds <= 0:
            self._until.pop(name, None)
            return
        end = time.monotonic() + seconds
        if end > self._until.get(name, (0.0, ""))[0]:
            self._until[name] = (end, reason)

    def _send(self, publish: Any) -> None:
        task = asyncio.get_running_loop().create_task(publish)
        self._tasks.add(task)  # kept until done: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, name: str, seconds: float, reason: str) -> None:
        message = json.dumps({"name": name, "seconds": seconds, "reason": reason})
        with contextlib.suppress(*redis_errors()):  # Redis away: the local breakers still work
            async with self.client.pipeline(transaction=False) as pipe:
                if seconds > 0:
                    pipe.set(_KEY % name, json.dumps([seconds, reason]), px=max(1, round(seconds * 1000)))
                else:
                    pipe.delete(_KEY % name)
                pipe.publish(CHANNEL, message)
                await asyncio.wait_for(pipe.execute(), max(self.timeout, 0.5))

    async def _listen(self) -> None:
        """Follow the channel; after every (re)subscription, read the benches already in Redis."""
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    await self._load()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._receive(message["data"])
            except redis_errors():  # Redis away: try again shortly
                await asyncio.sleep(_RESUBSCRIBE_EVERY)

    def _receive(self, data: str) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            found = json.loads(data)
            self._note(str(found["name"]), float(found["seconds"]), str(found["reason"]))

    async def _load(self) -> None:
        async for key in self.client.scan_iter(match=_KEY % "*", count=500):
            value, ttl = await self.client.get(key), await self.client.pttl(key)
            if value is not None and ttl > 0:
                self._note(key[len("{netfly:breaker:"):-1], ttl / 1000, json.loads(value)[1])


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a call to Redis raises when Redis is away or slow (``redis`` is imported only when used)."""
    from redis.exceptions import RedisError

    return OSError, asyncio.TimeoutError, RedisError


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], patience: float = 2.0) -> None:
    """Cancel ``tasks`` and wait until they end. redis-py can swallow a cancellation (while it opens a
    connection or a subscription): a task still running after half of ``patience`` is cancelled once
    more (not sooner: a second cancellation would cut its own clean-up short and leak its socket), and
    after ``patience`` it is left behind rather than waited for forever."""
    tasks = list(tasks)
    pending = set(tasks)
    for _ in range(2):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience / 2)
    if pending:
        logger.warning("%d Redis task(s) did not stop when cancelled; leaving them", len(pending))
    for task in tasks:  # their errors are of no use now, but must be collected
        if task.done() and not task.cancelled():
            task.exception()
