"""The gateway's Prometheus metrics (``GET /metrics``), written by the official ``prometheus-client``.

The request path only adds to plain numbers (:class:`_Family`); they are read into metric families,
exactly as prometheus-client's own metric objects expose theirs, when ``/metrics`` is scraped.

Every app has its own registry, so two gateways in one process do not mix their figures. Labels
are bounded: routes are the app's route patterns, keys the configured key names, providers the
configured providers, models the first ``max_models`` public names seen (a pass-through provider
takes any name a client sends, and every label set is kept for good), the others
counted together as ``(other)``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..routing import CircuitBreakers
from ..stream import StreamStats
from .status import circuit_state

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
DEFAULT_MAX_MODELS = 100
OTHER_MODELS = "(other)"

class _Value:
    """A counter's or gauge's child: a plain float."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def samples(self, kind: str) -> list[tuple[str, dict[str, str], float]]:
        if kind == "gauge":
            return [("", {}, self.value)]
        return [("_total", {}, self.value), *_created(self.created)]


class _Buckets:
    """A histogram's child: a count per bucket and the sum."""

    __slots__ = ("bounds", "les", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...], les: tuple[str, ...]) -> None:
        self.bounds, self.les = bounds, les  # the bounds, and as the ``le`` label writes them
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # the first bound >= amount

    def samples(self, kind: str) -> list[tuple[str, dict[str, str], float]]:
        cumulative = list(itertools.accumulate(self.counts))
        out = [("_bucket", {"le": le}, count) for le, count in zip(self.les, cumulative, strict=True)]
        out += [("_count", {}, cumulative[-1]), ("_sum", {}, self.sum), *_created(self.created)]
        return out


def _created(at: float) -> list[tuple[str, dict[str, str], float]]:
    # Exposed as prometheus-client exposes its own, which PROMETHEUS_DISABLE_CREATED_SERIES turns off.
    return [("_created", {}, at)] if prometheus_metrics._use_created else []


_C = TypeVar("_C", _Value, _Buckets)


class _Family(Collector, Generic[_C]):
    """One metric's children by label values, exposed exactly as prometheus-client exposes its own.

    prometheus-client's metric objects validate, convert and lock on every update, several times a
    request; these are plain numbers (updated from the event loop only), read at scrape time. The
    label sets are bounded (see above).
    """

    def __init__(self, kind: str, name: str, documentation: str, labelnames: list[str],
                 new_child: Callable[[], _C], registry: CollectorRegistry) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self._new_child: Callable[[], _C] = new_child
        self._children: dict[tuple[str, ...], _C] = {}
        registry.register(self)

    def labels(self, *values: str) -> _C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {values!r}")
            child = self._children[values] = self._new_child()
        return child

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        for values, child in self._children.items():
            labels = dict(zip(self.labelnames, values, strict=True))
            for suffix, extra, value in child.samples(self.kind):
                metric.add_sample(self.name + suffix, {**labels, **extra}, value)
        yield metric


def _counter(name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry) -> _Family[_Value]:
    return _Family("counter", name, documentation, labelnames, _Value, registry)


def _histogram(name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...],
               registry: CollectorRegistry) -> _Family[_Buckets]:
    bounds = (*buckets, math.inf)
    les = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]
    return _Family("histogram", name, documentation, labelnames, lambda: _Buckets(bounds, les), registry)


class GatewayMetrics:
    """The counters, histograms and gauges of one gateway."""

    def __init__(self, breakers: Callable[[], Mapping[str, CircuitBreakers]],
                 state: Callable[[], Mapping[str, Any]] = lambda: {"shared": False},
                 max_models: int = DEFAULT_MAX_MODELS) -> None:
        self.max_models = max_models
        self._models: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _counter(
            "netfly_requests", "Requests answered, by route, public model, key name and status",
            ["route", "model", "key", "status"], r)
        self.attempts = _counter(
            "netfly_upstream_attempts", "Upstream attempts, by provider and outcome", ["provider", "outcome"], r)
        self.rate_limited = _counter(
            "netfly_rate_limited", "Requests refused by a key's limit", ["key", "limit"], r)
        self.time_to_first_token = _histogram(
            "netfly_time_to_first_token_seconds", "Time from the request to the answer's first text",
            ["model"], _SECONDS, r)
        self.duration = _histogram(
            "netfly_request_duration_seconds", "Time to answer a request in full", ["route", "model"], _SECONDS, r)
        self.tokens = _histogram(
            "netfly_tokens_per_request", "Tokens of one request, prompt or completion", ["model", "kind"], _TOKENS, r)
        self.in_flight = _Family(
            "gauge", "netfly_streams_in_flight", "Answers being streamed now", ["model"], _Value, r)
        r.register(_BreakerCollector(breakers))
        r.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def model_label(self, model: str) -> str:
        """``model`` itself if it is one of the first ``max_models`` names seen, else ``(other)``.
        A name keeps its answer for good, so an in-flight gauge goes up and down on the same label."""
        if model in self._models:
            return model
        if len(self._models) >= self.max_models:
            return OTHER_MODELS
        self._models.add(model)
        return model

    def observe_stream(self, model: str, stats: StreamStats) -> None:
        """Attempts by provider and outcome, and the time to first token, of one answer."""
        for attempt in stats.attempts:
            provider = getattr(attempt, "provider", "") or stats.provider
            outcome = "success" if attempt.error is None else attempt.error.partition(":")[0]
            self.attempts.labels(provider, outcome).inc()
        if stats.time_to_first_token is not None:
            self.time_to_first_token.labels(model).observe(stats.time_to_first_token)


class _BreakerCollector(Collector):
    """Circuit-breaker state per group and provider, read from the routers at scrape time."""

    def __init__(self, breakers: Callable[[], Mapping[str, CircuitBreakers]]) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("netfly_circuit_breaker_state",
                                   "Circuit breaker per model group and provider: 0 closed, 1 half-open, 2 open",
                                   labels=["model", "provider"])
        for model, book in self._breakers().items():
            now = book.clock()
            for entry in book.snapshot():
                family.add_metric([model, entry.name], _BREAKER_STATES[circuit_state(entry, book.cooldown, now)])
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _StateCollector(Collector):
    """Whether the state store is shared now (Redis answering) and how often it fell back to memory."""

    def __init__(self, state: Callable[[], Mapping[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield GaugeMetricFamily("netfly_state_shared", "1 while limits, leases and usage are shared (Redis "
                                "answers), 0 while this process's memory serves", value=int(bool(state["shared"])))
        yield CounterMetricFamily("netfly_state_fallbacks", "Times this process lost its shared state store "
                                  "and fell back to its memory", value=state.get("fallbacks", 0))

    def describe(self) -> Iterator[Metric]:
        return iter(())
