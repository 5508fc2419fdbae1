"""Measured state: a live check of a provider, and plain-text reports of checks and stream stats.

A provider's ``working`` attribute is what its author declares; :func:`check_provider` (also
``await P.check()``) measures it by sending the smallest request there is: one message,
``max_tokens=1``, a single attempt and a short time limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import NetflyError
from .stream import StreamStats
from .transport import Timeout

if TYPE_CHECKING:
    from .provider import Provider
    from .providers.llama_server import EngineState

CHECK_MESSAGES = ({"role": "user", "content": "Say OK."},)
DEFAULT_CHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one live check.

    ``ok`` is true when the provider streamed an answer to its end without error. ``latency`` is the
    whole call in seconds, ``time_to_first_token`` the wait for the first text (``None`` when the
    one-token answer carried no text). ``served_by`` names the provider that answered (for a router,
    the one it picked). ``declared`` is the provider's ``working`` attribute, for comparison.
    ``engine`` is, for a provider that runs its own engine (``Local``), that engine's state after
    the check ("ready (pid 1234)", "crashed: the local model server was killed by SIGSEGV").
    """

    provider: str
    ok: bool
    latency: float
    error: str | None = None
    time_to_first_token: float | None = None
    served_by: str | None = None
    model: str | None = None
    declared: bool = False
    engine: str | None = None


async def check_provider(
    provider: type[Provider],
    model: str | None = None,
    *,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
    proxy: str | None = None,
    **kwargs: Any,
) -> HealthResult:
    """Send a one-token request to ``provider`` and report whether, and how fast, it answered.

    Failures are the result, not raised: any :class:`NetflyError` (configuration included, e.g. a
    missing API key) becomes ``ok=False`` with the error's type and message.
    """
    kwargs.setdefault("max_tokens", 1)
    kwargs.setdefault("max_retries", 1)  # measure the provider, not its retry policy
    kwargs.setdefault("timeout", Timeout(connect=timeout, idle=timeout, total=timeout))
    started = time.monotonic()
    stats: StreamStats | None = None
    try:
        async with provider.stream(model, list(CHECK_MESSAGES), proxy, **kwargs) as stream:
            stats = stream.stats
            async for _ in stream:
                pass
    except NetflyError as exc:
        return HealthResult(
            provider=provider.name(),
            ok=False,
            latency=time.monotonic() - started,
            error=f"{type(exc).__name__}: {exc}",
            time_to_first_token=stats.time_to_first_token if stats else None,
            served_by=None,
            model=stats.model if stats else None,
            declared=provider.working,
            engine=_engine_text(provider),
        )
    return HealthResult(
        provider=provider.name(),
        ok=True,
        latency=time.monotonic() - started,
        time_to_first_token=stats.time_to_first_token,
        served_by=stats.provider,
        model=stats.model,
        declared=provider.working,
        engine=_engine_text(provider),
    )


def engine_state(provider: type[Provider]) -> EngineState | None:
    """The state of the engine ``provider`` runs itself (``Local``'s child); ``None`` for others."""
    state = getattr(provider, "engine_state", None)
    return state() if callable(state) else None


def _engine_text(provider: type[Provider]) -> str | None:
    state = engine_state(provider)
    return str(state) if state is not None else None


async def check_all(providers: Iterable[type[Provider]], **options: Any) -> list[HealthResult]:
    """Check several providers at once; results in the order given."""
    return list(await asyncio.gather(*(check_provider(p, **options) for p in providers)))


def format_health_table(results: Sequence[HealthResult]) -> str:
    """A plain-text table of check results, one provider a line."""
    header = ("PROVIDER", "DECLARED", "MEASURED", "LATENCY", "SERVED BY", "DETAIL")
    rows = [header]
    for result in results:
        rows.append((
            result.provider,
            "working" if result.declared else "-",
            "ok" if result.ok else "FAILED",
            f"{result.latency * 1000:.0f} ms",
            result.served_by or "-",
            _detail(result),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _detail(result: HealthResult) -> str:
    detail = result.error or (f"model {result.model}" if result.model else "")
    if result.engine:
        detail += f" (engine {result.engine})" if detail else f"engine {result.engine}"
    return " ".join(detail.split())


def summarize_stats(stats: StreamStats) -> str:
    """One line of a stream's figures, for log lines (the gateway's access log)."""
    ttft = f"{stats.time_to_first_token * 1000:.0f}ms" if stats.time_to_first_token is not None else "-"
    failed = sum(1 for record in stats.attempts if record.error is not None)
    return (
        f"provider={stats.provider} attempts={len(stats.attempts)} failed={failed} ttft={ttft} "
        f"chunks={stats.chunks} chars={stats.characters}"
    )


def format_stats(stats: StreamStats) -> str:
    """A short human-readable report of one stream's figures (for ``netfly chat --stats`` and logs)."""
    ttft = f"{stats.time_to_first_token:.3f} s" if stats.time_to_first_token is not None else "-"
    duration = f"{stats.duration:.3f} s" if stats.duration is not None else "-"
    lines = [
        f"provider: {stats.provider}" + (f"  model: {stats.model}" if stats.model else ""),
        f"time to first token: {ttft}  duration: {duration}  chunks: {stats.chunks}  characters: {stats.characters}",
    ]
    for record in stats.attempts:
        who = getattr(record, "provider", None) or stats.provider
        outcome = "ok" if record.error is None else record.error
        lines.append(f"attempt {record.number}: {who}: {outcome} ({record.duration:.3f} s)")
    skipped = getattr(stats, "skipped", None)
    if skipped:
        for name, reason in skipped.items():
            lines.append(f"skipped: {name}: {reason}")
    return "\n".join(lines)
