"""Routing: one provider made of several — fallback, circuit breaker, pluggable order, hedging.

    Fallback = RetryProvider([Local, OpenAI, FreeNetfly], hedge_after=1.5, strategy=Fastest())
    async for text in Fallback.create_async_generator(None, messages):
        ...  # text from whichever provider served

:func:`RetryProvider` returns a *class* (a :class:`RoutedProvider` subclass), not an instance: a
provider like any other, with the whole ``Provider`` API, which can be registered for the CLI and
the gateway, and can even be a member of another router.

One rule keeps the output clean: a provider is left for the next one only *before* its first output
(text, reasoning, a tool-call fragment or a refusal). Once output has reached the caller, a failure
is raised as the provider raised it (a cut stream as :class:`StreamInterruptedError`); no other
provider's output is ever appended to it. When every provider fails, :class:`AllProvidersFailedError`
lists each one with its own error.

The order providers are tried in is a *strategy*: :class:`Ordered` (as configured), :class:`Shuffled`
(spreads load) or :class:`Fastest` (best recent time to first output), or any callable
``(providers, breakers) -> list``. The router's memory of each provider (circuit breaker, speed) is
its :class:`CircuitBreakers`; live checks of a provider are :mod:`netfly.health`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar, Protocol

from . import _checks
from .chunks import Item
from .errors import (
    AllProvidersFailedError,
    CircuitOpenError,
    ConfigurationError,
    ModelNotSupportedError,
    NetflyError,
)
from .events import ChatAccumulator
from .messages import validate_messages
from .provider import Provider, ValidatedMessages
from .stream import AttemptRecord, ChatRequest, ChatStream, PreparedCall, StreamStats

__all__ = [
    "CircuitBreakers", "Fastest", "Ordered", "ProviderRecord", "RetryProvider", "RoutePlan", "RoutedAttempt",
    "RoutedProvider", "RoutedStream", "RoutedStreamStats", "SharedBench", "Shuffled", "Strategy",
]

logger = logging.getLogger("netfly")

_TTFT_WEIGHT = 0.3  # weight of the newest time-to-first-token sample in the running average


# -- what a router remembers about its providers (pure, no I/O) ------------------------------------


@dataclass
class ProviderRecord:
    """A router's memory of one provider: its circuit breaker and its recent speed."""

    name: str
    consecutive_failures: int = 0
    opened_at: float | None = None  # monotonic time the circuit opened; None while closed
    probing: bool = False  # a half-open trial request is in flight
    time_to_first_token: float | None = None  # running average, seconds
    successes: int = 0
    failures: int = 0
    last_error: str | None = None


class SharedBench(Protocol):
    """Where the routers of several processes tell each other which provider is benched, and for how
    long (the gateway's is in Redis). Its methods must not wait: reads are local, writes are sent
    in the background."""

    def benched(self, name: str) -> tuple[float, str] | None:
        """Seconds ``name`` is still benched for and why, or ``None``."""

    def bench(self, name: str, seconds: float, reason: str) -> None:
        """Bench ``name`` everywhere for ``seconds``."""

    def clear(self, name: str) -> None:
        """``name`` works again (a trial request succeeded): lift its bench everywhere."""


class CircuitBreakers:
    """Circuit breakers and time-to-first-token averages of one router's providers (its memory;
    :func:`netfly.health.check_provider` is the live check).

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
        self._entries: dict[type[Provider], ProviderRecord] = {}
        self._bench: SharedBench | None = None
        self._scope = ""

    def share(self, bench: SharedBench, scope: str) -> None:
        """Open circuits and upstream ``Retry-After`` waits are told to, and read from, ``bench``
        (as ``SCOPE/PROVIDER``); running averages stay here."""
        self._bench, self._scope = bench, scope

    def entry(self, provider: type[Provider]) -> ProviderRecord:
        found = self._entries.get(provider)
        if found is None:
            found = self._entries[provider] = ProviderRecord(provider.name())
        return found

    def snapshot(self) -> list[ProviderRecord]:
        """Copies of every entry, for reports."""
        return [replace(entry) for entry in self._entries.values()]

    def reset(self) -> None:
        self._entries.clear()

    def blocked(self, provider: type[Provider]) -> CircuitOpenError | None:
        """Why ``provider`` must be skipped now, or ``None`` when it may be tried."""
        entry = self.entry(provider)
        if entry.opened_at is None:
            return self._benched_elsewhere(entry)
        remaining = entry.opened_at + self.cooldown - self.clock()
        if remaining > 0 or entry.probing:
            return CircuitOpenError(entry.name, max(0.0, remaining), entry.consecutive_failures, entry.last_error)
        return None

    def _benched_elsewhere(self, entry: ProviderRecord) -> CircuitOpenError | None:
        found = self._bench.benched(f"{self._scope}/{entry.name}") if self._bench is not None else None
        if found is None:
            return None
        remaining, reason = found
        return CircuitOpenError(entry.name, remaining, entry.consecutive_failures, reason)

    def started(self, provider: type[Provider]) -> None:
        entry = self.entry(provider)
        if entry.opened_at is not None:
            entry.probing = True  # the half-open trial: others keep skipping it meanwhile

    def succeeded(self, provider: type[Provider], time_to_first_token: float | None) -> None:
        entry = self.entry(provider)
        if entry.opened_at is not None and self._bench is not None:
            self._bench.clear(f"{self._scope}/{entry.name}")
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
            self._tell_bench(entry, self.cooldown)
        wait = getattr(error, "retry_after", None)
        if isinstance(wait, (int, float)) and wait > 0:
            self._tell_bench(entry, float(wait))  # the upstream asked every caller to wait

    def _tell_bench(self, entry: ProviderRecord, seconds: float) -> None:
        if self._bench is not None and seconds > 0:
            self._bench.bench(f"{self._scope}/{entry.name}", seconds, entry.last_error or "failing")

    def released(self, provider: type[Provider]) -> None:
        """The provider's request was cancelled: neither a success nor a failure."""
        self.entry(provider).probing = False

    def speed_key(self, provider: type[Provider]) -> tuple[int, float]:
        """Fewest recent failures first, then the best average time to first output; a provider not
        measured yet counts as fastest, so each one gets measured."""
        entry = self.entry(provider)
        return entry.consecutive_failures, entry.time_to_first_token or 0.0


# -- strategies: the order providers are tried in ---------------------------------------------------


class Strategy(Protocol):
    """Any callable that orders a router's providers for one call."""

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]: ...


@dataclass(frozen=True)
class Ordered:
    """The configured order."""

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        return list(providers)


@dataclass(frozen=True)
class Shuffled:
    """A new random order on every call (spreads load)."""

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        ordered = list(providers)
        random.shuffle(ordered)
        return ordered


@dataclass(frozen=True)
class Fastest:
    """Fewest recent failures, then best recent time to first output first (see
    :meth:`CircuitBreakers.speed_key`); ties keep the configured order, or a random one with ``shuffle``."""

    shuffle: bool = False

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        ordered = Shuffled()(providers, breakers) if self.shuffle else list(providers)
        ordered.sort(key=breakers.speed_key)  # stable
        return ordered


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
    """A validated routed call: the model to ask for, and each provider with its prepared call
    (built once, started only if the provider is tried) or the configuration error ruling it out."""

    model: str
    steps: list[tuple[type[Provider], PreparedCall | ConfigurationError]]

    @property
    def first_call(self) -> PreparedCall:
        for _, outcome in self.steps:  # a loop: asked once a call, for which a generator costs more
            if isinstance(outcome, PreparedCall):
                return outcome
        raise ValueError("a plan without a prepared call")  # plan() never makes one


class RoutedProvider(Provider):
    """A provider that routes each call over ``providers``. Make one with :func:`RetryProvider`.

    Class attributes:
      ``providers``            the providers;
      ``strategy``             the order they are tried in on each call: :class:`Ordered` (default),
                               :class:`Shuffled`, :class:`Fastest` or any callable
                               ``(providers, breakers) -> list`` (``shuffle`` and ``prefer_fastest``,
                               booleans, are the older way to say ``Shuffled()`` / ``Fastest()``);
      ``hedge_after``          seconds without output before the next provider starts in parallel
                               (``None``: one at a time); the first to yield output wins and the
                               others are cancelled, their connections closed;
      ``failure_threshold``    failures in a row before a provider is skipped (``None``: never);
      ``cooldown``             seconds a failing provider is skipped before one trial request;
      ``provider_max_retries`` attempts each provider gets within a routed call (``None``: its own
                               ``max_retries``); a per-call ``max_attempts=`` overrides both.
      ``breakers``             the router's :class:`CircuitBreakers` (its memory of each provider).
    """

    label = "RoutedProvider"
    providers: ClassVar[Sequence[type[Provider]]] = ()
    strategy: ClassVar[Strategy | None] = None
    shuffle: ClassVar[bool] = False
    prefer_fastest: ClassVar[bool] = False
    hedge_after: ClassVar[float | None] = None
    failure_threshold: ClassVar[int | None] = 3
    cooldown: ClassVar[float] = 30.0
    provider_max_retries: ClassVar[int | None] = None
    default_model = ""  # empty: each provider uses its own default model
    breakers: ClassVar[CircuitBreakers]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_settings(cls)
        cls.providers = tuple(cls.providers)
        own = cls.__dict__
        if "working" not in own:
            cls.working = any(p.working for p in cls.providers)
        if "models" not in own:
            cls.models = _union_models(cls.providers)
        cls.breakers = CircuitBreakers(cls.failure_threshold, cls.cooldown)  # every router remembers on its own

    @classmethod
    def order(cls, providers: Sequence[type[Provider]]) -> list[type[Provider]]:
        """The order to try ``providers`` in for one call, by the router's strategy."""
        strategy = cls.strategy
        if strategy is None:
            strategy = Fastest(shuffle=cls.shuffle) if cls.prefer_fastest else Shuffled() if cls.shuffle else Ordered()
        return list(strategy(providers, cls.breakers))

    @classmethod
    def get_model(cls, model: str | None) -> str:
        """Empty → ``default_model`` (by default empty too: each provider then uses its own);
        otherwise the model, which at least one provider must support."""
        if model is not None and not isinstance(model, str):
            raise ConfigurationError(f"model must be a string, got {type(model).__name__}", param="model")
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
        messages = ValidatedMessages(validate_messages(messages))  # one clear error, not one per provider
        resolved = cls.get_model(model)
        if cls.provider_max_retries is not None and "max_attempts" not in kwargs:
            kwargs.setdefault("max_retries", cls.provider_max_retries)
        steps: list[tuple[type[Provider], PreparedCall | ConfigurationError]] = []
        prepared = False
        for provider in cls.providers:
            try:
                steps.append((provider, provider.prepare(resolved, messages, proxy, **kwargs)))
                prepared = True
            except ConfigurationError as exc:
                steps.append((provider, exc))
        if not prepared:
            first = next(outcome for _, outcome in steps if isinstance(outcome, ConfigurationError))
            reasons = "; ".join(f"{p.name()}: {outcome}" for p, outcome in steps)
            raise ConfigurationError(f"{cls.name()}: no provider can take this request: {reasons}", param=first.param)
        return RoutePlan(resolved, steps)

    @classmethod
    def prepare(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> PreparedCall:
        """Validate the call (see :meth:`plan`); its ``request`` is the first available provider's."""
        plan = cls.plan(model, messages, proxy, **kwargs)
        return PreparedCall(plan.first_call.request, partial(RoutedStream, cls, plan))

    @classmethod
    def build_request(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatRequest:
        """Validate the call (see :meth:`plan`) and return the first available provider's request."""
        return cls.prepare(model, messages, proxy, **kwargs).request

    @classmethod
    def stream(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> RoutedStream:
        """Start a routed answer: a :class:`ChatStream` over whichever provider serves."""
        return RoutedStream(cls, cls.plan(model, messages, proxy, **kwargs))


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
    strategy: Strategy | None = None,
    **attributes: Any,
) -> type[RoutedProvider]:
    """Return a new provider *class* (a :class:`RoutedProvider` subclass) that routes over ``providers``.

    ``strategy`` orders the providers on each call (default :class:`Ordered`; ``shuffle=True`` and
    ``prefer_fastest=True`` are the older spellings of :class:`Shuffled` and :class:`Fastest`).
    ``max_retries`` is the number of attempts each provider gets within a routed call (``None``
    keeps each provider's own). Other class attributes (``default_model``, ``model_aliases``,
    ``working``…) may be passed too.
    """
    providers = tuple(providers)
    if not providers:
        raise ConfigurationError("RetryProvider needs at least one provider")
    return RoutedProvider.configure(
        name=name or "RetryProvider",
        providers=providers,
        strategy=strategy,
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
    _checks.optional_seconds(f"{where}: hedge_after", cls.hedge_after, positive=True)
    _checks.seconds(f"{where}: cooldown", cls.cooldown)
    for attr in ("failure_threshold", "provider_max_retries"):
        _checks.optional_whole(f"{where}: {attr}", getattr(cls, attr))
    if cls.strategy is not None and not callable(cls.strategy):
        raise ConfigurationError(
            f"{where}: strategy must be callable (providers, breakers) -> list, got {cls.strategy!r}"
        )


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


_Queue = deque[tuple[type[Provider], PreparedCall]]  # providers still to try, with their calls


@dataclass(eq=False)
class _Runner:
    """One provider's stream in a routed call, with the task reading it up to its first output."""

    provider: type[Provider]
    name: str
    stream: ChatStream
    started: float
    # Read in a task only when providers may overlap (hedging); else awaited in place.
    first: asyncio.Task[tuple[list[Item], bool]] | None = None
    output: tuple[list[Item], bool] | None = None  # the items up to its first output; whether it ended


async def _until_output(stream: ChatStream) -> tuple[list[Item], bool]:
    """Read ``stream`` up to its first output; the items read, and whether the stream ended."""
    items: list[Item] = []
    while not stream.delivered:
        try:
            items += await stream._next_noted()
        except StopAsyncIteration:
            return items, True
    return items, False


class RoutedStream(ChatStream):
    """The stream of a routed call: a :class:`ChatStream` whose source is whichever provider wins.

    ``stats`` is a :class:`RoutedStreamStats`; ``request`` becomes the serving provider's request.
    """

    stats: RoutedStreamStats

    def __init__(self, router: type[RoutedProvider], plan: RoutePlan) -> None:
        self.router = router
        self._plan = plan
        self._mirrored: ChatStream | None = None  # the served stream whose answer this one shares
        name = router.name()
        # Nothing to assemble until a provider serves, and then often that provider's own assembly to
        # share (see _served_by): no accumulator of its own before.
        self._set_up(plan.first_call.request, RoutedStreamStats(provider=name, model=plan.model or None, router=name),
                     None)

    def _queue(self, errors: dict[str, BaseException]) -> _Queue:
        """The providers to try, in the strategy's order, with their calls; those ruled out are skipped."""
        calls: dict[type[Provider], PreparedCall] = {}
        for provider, outcome in self._plan.steps:
            if isinstance(outcome, ConfigurationError):
                self._skip(errors, provider.name(), outcome)
            else:
                calls[provider] = outcome
        return deque((p, calls[p]) for p in self.router.order(list(calls)))

    def _served_by(self, winner: _Runner) -> None:
        """``winner`` answered first: from now on its stream is this one's source."""
        served = winner.stream
        self.stats.provider = served.stats.provider  # for a nested router: the one that served
        self.request = served.request
        self.router.breakers.succeeded(winner.provider, served.stats.time_to_first_token)
        self.at_end = served.at_end
        if self._events_mode and len(served.stats.attempts) == 1:
            # Read with reads(): every read handed on here is one the served stream noted already, into
            # the very answer this one would assemble again. Share it; mirror the figures (_note_read).
            self._accumulate(served._acc)
            self._mirrored = served
        else:
            self._accumulate(ChatAccumulator())

    def _note_read(self, read: list[Item]) -> None:
        served = self._mirrored
        if served is None:
            super()._note_read(read)
            return
        stats, theirs = self.stats, served.stats
        if stats.time_to_first_token is None and theirs.time_to_first_token is not None:
            stats.time_to_first_token = time.monotonic() - self._started
        stats.chunks, stats.characters = theirs.chunks, theirs.characters

    async def _source(self) -> AsyncGenerator[list[Item], None]:
        stats, book = self.stats, self.router.breakers
        self._started = started = time.monotonic()
        errors: dict[str, BaseException] = {}
        queue = self._queue(errors)
        runners: list[_Runner] = []
        winner: _Runner | None = None
        try:
            hedged = self.router.hedge_after is not None
            winner = await (self._race(queue, runners, errors) if hedged else self._one_by_one(queue, errors))
            self._served_by(winner)
            assert winner.output is not None  # the race returns a runner that has answered
            items, ended = winner.output
            if items:
                yield items
            served = winner.stream
            while not ended:
                try:
                    read = await served._next_noted()
                    self.at_end = served.at_end
                    yield read
                except StopAsyncIteration:
                    ended = True
                except NetflyError as exc:
                    # Output reached the caller: switching now would mix two answers. The provider's
                    # error is raised as it is, as for a single provider: a cut stream is already a
                    # StreamInterruptedError carrying the partial result.
                    book.failed(winner.provider, exc)
                    raise
            self._adopt_result(served)
        finally:
            if runners:  # closed or cancelled during the race
                await self._cancel(runners, "the routed stream was closed")
            if winner is not None:
                await winner.stream.aclose()
                self._collect(winner, None if self.result is not None else "closed before the end")
            stats.duration = time.monotonic() - started

    def _adopt_result(self, served: ChatStream) -> None:
        """The result once the serving provider's stream ended: that stream's own when it made one
        attempt (then it assembled the very events handed on here), else assembled here."""
        result = served.result
        if result is None or len(served.stats.attempts) != 1:
            self._finish(result.malformed_chunks if result is not None else 0)
            return
        self.result = result
        if result.model:
            self.stats.model = result.model

    async def _race(
        self, queue: _Queue, runners: list[_Runner], errors: dict[str, BaseException]
    ) -> _Runner:
        """Race to the first output, hedging: the next provider starts alongside after ``hedge_after``."""
        router = self.router
        while True:
            if not runners and not self._launch(queue, runners, errors, hedged=True):
                raise AllProvidersFailedError(errors)
            wait = None
            if router.hedge_after is not None and queue:
                wait = max(0.0, runners[-1].started + router.hedge_after - time.monotonic())
            done, _ = await asyncio.wait(
                [runner.first for runner in runners if runner.first is not None],
                timeout=wait, return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                logger.info(
                    "%s: no output from %s after %.2f s; starting the next provider alongside",
                    router.name(), runners[-1].name, router.hedge_after,
                )
                self._launch(queue, runners, errors, hedged=True)
                continue
            chosen = None
            for runner in [r for r in runners if r.first in done]:
                assert runner.first is not None
                error = _first_output_error(runner.first)
                if error is None:
                    runner.output = runner.first.result()
                    chosen = chosen or runner  # a second one done in the same instant loses below
                    continue
                runners.remove(runner)
                self._failed_before_output(runner, error, errors)
            if chosen is not None:
                runners.remove(chosen)
                await self._cancel(runners, f"{chosen.name} answered first")
                runners.clear()
                return chosen

    async def _one_by_one(self, queue: _Queue, errors: dict[str, BaseException]) -> _Runner:
        """Fail over one provider at a time, each read in this task: with nothing to overlap, a
        task per provider would only cost a task and a wait per call."""
        runners: list[_Runner] = []
        while self._launch(queue, runners, errors, hedged=False):
            runner = runners.pop()
            try:
                runner.output = await _until_output(runner.stream)
                return runner
            except NetflyError as error:
                self._failed_before_output(runner, error, errors)
            except BaseException:  # cancelled, closed, or a bug: never hidden behind a fallback
                await runner.stream.aclose()
                self.router.breakers.released(runner.provider)
                self._collect(runner, "cancelled: the routed stream was closed")
                raise
        raise AllProvidersFailedError(errors)

    def _failed_before_output(self, runner: _Runner, error: NetflyError, errors: dict[str, BaseException]) -> None:
        self.router.breakers.failed(runner.provider, error)
        self._collect(runner)
        errors[_unique(errors, runner.name)] = error
        logger.warning(
            "%s: %s failed before its first output (%s: %s)",
            self.router.name(), runner.name, type(error).__name__, error,
        )

    def _launch(
        self, queue: _Queue, runners: list[_Runner], errors: dict[str, BaseException], *, hedged: bool
    ) -> bool:
        """Start the next provider that may be tried (reading it in a task when ``hedged``);
        ``False`` when none is left."""
        book = self.router.breakers
        while queue:
            provider, call = queue.popleft()
            name = provider.name()
            blocked = book.blocked(provider)
            if blocked is not None:
                self._skip(errors, name, blocked)
                continue
            try:
                stream = call.open()
            except ConfigurationError as exc:
                self._skip(errors, name, exc)
                continue
            book.started(provider)
            task = asyncio.create_task(_until_output(stream)) if hedged else None
            runners.append(_Runner(provider, name, stream, time.monotonic(), task))
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
        tasks = [runner.first for runner in runners if runner.first is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # finished in the same instant; its outcome is dropped
        for runner in runners:
            await runner.stream.aclose()
            self.router.breakers.released(runner.provider)
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
            provider = getattr(record, "provider", "") or runner.name
            attempts.append(RoutedAttempt(number=len(attempts) + 1, error=error, status=record.status,
                                          duration=duration, provider=provider))


def _first_output_error(task: asyncio.Task[tuple[list[Item], bool]]) -> NetflyError | None:
    """The error a provider failed with before its first output, or ``None`` when it answered."""
    error = task.exception()
    if error is None:
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
