"""The retry policy: a pure decision, "try again after N seconds?" for one failed attempt.

The engine wraps whole attempts in it and never asks once text has been delivered, so a retry can
never duplicate output.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import _checks
from .errors import ConfigurationError, NetflyTimeoutError, ProxyError, ResponseStatusError, TransportError

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter and a cap.

    ``max_attempts`` counts every attempt, the first included (the seed called it ``max_retries``;
    openai-python and httpx count retries, the first attempt excluded). Bad settings raise
    :class:`ConfigurationError`.
    The n-th retry waits ``initial_delay * multiplier**(n-1)``, capped at ``max_delay``, scaled by a
    random factor in ``[1 - jitter, 1 + jitter]``. A server's ``Retry-After`` replaces that delay; one
    longer than ``max_retry_after`` is not waited for: the error is raised with its ``retry_after``.
    """

    max_attempts: int = 5
    initial_delay: float = 2.0
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.1
    max_retry_after: float = 60.0
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.whole("max_attempts", self.max_attempts, unit="attempts")
        for name in ("initial_delay", "max_delay", "max_retry_after"):
            _checks.seconds(name, getattr(self, name))
        multiplier = self.multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 1:
            raise ConfigurationError(f"multiplier must be a number >= 1, got {multiplier!r}", param="multiplier")
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
            raise ConfigurationError(f"jitter must be a number between 0 and 1, got {jitter!r}", param="jitter")

    def delay_for(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up.

        ``attempt`` is the number of the attempt that just failed (1 for the first).
        """
        if attempt >= self.max_attempts or not is_retryable(error):
            return None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return None if retry_after > self.max_retry_after else max(0.0, retry_after)
        base = min(self.initial_delay * self.multiplier ** (attempt - 1), self.max_delay)
        return base * (1 - self.jitter + 2 * self.jitter * self.random())


def is_retryable(error: BaseException) -> bool:
    """Connection failures, timeouts and the statuses 408, 409, 429, 500, 502, 503, 504."""
    if isinstance(error, ResponseStatusError):
        return error.status in RETRYABLE_STATUSES
    if isinstance(error, ProxyError):
        return error.retryable
    return isinstance(error, (TransportError, NetflyTimeoutError))


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (delta-seconds or HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, _finite(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, _finite(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _finite(text: str) -> float:
    # float() also accepts "nan" and "inf": garbage for a delay, so treated like any other garbage.
    seconds = float(text)
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite number of seconds: {text!r}")
    return seconds
