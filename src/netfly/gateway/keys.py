"""Client keys and their limits, over a small state store.

The store holds every shared number (token buckets, leases, counters) behind four atomic
operations, so one implementation keeps them in this process (:class:`MemoryStore`) and another can
keep them in Redis for many processes: ``take`` is a check-and-consume (a Lua script there),
``lease`` an entry with an expiry (a sorted set), ``add`` counters (a hash).

Limits are token buckets: a key with ``rpm = 60`` may send 60 requests at once, then one per
second; its bucket is full again a minute after the last one. ``tpm`` works alike in tokens: a
request is charged an estimate before it is sent and corrected by the real usage after.
"""

from __future__ import annotations

import abc
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._ids import unique_hex
from ..config import KeyConfig, hash_key
from .errors import GatewayError

__all__ = [
    "Admission", "Bucket", "ClientKey", "KeyRing", "LimitExceeded", "MemoryStore", "StateStore", "estimate_tokens",
]

MINUTE = 60.0
LEASE_TTL = 15 * MINUTE  # a stream's slot is freed after this even if its process died holding it


class Bucket(NamedTuple):
    """The outcome of one ``take``: whether it was allowed and the bucket's state after it
    (a named tuple: made several times a request, which a frozen dataclass makes slowly)."""

    allowed: bool
    remaining: float  # what is left now
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until ``amount`` would be allowed (0 when allowed)

    @classmethod
    def after(cls, allowed: bool, level: float, amount: float, capacity: float, per_second: float) -> Bucket:
        """The outcome of a take of ``amount`` that left the bucket at ``level``."""
        missing = 0.0 if allowed else amount - level
        return cls(allowed, max(0.0, level), (capacity - level) / per_second, missing / per_second)


class StateStore(abc.ABC):
    """Shared numbers of the gateway; every operation is atomic on its own."""

    # Whether an operation may wait for I/O: a caller that must not be cut half-way by a cancellation
    # then runs it shielded, in a task of its own.
    suspends = True

    @abc.abstractmethod
    async def take(self, name: str, amount: float, capacity: float, per_second: float) -> Bucket:
        """Refill token bucket ``name`` (full at first), then take ``amount`` if it holds that much.
        ``amount=0`` only reads it."""

    @abc.abstractmethod
    async def give(self, name: str, amount: float, capacity: float, per_second: float) -> None:
        """Put ``amount`` back (negative: take it even into debt, which later requests wait out)."""

    @abc.abstractmethod
    async def lease(self, name: str, limit: int, ttl: float) -> str | None:
        """A new lease id when fewer than ``limit`` unexpired leases of ``name`` exist, else ``None``."""

    @abc.abstractmethod
    async def release(self, name: str, lease_id: str) -> None:
        """End a lease (ending one that expired already is harmless)."""

    @abc.abstractmethod
    async def add(self, name: str, counts: Mapping[str, int]) -> None:
        """Add ``counts`` to the counters of ``name``."""

    @abc.abstractmethod
    async def counters(self, prefix: str) -> dict[str, dict[str, int]]:
        """Every counter set whose name starts with ``prefix``."""

    async def open(self) -> None:  # noqa: B027 - optional: a store in memory has nothing to open
        """Connect (a shared store); called when the gateway starts."""

    async def close(self) -> None:  # noqa: B027
        """Disconnect; called when the gateway stops."""

    def status(self) -> dict[str, Any]:
        """What ``/health`` says of the store: its kind and whether its state is shared now."""
        return {"backend": "memory", "shared": False}


class MemoryStore(StateStore):
    """The store of one process. No operation awaits anything, so each is atomic in the event loop."""

    suspends = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, when)
        self._leases: dict[str, dict[str, float]] = {}  # name -> {lease id: expiry}
        self._counters: dict[str, dict[str, int]] = {}

    def _level(self, name: str, capacity: float, per_second: float, now: float) -> float:
        found = self._buckets.get(name)
        if found is None:
            return capacity
        level, when = found
        return min(capacity, level + (now - when) * per_second)

    async def take(self, name: str, amount: float, capacity: float, per_second: float) -> Bucket:
        now = self._clock()
        level = self._level(name, capacity, per_second, now)
        allowed = level >= amount
        if allowed:
            level -= amount
        self._buckets[name] = (level, now)
        return Bucket.after(allowed, level, amount, capacity, per_second)

    async def give(self, name: str, amount: float, capacity: float, per_second: float) -> None:
        now = self._clock()
        self._buckets[name] = (min(capacity, self._level(name, capacity, per_second, now) + amount), now)

    async def lease(self, name: str, limit: int, ttl: float) -> str | None:
        now = self._clock()
        held = self._leases.setdefault(name, {})
        if len(held) >= limit:  # only then can expired leases change the answer: not swept on every lease
            for expired in [lid for lid, expiry in held.items() if expiry <= now]:
                del held[expired]
            if len(held) >= limit:
                return None
        lease_id = unique_hex()
        held[lease_id] = now + ttl
        return lease_id

    async def release(self, name: str, lease_id: str) -> None:
        self._leases.get(name, {}).pop(lease_id, None)

    async def add(self, name: str, counts: Mapping[str, int]) -> None:
        found = self._counters.setdefault(name, {})
        for field_name, value in counts.items():
            found[field_name] = found.get(field_name, 0) + value

    async def counters(self, prefix: str) -> dict[str, dict[str, int]]:
        return {name: dict(values) for name, values in self._counters.items() if name.startswith(prefix)}


@dataclass(frozen=True)
class ClientKey:
    """A key of the configuration, by name; the secret itself is never kept."""

    name: str
    models: frozenset[str] | None = None  # public model names it may use; None: all
    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None
    admin: bool = False

    @classmethod
    def from_config(cls, name: str, spec: KeyConfig) -> ClientKey:
        models = frozenset(spec.models) if spec.models is not None else None
        return cls(name, models, spec.rpm, spec.tpm, spec.max_streams, spec.admin)

    @functools.cached_property
    def state_names(self) -> dict[str, str]:
        """The names of its limits in the state store, by limit (asked for several times a request)."""
        return {limit: f"{limit}:{self.name}" for limit in ("streams", "rpm", "tpm")}


class KeyRing:
    """The configured keys, found by the SHA-256 of what a client presents."""

    def __init__(self, keys: Mapping[str, ClientKey], digests: Mapping[str, str]) -> None:
        self._by_digest = {digest: keys[name] for name, digest in digests.items()}
        self.keys = dict(keys)

    @classmethod
    def from_config(cls, keys: Mapping[str, KeyConfig]) -> KeyRing:
        return cls({n: ClientKey.from_config(n, k) for n, k in keys.items()}, {n: k.digest() for n, k in keys.items()})

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def identify(self, headers: Mapping[str, str]) -> ClientKey:
        """The key a request presents (``Authorization: Bearer KEY`` or Anthropic's ``x-api-key``);
        401 when it is not one of ours."""
        found = self._by_digest.get(hash_key(presented_key(headers)))
        if found is None:
            raise GatewayError(401, "missing or invalid API key: send it as 'Authorization: Bearer <key>' "
                                    "or 'x-api-key: <key>'", type="authentication_error", code="invalid_api_key")
        return found


def presented_key(headers: Mapping[str, str]) -> str:
    """The secret a request carries, or ``""``."""
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return given.strip()
    return headers.get("x-api-key", "").strip()


class LimitExceeded(GatewayError):
    """429: a key's limit is reached; ``retry_after`` says when to try again."""

    def __init__(self, message: str, retry_after: float, limit: str) -> None:
        super().__init__(429, message, type="rate_limit_error", code="rate_limit_exceeded", retry_after=retry_after)
        self.limit = limit


@dataclass
class Admission:
    """What one request took from its key's limits; ``finish`` settles it once the answer is known."""

    key: ClientKey
    store: StateStore
    charged_tokens: int = 0
    lease_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    async def finish(self, used_tokens: int | None) -> None:
        """Free the stream slot and correct the token charge to what was really used."""
        key, store = self.key, self.store
        if self.lease_id is not None:
            await store.release(_name("streams", key), self.lease_id)
            self.lease_id = None
        if key.tpm is not None and used_tokens is not None and used_tokens != self.charged_tokens:
            await store.give(_name("tpm", key), self.charged_tokens - used_tokens, key.tpm, key.tpm / MINUTE)
            self.charged_tokens = used_tokens


async def read_limits(store: StateStore, key: ClientKey) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of ``key`` without taking anything."""
    headers: dict[str, str] = {}
    if key.rpm is not None:
        _describe(headers, "requests", key.rpm, await store.take(_name("rpm", key), 0, key.rpm, key.rpm / MINUTE))
    if key.tpm is not None:
        _describe(headers, "tokens", key.tpm, await store.take(_name("tpm", key), 0, key.tpm, key.tpm / MINUTE))
    return headers


def limits_described(key: ClientKey, headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` hold the ``x-ratelimit-*`` headers of each limit ``key`` has."""
    return (key.rpm is None or _HEADER_NAMES["requests"][0] in headers) and (
        key.tpm is None or _HEADER_NAMES["tokens"][0] in headers)


async def admit(store: StateStore, key: ClientKey, model: str, tokens: int, admission: Admission) -> None:
    """Check ``key`` may send a request for ``model`` costing about ``tokens``, and take it from its
    limits (filling ``admission``); :class:`GatewayError` 403 or :class:`LimitExceeded` when not."""
    if key.models is not None and model not in key.models:
        raise GatewayError(403, f"key {key.name!r} may not use model {model!r}", type="permission_error",
                           param="model", code="model_not_allowed")
    if key.max_streams is not None:
        admission.lease_id = await store.lease(_name("streams", key), key.max_streams, LEASE_TTL)
        if admission.lease_id is None:
            raise LimitExceeded(f"key {key.name!r} has {key.max_streams} requests in flight already, its limit",
                                1.0, "streams")
    if key.rpm is not None:
        bucket = await store.take(_name("rpm", key), 1, key.rpm, key.rpm / MINUTE)
        _describe(admission.headers, "requests", key.rpm, bucket)
        if not bucket.allowed:
            raise LimitExceeded(f"key {key.name!r} is over its limit of {key.rpm} requests per minute",
                                bucket.retry_after, "requests")
    if key.tpm is not None:
        charge = min(tokens, key.tpm)  # a prompt larger than a minute's tokens waits for a full bucket
        bucket = await store.take(_name("tpm", key), charge, key.tpm, key.tpm / MINUTE)
        _describe(admission.headers, "tokens", key.tpm, bucket)
        if not bucket.allowed:
            if key.rpm is not None:  # not sent: the request does not count
                await store.give(_name("rpm", key), 1, key.rpm, key.rpm / MINUTE)
            raise LimitExceeded(f"key {key.name!r} is over its limit of {key.tpm} tokens per minute "
                                f"(this request needs about {tokens})", bucket.retry_after, "tokens")
        admission.charged_tokens = charge


def estimate_tokens(messages: Sequence[Any], max_tokens: int | None) -> int:
    """A rough count before the answer: ~4 characters a token, plus the answer's cap when given."""
    characters = 0
    for message in messages:  # a loop: usually one or two messages, for which a generator costs more
        if isinstance(message, dict):
            content = message.get("content") or ""
            characters += (len(content) if isinstance(content, str) else _characters(content)) + 16
    return math.ceil(characters / 4) + (max_tokens or 0)


def _characters(content: Any) -> int:
    try:
        return len(str(content))
    except RecursionError:  # nested deeper than repr goes; such a request is refused further on (400)
        return 0


def _name(limit: str, key: ClientKey) -> str:
    return key.state_names[limit]


_HEADER_NAMES = {what: tuple(f"x-ratelimit-{field}-{what}" for field in ("limit", "remaining", "reset"))
                 for what in ("requests", "tokens")}


def _describe(headers: dict[str, str], what: str, limit: int, bucket: Bucket) -> None:
    # OpenAI's names and formats: remaining as a whole number, reset as a duration ("6m0s", "20ms").
    limit_name, remaining_name, reset_name = _HEADER_NAMES[what]
    headers[limit_name] = str(limit)
    headers[remaining_name] = str(math.floor(bucket.remaining))
    headers[reset_name] = format_duration(bucket.reset)


def format_duration(seconds: float) -> str:
    """``1s``, ``20ms``, ``6m0s``: the format of OpenAI's ``x-ratelimit-reset-*`` headers."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"
