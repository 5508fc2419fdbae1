"""Measured state: a live check of a provider (a router's memory of its providers is
:class:`netfly.routing.CircuitBreakers`; the text reports of both live in :mod:`netfly.cli.format`).

A provider's ``working`` attribute is what its author declares; :func:`check_provider` (also
``await P.check()``) measures it by sending the smallest request there is: one message,
``max_tokens=1``, a single attempt and a short time limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
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
    whole call in seconds, ``time_to_first_token`` the wait for the first output (``None`` when the
    one-token answer carried none). ``served_by`` names the provider that answered (for a router,
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
    if "max_attempts" not in kwargs:
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
