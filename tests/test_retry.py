"""RetryPolicy and parse_retry_after: the pure "try again after N seconds?" decision."""

from __future__ import annotations

import email.utils
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from netfly import (
    AuthenticationError,
    ConfigurationError,
    NetflyTimeoutError,
    ProxyError,
    RetryPolicy,
    StreamDecodeError,
    StreamInterruptedError,
    TransportError,
    UpstreamError,
)
from netfly.errors import error_for_status
from netfly.retry import RETRYABLE_STATUSES, is_retryable, parse_retry_after

REFUSED = TransportError("cannot connect to X: ConnectionRefusedError")


def fixed(value: float, attempts: int = 5) -> RetryPolicy:
    """A policy whose jitter draw is always ``value``."""
    return RetryPolicy(max_attempts=attempts, random=lambda: value)


def test_seed_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_delay, policy.multiplier) == (5, 2.0, 2.0)
    assert (policy.max_delay, policy.jitter, policy.max_retry_after) == (30.0, 0.1, 60.0)


def test_delay_doubles_from_the_initial_delay() -> None:
    policy = RetryPolicy(max_attempts=10, jitter=0)
    assert [policy.delay_for(n, REFUSED) for n in range(1, 5)] == [2.0, 4.0, 8.0, 16.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(max_attempts=20, jitter=0, max_delay=30.0)
    assert policy.delay_for(5, REFUSED) == 30.0  # 2 * 2**4 = 32 → 30
    assert policy.delay_for(19, REFUSED) == 30.0


def test_custom_multiplier_and_initial_delay() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=0.5, multiplier=3, jitter=0)
    assert [policy.delay_for(n, REFUSED) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0)
    assert policy.delay_for(1, REFUSED) == 2.0
    assert policy.delay_for(2, REFUSED) == 4.0
    assert policy.delay_for(3, REFUSED) is None  # the third attempt was the last
    assert RetryPolicy(max_attempts=1).delay_for(1, REFUSED) is None


def test_jitter_uses_the_injected_random_at_both_ends() -> None:
    assert fixed(0.0).delay_for(1, REFUSED) == pytest.approx(2.0 * 0.9)
    assert fixed(0.5).delay_for(1, REFUSED) == pytest.approx(2.0)
    assert fixed(1.0).delay_for(1, REFUSED) == pytest.approx(2.0 * 1.1)
    assert fixed(0.0, attempts=9).delay_for(5, REFUSED) == pytest.approx(30.0 * 0.9)  # jitter applies to the cap too


@given(
    attempt=st.integers(1, 30),
    draw=st.floats(0, 1, exclude_max=True),
    jitter=st.floats(0, 1),
    initial=st.floats(0, 10),
)
def test_jittered_delay_stays_within_bounds(attempt: int, draw: float, jitter: float, initial: float) -> None:
    policy = RetryPolicy(max_attempts=31, initial_delay=initial, jitter=jitter, random=lambda: draw)
    base = min(initial * 2 ** (attempt - 1), policy.max_delay)
    delay = policy.delay_for(attempt, REFUSED)
    assert delay is not None
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_real_random_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=3)
    delays = {policy.delay_for(1, REFUSED) for _ in range(200)}
    assert all(d is not None and 1.8 <= d <= 2.2 for d in delays)
    assert len(delays) > 1  # it does jitter


@pytest.mark.parametrize("status", sorted(RETRYABLE_STATUSES))
def test_retryable_statuses(status: int) -> None:
    assert RETRYABLE_STATUSES == {408, 409, 429, 500, 502, 503, 504}
    assert fixed(0.5).delay_for(1, error_for_status(status, "x")) == pytest.approx(2.0)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 422, 451, 501, 505])
def test_other_statuses_fail_at_once(status: int) -> None:
    assert fixed(0.5).delay_for(1, error_for_status(status, "x")) is None


def test_retry_after_on_a_non_retryable_status_is_ignored() -> None:
    error = AuthenticationError(401, "bad key", retry_after=1.0)
    assert fixed(0.5).delay_for(1, error) is None


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (REFUSED, True),
        (NetflyTimeoutError("idle", "idle"), True),
        (NetflyTimeoutError("connect", "connect"), True),
        (ProxyError("proxy down"), True),
        (ProxyError("bad proxy credentials", retryable=False), False),
        (UpstreamError("in-stream error"), False),
        (StreamDecodeError("line too long"), False),
        (StreamInterruptedError("cut", "partial"), False),
        (ConfigurationError("bad"), False),
        (ValueError("not ours"), False),
    ],
)
def test_which_errors_are_retried(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable
    assert (fixed(0.5).delay_for(1, error) is not None) is retryable


def test_retry_after_replaces_the_backoff() -> None:
    error = error_for_status(429, "slow down", retry_after=3.0)
    assert fixed(0.0).delay_for(1, error) == 3.0  # no jitter, no doubling
    assert fixed(0.0).delay_for(4, error) == 3.0
    assert fixed(0.0).delay_for(1, error_for_status(503, "busy", retry_after=45.0)) == 45.0  # over max_delay: honoured
    assert fixed(0.0).delay_for(1, error_for_status(503, "busy", retry_after=0.0)) == 0.0


def test_retry_after_longer_than_the_cap_gives_up() -> None:
    policy = RetryPolicy(max_retry_after=60.0)
    assert policy.delay_for(1, error_for_status(429, "x", retry_after=60.0)) == 60.0
    assert policy.delay_for(1, error_for_status(429, "x", retry_after=60.5)) is None
    assert RetryPolicy(max_retry_after=1.0).delay_for(1, error_for_status(429, "x", retry_after=2.0)) is None


def test_retry_after_does_not_extend_the_attempt_budget() -> None:
    assert RetryPolicy(max_attempts=2).delay_for(2, error_for_status(429, "x", retry_after=1.0)) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"max_attempts": True}, {"initial_delay": -1}, {"max_delay": -1}, {"jitter": -0.1},
     {"jitter": 1.5}, {"multiplier": 0.5}, {"max_retry_after": float("nan")}],
)
def test_invalid_policies_are_refused_with_the_setting_named(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ConfigurationError, match=name) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == name


# -- parse_retry_after ---------------------------------------------------------------------------


def headers(**values: str) -> CIMultiDict[str]:
    """Case-insensitive headers, as aiohttp hands them over."""
    return CIMultiDict({k.replace("_", "-").title(): v for k, v in values.items()})


@pytest.mark.parametrize(("value", "seconds"), [("5", 5.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), ("-3", 0.0)])
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(headers(retry_after=value)) == seconds


def test_retry_after_header_name_is_case_insensitive() -> None:
    assert parse_retry_after(CIMultiDict({"RETRY-AFTER": "4"})) == 4.0
    assert parse_retry_after({"retry-after": "4"}) == 4.0


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    in_30s = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(headers(retry_after=in_30s), now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 300, usegmt=True)
    assert parse_retry_after(headers(retry_after=past), now=now) == 0.0


def test_retry_after_http_date_against_the_clock() -> None:
    in_10s = email.utils.formatdate(time.time() + 10, usegmt=True)
    seconds = parse_retry_after(headers(retry_after=in_10s))
    assert seconds is not None and 8.0 <= seconds <= 10.0


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after(headers(retry_after_ms="1500")) == 1.5
    assert parse_retry_after(headers(retry_after_ms="250", retry_after="9")) == 0.25
    assert parse_retry_after(headers(retry_after_ms="garbage", retry_after="9")) == 9.0


@pytest.mark.parametrize("value", ["soon", "", "1 minute", "nan", "inf", "-inf", "Mon, 99 Foo 2024", "0x10"])
def test_garbage_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(headers(retry_after=value)) is None
    assert parse_retry_after(headers(retry_after_ms=value)) is None


def test_no_retry_after() -> None:
    assert parse_retry_after(CIMultiDict()) is None
    assert parse_retry_after(headers(content_type="application/json")) is None
