"""Routing: one provider made of several — fallback, circuit breaker, fastest-first order, hedging.

    Fallback = RetryProvider([Local, OpenAI, FreeNetfly], hedge_after=1.5)
    async for text in Fallback.create_async_generator(None, messages):
        ...  # text from whichever provider served

The result is a provider class like any other: it has the whole ``Provider`` API, can be registered
for the CLI and the gateway, and can even be a member of another router.

One rule keeps the output clean: a provider is left for the next one only *before* its first
chunk. Once text has reached the caller, a failure is raised as the provider raised it (a cut stream
as :class:`StreamInterruptedError`); no other provider's text is ever appended to it. When every provider fails,
:class:`AllProvidersFailedError` lists each one with its own error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from .errors import (
    AllProvidersFailedError,
    CircuitOpenError,
    ConfigurationError,
    ModelNotSupportedError,
    NetflyError,
)
from .health import format_stats
from .messages import validate_messages
from .provider import Provider
from .stream import AttemptRecord, ChatRequest, ChatStream, StreamStats

__all__ = [
    "HealthBook", "ProviderHealth", "RetryProvider", "RoutePlan", "RoutedAttempt", "RoutedProvider",
    "RoutedStream", "RoutedStreamStats", "format_stats",
]

logger = logging.getLogger("netfly")

_TTFT_WEIGHT = 0.3  # weight of the newest time-to-first-token sample in the running average


# -- what a router remembers about its providers (pure, no I/O) ------------------------------------


@dataclass
class ProviderHealth:
    """A router's memory of one provider: its circuit breaker and its recent speed."""

    name: str
    consecutive_failures: int = 0
    opened_at: float | None = None  # monotonic time the circuit opened; None while closed
    probing: bool = False  # a half-open trial request is in flight
    time_to_first_token: float | None = None  # running average, seconds
    successes: int = 0
    failures: int = 0
    last_error: str | None = None


class HealthBook:
    """Circuit breakers and time-to-first-token averages of one router's providers.

    A provider that fails ``failure_threshold`` times in a row is skipped for ``cooldown`` seconds.
    Then one trial request is let through (half-open): success closes the circuit, failure opens it
    again for another cool-down. ``failure_threshold=None`` turns the breaker off.
    """

    def __init__(
        self, failure_threshold: int | None, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.clock = clock
        self._entries: dict[type[Provider], ProviderHealth] = {}

    def entry(self, provider: type[Provider]) -> ProviderHealth:
        found = self._entries.get(provider)
        if found is None:
            found = self._entries[provider] = ProviderHealth(provider.name())
        return found

    def snapshot(self) -> list[ProviderHealth]:
        """Copies of every entry, for reports."""
        return [replace(entry) for entry in self._entries.values()]

    def reset(self) -> None:
        self._entries.clear()

    def blocked(self, provider: type[Provider]) -> CircuitOpenError | None:
        """Why ``provider`` must be skipped now, or ``None`` when it may be tried."""
        entry = self.entry(provider)
        if entry.opened_at is None:
            return None
        remaining = entry.opened_at + self.cooldown - self.clock()
        if remaining > 0 or entry.probing:
            return CircuitOpenError(entry.name, max(0.0, remaining), entry.consecutive_failures, entry.last_error)
        return None

    def started(self, provider: type[Provider]) -> None:
        entry = self.entry(provider)
        if entry.opened_at is not None:
            entry.probing = True  # the half-open trial: others keep skipping it meanwhile

    def succeeded(self, provider: type[Provider], time_to_first_token: float | None) -> None:
        entry = self.entry(provider)
        entry.successes += 1
        entry.consecutive_failures = 0
        entry.opened_at = None
        entry.probing = False
        if time_to_first_token is not None:
            previous = entry.time_to_first_token
            entry.time_to_first_token = (
                time_to_first_token
                if previous is None
                else previous + _TTFT_WEIGHT * (time_to_first_token - previous)
            )

    def failed(self, provider: type[Provider], error: BaseException) -> None:
        entry = self.entry(provider)
        entry.failures += 1
        entry.consecutive_failures += 1
        entry.last_error = f"{type(error).__name__}: {error}"
        trial_failed = entry.opened_at is not None
        entry.probing = False
        threshold = self.failure_threshold
        if threshold is not None and (trial_failed or entry.consecutive_failures >= threshold):
            entry.opened_at = self.clock()
            logger.warning(
                "%s: %d failure(s) in a row; skipped for %.1f s", entry.name, entry.consecutive_failures, self.cooldown
            )

    def released(self, provider: type[Provider]) -> None:
        """The provider's request was cancelled: neither a success nor a failure."""
        self.entry(provider).probing = False

    def order(
        self, providers: Iterable[type[Provider]], *, shuffle: bool = False, prefer_fastest: bool = False
    ) -> list[type[Provider]]:
        """The order to try ``providers`` in.

        ``prefer_fastest``: fewest recent failures first, then the best average time to first
        token; a provider not measured yet counts as fastest, so each one gets measured.
        """
        ordered = list(providers)
        if shuffle:
            random.shuffle(ordered)
        if prefer_fastest:
            ordered.sort(key=self._speed_key)  # stable: ties keep the configured (or shuffled) order
        return ordered

    def _speed_key(self, provider: type[Provider]) -> tuple[int, float]:
        entry = self.entry(provider)
        return entry.consecutive_failures, entry.time_to_first_token or 0.0


# -- the router provider ---------------------------------------------------------------------------


@dataclass
class RoutedAttempt(AttemptRecord):
    """One attempt of a routed stream, with the provider that made it."""

    provider: str = ""


@dataclass
class RoutedStreamStats(StreamStats):
    """:class:`StreamStats` of a routed stream: ``provider`` is the provider that served the answer,
    ``attempts`` are every provider's attempts in the order they ended, ``skipped`` the providers
    not tried (cooling down, or unable to take the request) with the reason."""

    router: str = ""
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class RoutePlan:
    """A validated routed call: the model to ask for, the options for every provider, and each
    provider with the request it would send or the configuration error that rules it out."""

    model: str
    kwargs: dict[str, Any]
    steps: list[tuple[type[Provider], ChatRequest | ConfigurationError]]

    @property
    def first_request(self) -> ChatRequest:
        return next(outcome for _, outcome in self.steps if isinstance(outcome, ChatRequest))


class RoutedProvider(Provider):
    """A provider that routes each call over ``providers``. Make one with :func:`RetryProvider`.

    Class attributes:
      ``providers``            the providers, in the order they are tried;
      ``shuffle``              shuffle that order on every call (spreads load);
      ``prefer_fastest``       try the provider with the best recent time to first token first;
      ``hedge_after``          seconds without a chunk before the next provider starts in parallel
                               (``None``: one at a time); the first to yield a chunk wins and the
                               others are cancelled, their connections closed;
      ``failure_threshold``    failures in a row before a provider is skipped (``None``: never);
      ``cooldown``             seconds a failing provider is skipped before one trial request;
      ``provider_max_retries`` attempts each provider gets within a routed call (``None``: its own
                               ``max_retries``); a per-call ``max_retries=`` overrides both.
    """

    label = "RoutedProvider"
    providers: ClassVar[Sequence[type[Provider]]] = ()
    shuffle: ClassVar[bool] = False
    prefer_fastest: ClassVar[bool] = False
    hedge_after: ClassVar[float | None] = None
    failure_threshold: ClassVar[int | None] = 3
    cooldown: ClassVar[float] = 30.0
    provider_max_retries: ClassVar[int | None] = None
    default_model = ""  # empty: each provider uses its own default model
    health: ClassVar[HealthBook]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_settings(cls)
        cls.providers = tuple(cls.providers)
        own = cls.__dict__
        if "working" not in own:
            cls.working = any(p.working for p in cls.providers)
        if "models" not in own:
            cls.models = _union_models(cls.providers)
        cls.health = HealthBook(cls.failure_threshold, cls.cooldown)  # every router remembers on its own

    @classmethod
    def get_model(cls, model: str | None) -> str:
        """Empty → ``default_model`` (by default empty too: each provider then uses its own);
        otherwise the model, which at least one provider must support."""
        if model is not None and not isinstance(model, str):
            raise ConfigurationError(f"model must be a string, got {type(model).__name__}")
        if not model:
            return cls.default_model
        model = cls.model_aliases.get(model, model)
        if cls.providers and not any(_accepts(p, model) for p in cls.providers):
            raise ModelNotSupportedError(cls.name(), model, cls.models)
        return model

    @classmethod
    async def list_models(cls, api_key: str | None = None) -> list[str]:
        """The declared ``models``; when a provider declares none, every provider's list together."""
        _refuse_shared_key(cls, api_key)
        if cls.models:
            return list(cls.models)
        listed = await asyncio.gather(*(p.list_models() for p in cls.providers), return_exceptions=True)
        errors: dict[str, BaseException] = {}
        models: dict[str, None] = {}
        for provider, outcome in zip(cls.providers, listed, strict=True):
            if isinstance(outcome, list):
                models.update(dict.fromkeys(outcome))
            elif isinstance(outcome, NetflyError):
                errors[_unique(errors, provider.name())] = outcome
            else:
                raise outcome
        if not models and errors:
            raise AllProvidersFailedError(errors)
        return list(models)

    @classmethod
    def plan(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> RoutePlan:
        """Validate the call for every provider; no I/O. Raises :class:`ConfigurationError` when
        no provider can take it."""
        if not cls.providers:
            raise ConfigurationError(f"{cls.name()} has no providers")
        _refuse_shared_key(cls, kwargs.get("api_key"))
        validate_messages(messages)  # one clear error instead of the same one per provider
        resolved = cls.get_model(model)
        if cls.provider_max_retries is not None:
            kwargs.setdefault("max_retries", cls.provider_max_retries)
        steps: list[tuple[type[Provider], ChatRequest | ConfigurationError]] = []
        for provider in cls.providers:
            try:
                steps.append((provider, provider.build_request(resolved, messages, proxy, **dict(kwargs))))
            except ConfigurationError as exc:
                steps.append((provider, exc))
        if not any(isinstance(outcome, ChatRequest) for _, outcome in steps):
            reasons = "; ".join(f"{p.name()}: {outcome}" for p, outcome in steps)
            raise ConfigurationError(f"{cls.name()}: no provider can take this request: {reasons}")
        return RoutePlan(resolved, kwargs, steps)

    @classmethod
    def build_request(
        cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any
    ) -> ChatRequest:
        """Validate the call (see :meth:`plan`) and return the first available provider's request."""
        return cls.plan(model, messages, proxy, **kwargs).first_request

    @classmethod
    def stream(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> RoutedStream:
        """Start a routed answer: an async iterator of text with ``.stats`` and ``.result``."""
        return RoutedStream(cls, cls.plan(model, messages, proxy, **kwargs), messages, proxy)


def RetryProvider(  # named like the class it stands for, as in gpt4free
    providers: Sequence[type[Provider]],
    *,
    shuffle: bool = False,
    name: str | None = None,
    max_retries: int | None = None,
    failure_threshold: int | None = 3,
    cooldown: float = 30.0,
    prefer_fastest: bool = False,
    hedge_after: float | None = None,
    **attributes: Any,
) -> type[RoutedProvider]:
    """A provider class that tries ``providers`` in turn; see :class:`RoutedProvider`.

    ``max_retries`` is the number of attempts each provider gets within a routed call (``None``
    keeps each provider's own). Other class attributes (``default_model``, ``model_aliases``,
    ``working``…) may be passed too.
    """
    providers = tuple(providers)
    if not providers:
        raise ConfigurationError("RetryProvider needs at least one provider")
    return RoutedProvider.configure(  # type: ignore[return-value]
        name=name or "RetryProvider",
        providers=providers,
        shuffle=shuffle,
        provider_max_retries=max_retries,
        failure_threshold=failure_threshold,
        cooldown=cooldown,
        prefer_fastest=prefer_fastest,
        hedge_after=hedge_after,
        **attributes,
    )


def _check_settings(cls: type[RoutedProvider]) -> None:
    where = cls.name()
    for provider in cls.providers:
        if not (isinstance(provider, type) and issubclass(provider, Provider)):
            raise ConfigurationError(f"{where}: providers must be Provider classes, got {provider!r}")
    hedge = cls.hedge_after
    if hedge is not None and (isinstance(hedge, bool) or not isinstance(hedge, (int, float)) or hedge <= 0):
        raise ConfigurationError(f"{where}: hedge_after must be a positive number of seconds or None, got {hedge!r}")
    if isinstance(cls.cooldown, bool) or not isinstance(cls.cooldown, (int, float)) or cls.cooldown < 0:
        raise ConfigurationError(f"{where}: cooldown must be a number of seconds >= 0, got {cls.cooldown!r}")
    for attr in ("failure_threshold", "provider_max_retries"):
        value = getattr(cls, attr)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{where}: {attr} must be a whole number >= 1 or None, got {value!r}")


def _refuse_shared_key(cls: type[RoutedProvider], api_key: str | None) -> None:
    # One key handed to every provider would reach servers it was never meant for.
    if api_key:
        raise ConfigurationError(
            f"{cls.name()}: a per-call api_key would be sent to every provider; set each provider's own key"
        )


def _union_models(providers: Sequence[type[Provider]]) -> tuple[str, ...]:
    if any(not p.models for p in providers):
        return ()  # one provider takes any model name, so the router does too
    seen: dict[str, None] = {}
    for provider in providers:
        seen.update(dict.fromkeys(provider.models))
    return tuple(seen)


def _accepts(provider: type[Provider], model: str) -> bool:
    try:
        provider.get_model(model)
    except ConfigurationError:
        return False
    return True


# -- the routed stream -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Runner:
    """One provider's stream in a routed call, with the task waiting for its first chunk."""

    provider: type[Provider]
    name: str
    stream: ChatStream
    first: asyncio.Task[str]
    started: float


class RoutedStream(ChatStream):
    """The stream of a routed call: the :class:`ChatStream` interface over whichever provider wins.

    ``stats`` is a :class:`RoutedStreamStats`; ``request`` becomes the serving provider's request.
    """

    # ChatStream.__init__ is not called: its attempt loop is replaced by routing (see _route).
    def __init__(self, router: type[RoutedProvider], plan: RoutePlan, messages: Any, proxy: str | None) -> None:
        self.router = router
        self.request = plan.first_request
        self.stats: RoutedStreamStats = RoutedStreamStats(
            provider=router.name(), router=router.name(), model=plan.model or None
        )
        self.result = None
        self._plan = plan
        self._messages = messages
        self._proxy = proxy
        self._parts = []
        self._iterator = self._route()

    async def _route(self) -> AsyncGenerator[str, None]:
        router, stats, book = self.router, self.stats, self.router.health
        started = time.monotonic()
        errors: dict[str, BaseException] = {}
        for provider, outcome in self._plan.steps:
            if isinstance(outcome, ConfigurationError):
                self._skip(errors, provider.name(), outcome)
        usable = [provider for provider, outcome in self._plan.steps if isinstance(outcome, ChatRequest)]
        queue = deque(book.order(usable, shuffle=router.shuffle, prefer_fastest=router.prefer_fastest))
        runners: list[_Runner] = []
        chosen: _Runner | None = None
        winner: _Runner | None = None
        try:
            # Race to the first chunk: providers fail over one by one, or overlap when hedging.
            while chosen is None:
                if not runners and not self._launch(queue, runners, errors):
                    raise AllProvidersFailedError(errors)
                wait = None
                if router.hedge_after is not None and queue:
                    wait = max(0.0, runners[-1].started + router.hedge_after - time.monotonic())
                done, _ = await asyncio.wait(
                    [runner.first for runner in runners], timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    logger.info(
                        "%s: no text from %s after %.2f s; starting the next provider alongside",
                        router.name(), runners[-1].name, router.hedge_after,
                    )
                    self._launch(queue, runners, errors)
                    continue
                for runner in [r for r in runners if r.first in done]:
                    error = _first_chunk_error(runner.first)
                    if error is None:
                        chosen = chosen or runner  # a second one done in the same instant loses below
                        continue
                    runners.remove(runner)
                    book.failed(runner.provider, error)
                    self._collect(runner)
                    errors[_unique(errors, runner.name)] = error
                    logger.warning(
                        "%s: %s failed before its first chunk (%s: %s)",
                        router.name(), runner.name, type(error).__name__, error,
                    )
            runners.remove(chosen)
            winner = chosen
            await self._cancel(runners, f"{winner.name} answered first")
            runners.clear()

            stats.provider = winner.stream.stats.provider  # for a nested router: the one that served
            self.request = winner.stream.request
            book.succeeded(winner.provider, winner.stream.stats.time_to_first_token)
            try:
                text = winner.first.result()
            except StopAsyncIteration:  # an empty answer, complete
                pass
            else:
                stats.time_to_first_token = time.monotonic() - started
                while True:
                    stats.chunks += 1
                    stats.characters += len(text)
                    self._parts.append(text)
                    yield text
                    try:
                        text = await winner.stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except NetflyError as exc:
                        # Text reached the caller: switching now would mix two answers. The
                        # provider's error is raised as it is, as for a single provider: a cut
                        # stream is already a StreamInterruptedError carrying the partial text.
                        book.failed(winner.provider, exc)
                        raise
            self.result = winner.stream.result
            if winner.stream.stats.model:
                stats.model = winner.stream.stats.model
        finally:
            if runners:  # closed or cancelled during the race
                await self._cancel(runners, "the routed stream was closed")
            if winner is not None:
                await winner.stream.aclose()
                self._collect(winner, None if self.result is not None else "closed before the end")
            stats.duration = time.monotonic() - started

    def _launch(self, queue: deque[type[Provider]], runners: list[_Runner], errors: dict[str, BaseException]) -> bool:
        """Start the next provider that may be tried; ``False`` when none is left."""
        book = self.router.health
        while queue:
            provider = queue.popleft()
            name = provider.name()
            blocked = book.blocked(provider)
            if blocked is not None:
                self._skip(errors, name, blocked)
                continue
            try:
                stream = provider.stream(self._plan.model, self._messages, self._proxy, **dict(self._plan.kwargs))
            except ConfigurationError as exc:
                self._skip(errors, name, exc)
                continue
            book.started(provider)
            runners.append(_Runner(provider, name, stream, asyncio.create_task(stream.__anext__()), time.monotonic()))
            return True
        return False

    def _skip(self, errors: dict[str, BaseException], name: str, error: NetflyError) -> None:
        key = _unique(errors, name)
        errors[key] = error
        self.stats.skipped[key] = f"{type(error).__name__}: {error}"

    async def _cancel(self, runners: list[_Runner], reason: str) -> None:
        """Stop the losers at once: cancelling the pending read closes its connection."""
        if not runners:
            return
        for runner in runners:
            runner.first.cancel()
        await asyncio.wait([runner.first for runner in runners])
        for runner in runners:
            if not runner.first.cancelled():
                runner.first.exception()  # finished in the same instant; its outcome is dropped
            await runner.stream.aclose()
            self.router.health.released(runner.provider)
            self._collect(runner, f"cancelled: {reason}")

    def _collect(self, runner: _Runner, unfinished: str | None = None) -> None:
        """Copy a finished runner's attempts into the routed stats, naming the provider."""
        attempts = self.stats.attempts
        records = runner.stream.stats.attempts or [AttemptRecord(0)]
        for record in records:
            error, duration = record.error, record.duration
            if error is None and unfinished is not None and not duration:
                error, duration = unfinished, time.monotonic() - runner.started
            if error is None and record.number == 0:
                continue  # the stream never started and nothing is to be said about it
            attempts.append(RoutedAttempt(
                number=len(attempts) + 1,
                error=error,
                status=record.status,
                duration=duration,
                provider=getattr(record, "provider", "") or runner.name,
            ))


def _first_chunk_error(task: asyncio.Task[str]) -> NetflyError | None:
    """The error a provider failed with before its first chunk, or ``None`` when it answered."""
    error = task.exception()
    if error is None or isinstance(error, StopAsyncIteration):
        return None
    if isinstance(error, NetflyError):
        return error
    raise error  # not a provider failure but a bug: never hide it behind a fallback


def _unique(errors: dict[str, BaseException], name: str) -> str:
    key, n = name, 1
    while key in errors:
        n += 1
        key = f"{name} #{n}"
    return key
