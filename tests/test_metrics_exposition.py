"""The gateway keeps its metrics as plain numbers: /metrics must read exactly as prometheus-client's
own metric objects would write the same observations."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from netfly.gateway.metrics import _SECONDS, _TOKENS, GatewayMetrics
from netfly.stream import AttemptRecord, StreamStats

# (model, time to first token, prompt tokens, completion tokens, duration, status); values on bucket
# bounds, past the last bound and zero included.
OBSERVATIONS = [("gpt", 0.002, 20, 60, 0.003, "200"), ("gpt", None, 5, 0, 0.5, "502"),
                ("o3", 0.7, 70000, 300000, 400.0, "200"), ("gpt", 0.01, 16, 64, 0.01, "200"),
                ("o3", 0.025, 0, 1, 2.5, "429")]
ROUTE = "/v1/chat/completions"


def _reference() -> bytes:
    r = CollectorRegistry(auto_describe=True)
    requests = Counter("netfly_requests", "Requests answered, by route, public model, key name and status",
                       ["route", "model", "key", "status"], registry=r)
    attempts = Counter("netfly_upstream_attempts", "Upstream attempts, by provider and outcome",
                       ["provider", "outcome"], registry=r)
    limited = Counter("netfly_rate_limited", "Requests refused by a key's limit", ["key", "limit"], registry=r)
    ttft = Histogram("netfly_time_to_first_token_seconds", "Time from the request to the answer's first text",
                     ["model"], buckets=_SECONDS, registry=r)
    duration = Histogram("netfly_request_duration_seconds", "Time to answer a request in full",
                         ["route", "model"], buckets=_SECONDS, registry=r)
    tokens = Histogram("netfly_tokens_per_request", "Tokens of one request, prompt or completion",
                       ["model", "kind"], buckets=_TOKENS, registry=r)
    in_flight = Gauge("netfly_streams_in_flight", "Answers being streamed now", ["model"], registry=r)
    for i, (model, first, prompt, completion, seconds, status) in enumerate(OBSERVATIONS):
        in_flight.labels(model).inc()
        if i != 2:
            in_flight.labels(model).dec()
        attempts.labels("P", "TransportError").inc()
        attempts.labels("P", "success").inc()
        if first is not None:
            ttft.labels(model).observe(first)
        tokens.labels(model, "prompt").observe(prompt)
        tokens.labels(model, "completion").observe(completion)
        requests.labels(ROUTE, model, "k" if i % 2 else "", status).inc()
        duration.labels(ROUTE, model).observe(seconds)
    limited.labels("k", "rpm").inc()
    return generate_latest(r)


def _gateway() -> bytes:
    metrics = GatewayMetrics(lambda: {})
    for i, (model, first, prompt, completion, seconds, status) in enumerate(OBSERVATIONS):
        metrics.in_flight.labels(model).inc()
        if i != 2:
            metrics.in_flight.labels(model).dec()
        stats = StreamStats(provider="P", attempts=[AttemptRecord(1, error="TransportError: refused"),
                                                    AttemptRecord(2)], time_to_first_token=first)
        metrics.observe_stream(model, stats)
        metrics.tokens.labels(model, "prompt").observe(prompt)
        metrics.tokens.labels(model, "completion").observe(completion)
        metrics.requests.labels(ROUTE, model, "k" if i % 2 else "", status).inc()
        metrics.duration.labels(ROUTE, model).observe(seconds)
    metrics.rate_limited.labels("k", "rpm").inc()
    return metrics.render()


def _without_times(text: bytes) -> str:
    # The _created series are the times each series was first used: equal in shape, not in value.
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text.decode())


def test_the_exposition_is_prometheus_clients_own() -> None:
    ours = _without_times(_gateway())
    assert "netfly_tokens_per_request_bucket{kind=\"completion\",le=\"+Inf\",model=\"o3\"} 2.0" in ours
    expected = "\n".join(line for line in _without_times(_reference()).splitlines()
                         if "netfly_state" not in line and "circuit_breaker" not in line)
    assert "\n".join(line for line in ours.splitlines()
                     if "netfly_state" not in line and "circuit_breaker" not in line) == expected
