"""The gateway's state in Redis (or Valkey): one store shared by every process and host that uses it.

Each check is one round trip: token buckets are one Lua script (EVALSHA) that refills, checks and
takes atomically with the server's clock, so hosts need not agree on the time; stream leases are a
sorted set scored by expiry, renewed while the stream runs, so a process that dies frees its slots
when they expire; usage is HINCRBY. Every key of a client key shares one hash tag
(``{netfly:key:NAME}``), so the scripts also work on Redis Cluster.

Redis down or slow: every call has a short ``timeout``; the first that fails switches this process
to its own memory (fail open: it keeps serving, limits then count per process), logged once; a
background task pings Redis and switches back when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .._ids import unique_hex
from ..errors import ConfigurationError
from .bench import RedisBench, cancel_and_wait, redis_errors
from .keys import Bucket, MemoryStore, StateStore

__all__ = ["DEFAULT_LEASE_TTL", "DEFAULT_STATE_TIMEOUT", "RedisStore", "describe_url"]

logger = logging.getLogger("netfly.gateway")

# Seconds per state call: a slow Redis costs a request at most this. Not less: the time is measured on
# this process's event loop, where a burst of 20 new requests alone delays a reply by ~15 ms.
DEFAULT_STATE_TIMEOUT = 0.025
DEFAULT_LEASE_TTL = 30.0  # a dead process's stream slots are free again after this
_RECONNECT_EVERY = 0.5  # seconds between pings while Redis is away
_TIMEOUTS_TO_FALL_BACK = 3
_BEAT = 0.01  # the event loop's heartbeat: late by more than the timeout, the loop is saturated
_MAX_WAITS = 10  # a saturated loop waits at most this many timeouts for an answer
_SILENCE = 0.25  # seconds without an answer in time, with timeouts, before switching to memory
_WARM_CONNECTIONS = 16
_MAX_CONNECTIONS = 64  # per process
_COUNTER_INDEX = "{netfly:index}:counters"  # names of every counter set, for ``counters``
_T = TypeVar("_T")

# level and time are floats: returned as strings, since Redis turns Lua numbers into integers.
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local amount, capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'level', 'when')
local level = tonumber(state[1]) or capacity
local when = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - when) * rate)
local allowed = 1
if ARGV[4] == 'give' then
  level = math.min(capacity, level + amount)
elseif level >= amount then
  level = level - amount
else
  allowed = 0
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'when', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / rate * 1000) + 1000)
return {allowed, tostring(level)}
"""

_LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1
"""

_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1
"""


def describe_url(url: str) -> str:
    """``redis://host:port/db`` without its password, for logs and ``/health``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def redis_key(name: str) -> str:
    """``rpm:alice`` → ``{netfly:key:alice}:rpm``: every state of one client key in one hash slot."""
    kind, _, rest = name.partition(":")
    return f"{{netfly:key:{rest}}}:{kind}"


class RedisStore(StateStore):
    """A :class:`StateStore` in Redis at ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``).

    Needs the ``redis`` package (``pip install 'netfly[redis]'``). ``timeout`` bounds every call;
    ``lease_ttl`` is how long a stream slot outlives a process that died holding it.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_STATE_TIMEOUT,
                 lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        try:
            import redis.asyncio as redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise ConfigurationError("a shared state store needs the redis package: "
                                     "pip install 'netfly[redis]'") from None
        self.url, self.timeout, self.lease_ttl = url, timeout, lease_ttl
        self.fallback = MemoryStore()
        self.shared = False  # Redis answers now; False: this process's memory serves
        self.fallbacks = 0  # times this process switched to its memory
        self.timeouts = 0  # calls answered from memory because Redis was late
        self._late = 0  # timeouts in a row
        self._answered = 0.0  # when Redis last answered a call in time
        self._beat = time.monotonic()
        self._beating: asyncio.Task[None] | None = None
        try:
            # No retries of its own: a failed call falls back at once, the reconnect loop retries. A
            # bounded pool: calls beyond it wait for a connection (within their timeout) instead of failing.
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=_MAX_CONNECTIONS, timeout=None, socket_connect_timeout=1.0,
                socket_timeout=1.0, retry=Retry(NoBackoff(), 0), decode_responses=True)
            # from_pool, not Redis(connection_pool=pool): a client given a pool does not close it, so
            # close() would leave every pooled socket open until garbage collection (redis-py #2901).
            self.client = redis.Redis.from_pool(pool)
        except ValueError as exc:
            raise ConfigurationError(f"state URL {describe_url(url)!r}: {exc}") from None
        self._bucket = self.client.register_script(_BUCKET_LUA)
        self._lease = self.client.register_script(_LEASE_LUA)
        self._renew = self.client.register_script(_RENEW_LUA)
        self.bench = RedisBench(self.client, timeout)  # circuit breakers shared by the routers
        self._held: dict[str, set[str]] = {}  # leases taken in Redis by this process, renewed while held
        # Leases Redis may hold though this process did not hear so (a lease or release call that timed
        # out may still have run there): removed once it answers, else each would block a slot for the
        # lease's time to live. Kept at most that long: by then Redis has dropped them by itself.
        self._doubtful: dict[tuple[str, str], float] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._down_since: float | None = None

    def __repr__(self) -> str:
        return f"RedisStore({describe_url(self.url)!r})"

    def status(self) -> dict[str, Any]:
        return {"backend": "redis", "url": describe_url(self.url), "shared": self.shared,
                "fallbacks": self.fallbacks, "timeouts": self.timeouts}

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        await self._reconnect()
        if not self.shared:
            self._went_down("not reachable at start")
        self._keeper = asyncio.create_task(self._keep())
        self._beating = asyncio.create_task(self._heartbeat())
        self.bench.start()

    async def close(self) -> None:
        # Calls after this (a request still settling) are answered from memory: the closed pool would
        # open a new connection for them, and nothing would close it.
        self.shared = False
        await self.bench.stop()
        await cancel_and_wait([task for task in (self._keeper, self._beating) if task is not None])
        await self.client.aclose()

    async def _keep(self) -> None:
        """Reconnect while Redis is away; renew the held leases while it is here."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(_RECONNECT_EVERY)
            if not self.shared:
                await self._reconnect()
            elif time.monotonic() - renewed >= self.lease_ttl / 3:
                renewed = time.monotonic()
                await self._renew_all()
            if self.shared and self._doubtful:
                await self._remove_doubtful()

    async def _reconnect(self) -> None:
        try:
            await asyncio.wait_for(self._warm_up(), 1.0)
        except redis_errors():
            return
        if self._down_since is not None:
            logger.warning("state store %s is back after %.1f s: limits, leases and usage are shared again",
                           describe_url(self.url), time.monotonic() - self._down_since)
        self.shared, self._down_since, self._late = True, None, 0

    async def _warm_up(self) -> None:
        """Load the scripts and open a few connections now, so the first requests do not pay for it."""
        for script in (self._bucket, self._lease, self._renew):
            script.sha = await self.client.script_load(script.script)
        await asyncio.gather(*(self.client.ping() for _ in range(_WARM_CONNECTIONS)))

    async def _renew_all(self) -> None:
        ttl = round(self.lease_ttl * 1000)
        for name, ids in list(self._held.items()):
            if ids:
                await self._call(self._renewal(name, ttl, sorted(ids)), _nothing)

    def _renewal(self, name: str, ttl_ms: int, ids: list[str]) -> Callable[[], Awaitable[None]]:
        async def renew() -> None:
            await self._renew(keys=[redis_key(name)], args=[ttl_ms, *ids])

        return renew

    async def _remove_doubtful(self) -> None:
        now = time.monotonic()
        settled = now - (_MAX_WAITS * self.timeout + 0.25)  # older: no call about it is still in flight
        expired = now - self.lease_ttl  # older: Redis has dropped it by itself
        ripe = [entry for entry, since in self._doubtful.items() if since < settled]
        due = {entry: self._doubtful.pop(entry) for entry in ripe}
        due = {entry: since for entry, since in due.items() if since > expired}
        if not due:
            return

        async def remove() -> bool:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, lease_id in due:
                    pipe.zrem(redis_key(name), lease_id)
                await pipe.execute()
            return True

        async def unanswered() -> bool:
            return False

        # Background work, not a request's: it may take longer than a limit check.
        if not await self._call(remove, unanswered, max(self.timeout, 1.0)):
            self._doubtful.update(due)  # try again on the next round

    def _went_down(self, reason: str) -> None:
        self.shared = False
        self.fallbacks += 1
        self._down_since = time.monotonic()
        logger.warning("state store %s unavailable (%s): serving with this process's memory, limits count "
                       "per process until it returns", describe_url(self.url), reason)

    async def _call(self, shared: Callable[[], Awaitable[_T]], local: Callable[[], Awaitable[_T]],
                    timeout: float | None = None) -> _T:
        """``shared()`` within the timeout, else ``local()``. An error switches to memory at once;
        timeouts do when several come in a row and no call was answered in time for a while."""
        if self.shared:
            try:
                found = await self._answer(shared(), timeout or self.timeout)
            except asyncio.TimeoutError:
                self.timeouts += 1
                self._late += 1
                if self._late >= _TIMEOUTS_TO_FALL_BACK and self.shared and self._silent():
                    self._went_down(f"{self._late} calls in a row took over {self.timeout * 1000:g} ms")
            except redis_errors() as exc:
                if self.shared:  # several calls in flight fail together: say it once
                    self._went_down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            else:
                self._late, self._answered = 0, time.monotonic()
                return found
        return await local()

    async def _answer(self, call: Awaitable[_T], timeout: float) -> _T:
        """``call``'s result, or :class:`asyncio.TimeoutError` after ``timeout``; while this event loop
        is too busy to have read the answer (its heartbeat is late), up to ``_MAX_WAITS`` timeouts."""
        task = asyncio.ensure_future(call)
        for _ in range(_MAX_WAITS):
            done, _ = await asyncio.wait((task,), timeout=timeout)
            if done:
                return task.result()
            if not self._loop_busy():
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *redis_errors()):
            await task
        raise asyncio.TimeoutError

    def _loop_busy(self) -> bool:
        return time.monotonic() - self._beat > _BEAT + self.timeout

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(_BEAT)

    def _silent(self) -> bool:
        # Late answers while others still arrive, or while this event loop is too busy to read them,
        # are this process's own queue (a burst of requests), not an outage.
        return time.monotonic() - self._answered > _SILENCE and not self._loop_busy()

    # -- the StateStore operations -------------------------------------------------------------

    async def take(self, name: str, amount: float, capacity: float, per_second: float) -> Bucket:
        async def shared() -> Bucket:
            allowed, level = await self._bucket(keys=[redis_key(name)], args=[amount, capacity, per_second, "take"])
            return Bucket.after(bool(allowed), float(level), amount, capacity, per_second)

        return await self._call(shared, lambda: self.fallback.take(name, amount, capacity, per_second))

    async def give(self, name: str, amount: float, capacity: float, per_second: float) -> None:
        async def shared() -> None:
            await self._bucket(keys=[redis_key(name)], args=[amount, capacity, per_second, "give"])

        await self._call(shared, lambda: self.fallback.give(name, amount, capacity, per_second))

    async def lease(self, name: str, limit: int, ttl: float) -> str | None:
        lease_id = unique_hex()
        ttl_ms = round(min(ttl, self.lease_ttl) * 1000)

        async def shared() -> str | None:
            self._doubtful[name, lease_id] = time.monotonic()  # until Redis answers
            taken = await self._lease(keys=[redis_key(name)], args=[limit, ttl_ms, lease_id])
            self._doubtful.pop((name, lease_id), None)
            if not taken:
                return None
            self._held.setdefault(name, set()).add(lease_id)
            return lease_id

        return await self._call(shared, lambda: self.fallback.lease(name, limit, ttl))

    async def release(self, name: str, lease_id: str) -> None:
        held = self._held.get(name, set())
        if lease_id not in held:
            await self.fallback.release(name, lease_id)
            return
        held.discard(lease_id)  # not renewed any more: it expires even if the ZREM below fails
        self._doubtful[name, lease_id] = time.monotonic()

        async def shared() -> None:
            await self.client.zrem(redis_key(name), lease_id)
            self._doubtful.pop((name, lease_id), None)

        await self._call(shared, _nothing)

    async def add(self, name: str, counts: Mapping[str, int]) -> None:
        async def shared() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for field_name, value in counts.items():
                    pipe.hincrby(redis_key(name), field_name, value)
                pipe.sadd(_COUNTER_INDEX, name)
                await pipe.execute()

        await self._call(shared, lambda: self.fallback.add(name, counts))

    async def counters(self, prefix: str) -> dict[str, dict[str, int]]:
        async def shared() -> dict[str, dict[str, int]]:
            names = sorted(str(n) for n in await self.client.smembers(_COUNTER_INDEX) if str(n).startswith(prefix))
            async with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(redis_key(name))
                found = await pipe.execute()
            pairs = zip(names, found, strict=True)
            return {name: {str(k): int(v) for k, v in values.items()} for name, values in pairs}

        # A report, not a hot path: it may take longer than a limit check.
        return await self._call(shared, lambda: self.fallback.counters(prefix), max(self.timeout, 1.0))


async def _nothing() -> None:
    return None
