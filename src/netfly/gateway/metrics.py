"""The gateway's Prometheus metrics (``GET /metrics``), made with the official ``prometheus-client``.

Every app has its own registry, so two gateways in one process do not mix their figures. Labels
are bounded: routes are the app's route patterns, keys the configured key names, providers the
configured providers, models the first ``max_models`` public names seen (a pass-through provider
takes any name a client sends, and every label set is kept for good: about 16 KiB each), the others
counted together as ``(other)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from ..routing import CircuitBreakers
from ..stream import StreamStats
from .status import circuit_state

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
DEFAULT_MAX_MODELS = 100
OTHER_MODELS = "(other)"

_M = TypeVar("_M", bound=MetricWrapperBase)


class _Labelled(Generic[_M]):
    """A metric whose children are kept by label values: prometheus-client's ``labels()`` validates,
    converts and locks on every call, several times a request. The label sets are bounded (see above)."""

    def __init__(self, metric: _M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def labels(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class GatewayMetrics:
    """The counters, histograms and gauges of one gateway."""

    def __init__(self, breakers: Callable[[], Mapping[str, CircuitBreakers]],
                 state: Callable[[], Mapping[str, Any]] = lambda: {"shared": False},
                 max_models: int = DEFAULT_MAX_MODELS) -> None:
        self.max_models = max_models
        self._models: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Labelled(Counter(
            "netfly_requests", "Requests answered, by route, public model, key name and status",
            ["route", "model", "key", "status"], registry=r))
        self.attempts = _Labelled(Counter(
            "netfly_upstream_attempts", "Upstream attempts, by provider and outcome",
            ["provider", "outcome"], registry=r))
        self.rate_limited = _Labelled(Counter(
            "netfly_rate_limited", "Requests refused by a key's limit", ["key", "limit"], registry=r))
        self.time_to_first_token = _Labelled(Histogram(
            "netfly_time_to_first_token_seconds", "Time from the request to the answer's first text",
            ["model"], buckets=_SECONDS, registry=r))
        self.duration = _Labelled(Histogram(
            "netfly_request_duration_seconds", "Time to answer a request in full",
            ["route", "model"], buckets=_SECONDS, registry=r))
        self.tokens = _Labelled(Histogram(
            "netfly_tokens_per_request", "Tokens of one request, prompt or completion",
            ["model", "kind"], buckets=_TOKENS, registry=r))
        self.in_flight = _Labelled(Gauge(
            "netfly_streams_in_flight", "Answers being streamed now", ["model"], registry=r))
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
