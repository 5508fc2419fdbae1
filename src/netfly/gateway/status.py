"""Live state for people: what ``GET /v1/netfly/status`` returns and the ``/status`` page shows.

Figures come from what the gateway already has: each answer's stream stats (provider, attempts and
their errors, time to first token), the routers' circuit-breaker memory, the local engine's state.
Nothing here holds a secret: errors were scrubbed by the engine before they reached a stream's
stats, and no setting (key, token, URL credentials) is read.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..health import engine_state
from ..provider import Provider
from ..stream import ChatStream, StreamStats

WINDOW = 300.0  # seconds of outcomes behind the error rate and the recent time to first token
_MAX_OUTCOMES = 1000  # per provider: bounded memory whatever the traffic
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Outcome:
    """One upstream attempt as the status page counts it."""

    at: float
    ok: bool
    time_to_first_token: float | None = None
    error: str | None = None


class StatusBook:
    """The answers the gateway is streaming now and the recent outcomes of each provider."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at = clock()
        self._in_flight: set[int] = set()
        self._requests: deque[float] = deque(maxlen=100_000)
        self._outcomes: dict[str, deque[Outcome]] = {}
        self._last_error: dict[str, Outcome] = {}
        self.total = 0

    def started(self, stream: ChatStream) -> None:
        self._in_flight.add(id(stream))
        self._requests.append(self.clock())
        self.total += 1

    def finished(self, stream: ChatStream) -> None:
        """Count the attempts of an answer that ended (or was cut), by the provider that made them."""
        if id(stream) not in self._in_flight:
            return
        self._in_flight.discard(id(stream))
        now = self.clock()
        for provider, outcome in attempt_outcomes(stream.stats, now):
            outcomes = self._outcomes.setdefault(provider, deque(maxlen=_MAX_OUTCOMES))
            outcomes.append(outcome)
            if not outcome.ok:
                self._last_error[provider] = outcome

    def requests_per_minute(self) -> int:
        since = self.clock() - 60.0
        return sum(1 for at in self._requests if at >= since)

    def provider_figures(self, name: str) -> dict[str, Any]:
        now = self.clock()
        recent = [o for o in self._outcomes.get(name, ()) if o.at >= now - WINDOW]
        failed = sum(1 for o in recent if not o.ok)
        ttfts = [o.time_to_first_token for o in recent if o.time_to_first_token is not None]
        last = self._last_error.get(name)
        return {
            "attempts": len(recent),
            "errors": failed,
            "error_rate": round(failed / len(recent), 3) if recent else None,
            "ttft_median": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_last": round(ttfts[-1], 4) if ttfts else None,
            "last_error": {"message": last.error, "seconds_ago": round(now - last.at, 1)} if last else None,
        }

    def snapshot(self, providers: Iterable[type[Provider]], version: str) -> dict[str, Any]:
        """The whole status document for the gateway's exposed ``providers``."""
        rows = [row for provider in providers for row in provider_rows(provider)]
        body: dict[str, Any] = {
            "version": version,
            "uptime": round(self.clock() - self.started_at, 1),
            "in_flight": len(self._in_flight),
            "requests_per_minute": self.requests_per_minute(),
            "requests_total": self.total,
            "window_seconds": WINDOW,
            "providers": [{**row, **self.provider_figures(row["name"])} for row in _unique(rows)],
        }
        local = next((state for p in providers if (state := engine_state(p)) is not None), None)
        if local is not None:
            body["local"] = local.as_dict()
        return body


def attempt_outcomes(stats: StreamStats, now: float) -> list[tuple[str, Outcome]]:
    """Each attempt of one answer as ``(provider, outcome)``; a routed attempt names its provider.
    Attempts cancelled by the router (a hedge that lost) or by the client count as neither."""
    outcomes = []
    for attempt in stats.attempts:
        provider = getattr(attempt, "provider", "") or stats.provider
        error = attempt.error
        if error is not None and error.startswith("cancelled"):
            continue
        ttft = stats.time_to_first_token if error is None and provider == stats.provider else None
        outcomes.append((provider, Outcome(now, error is None, ttft, _clip(error))))
    return outcomes


def provider_rows(provider: type[Provider]) -> list[dict[str, Any]]:
    """One row per provider the gateway can reach: a router's members carry its circuit states."""
    members: Iterable[type[Provider]] = getattr(provider, "providers", ())
    book = getattr(provider, "breakers", None) or getattr(provider, "health", None)
    if not members or book is None:
        return [{"name": provider.name(), "router": None, "circuit": None, "consecutive_failures": 0}]
    entries = {entry.name: entry for entry in book.snapshot()}
    rows = []
    for member in members:
        entry = entries.get(member.name())
        rows.append({
            "name": member.name(), "router": provider.name(),
            "circuit": circuit_state(entry, book.cooldown, book.clock()),
            "consecutive_failures": entry.consecutive_failures if entry is not None else 0,
        })
    return rows


def circuit_state(entry: Any, cooldown: float, now: float) -> str:
    """``closed``, ``open`` (skipped while it cools down) or ``half-open`` (one trial may go through)."""
    if entry is None or entry.opened_at is None:
        return "closed"
    cooling = entry.opened_at + cooldown > now
    return "open" if cooling and not entry.probing else "half-open"


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A provider reachable both directly and through a router is listed once, with its circuit."""
    by_name: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["name"] not in by_name or row["circuit"] is not None:
            by_name[row["name"]] = row
    return list(by_name.values())


def _clip(error: str | None) -> str | None:
    if error is None or len(error) <= _MAX_ERROR_CHARS:
        return error
    return error[:_MAX_ERROR_CHARS] + "…"
