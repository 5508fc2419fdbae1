"""Edges of the pure helpers (redact, messages, retry, error bodies) that mutation testing found untested.

Equivalent mutants left alive on purpose (no test can tell them apart from the original):
- sse.py ``_check_lengths``: ``len(buf) > self.max_line_bytes`` → ``>=`` as the gate before the exact
  per-line check (the gate only decides whether the exact check runs).
- sse.py ``_FOLD_LINES = 64`` → any other positive number: folding changes memory, never the events.
- sse.py ``_fold``: ``data[1:]`` → ``data[1:len(data)]`` and similar slice spellings.
- redact.py ``scrub``: ``secret in text`` guard removed (``str.replace`` of an absent secret is a no-op).
- retry.py ``max(0.0, retry_after)`` on a value already clamped by ``parse_retry_after``.
"""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from netfly import ConfigurationError, ProxyError, RetryPolicy, ServerError
from netfly.errors import error_message_from_body
from netfly.messages import validate_messages
from netfly.redact import MASK, redact_headers, redact_url, scrub
from netfly.retry import is_retryable, parse_retry_after

# -- error_message_from_body --------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ({"error": {"message": "bad key"}}, "bad key"),
    ({"error": {"detail": "no such model"}}, "no such model"),
    ({"error": {"msg": "quota"}}, "quota"),
    ({"error": {"message": "first", "detail": "second", "msg": "third"}}, "first"),
    ({"error": {"detail": "second", "msg": "third"}}, "second"),
    ({"error": {"message": "", "msg": "third"}}, "third"),
    ({"error": {"message": 404}}, "404"),
    ({"message": "top-level message"}, "top-level message"),
    ({"detail": "top-level detail"}, "top-level detail"),
    ({"detail": [{"loc": ["body"], "msg": "field required"}]}, "[{'loc': ['body'], 'msg': 'field required'}]"),
    ({"error": "plain text error"}, "plain text error"),
    ({"error": "", "detail": "used when error is empty"}, "used when error is empty"),
    ({"error": {}, "detail": "used when error has no message"}, "used when error has no message"),
    ({"error": ["a", "list"]}, "['a', 'list']"),
    ("  text body  ", "text body"),
])
def test_error_message_shapes(body: Any, message: str) -> None:
    assert error_message_from_body(body, "FALLBACK") == message


@pytest.mark.parametrize("body", [None, "", "   ", [], ["message"], 42, {}, {"error": None}, {"error": {"message": ""}},
                                  {"error": 0}, {"detail": ""}])
def test_error_message_falls_back(body: Any) -> None:
    assert error_message_from_body(body, "FALLBACK") == "FALLBACK"


def test_text_error_bodies_are_cut_at_500_characters() -> None:
    assert error_message_from_body("x" * 500, "") == "x" * 500
    assert error_message_from_body("y" * 501, "") == "y" * 500
    assert error_message_from_body(" " + "z" * 600 + " ", "") == "z" * 500  # stripped first


# -- redact ---------------------------------------------------------------------------------------------


def test_scrub_masks_every_occurrence_of_each_secret() -> None:
    assert scrub("k=abcd and abcd again; wxyz", ["abcd", "wxyz"]) == f"k={MASK} and {MASK} again; {MASK}"


@pytest.mark.parametrize("secret", [None, "", "a", "abc"])
def test_scrub_ignores_missing_and_trivial_secrets(secret: str | None) -> None:
    text = "abc a b c None"
    assert scrub(text, [secret]) == text


def test_scrub_masks_a_secret_of_exactly_four_characters() -> None:
    assert scrub("token abcd!", ["abcd"]) == f"token {MASK}!"


def test_scrub_with_no_secrets_returns_the_text() -> None:
    assert scrub("unchanged", []) == "unchanged"


@pytest.mark.parametrize("name", ["Authorization", "authorization", "Proxy-Authorization", "API-Key", "api-key",
                                  "X-Api-Key", "Cookie", "COOKIE"])
def test_redact_headers_masks_every_credential_header(name: str) -> None:
    headers = {name: "secret-value", "Content-Type": "application/json", "X-Request-Id": "r1"}
    shown = redact_headers(headers)
    assert shown == {name: MASK, "Content-Type": "application/json", "X-Request-Id": "r1"}
    assert headers[name] == "secret-value"  # a copy: the headers to send are untouched


@pytest.mark.parametrize(("url", "shown"), [
    ("http://:pw-secret@host:8080/p", f"http://:{MASK}@host:8080/p"),
    ("http://user@host", f"http://{MASK}@host"),
    ("http://user:pw-secret@host:99999", f"http://user:{MASK}@host:99999"),  # out-of-range port: no ValueError
    ("http://user:pw-secret@[::1]/x?q=1#f", f"http://user:{MASK}@[::1]/x?q=1#f"),
    ("http://us%40er:p%40ss@host", f"http://us%40er:{MASK}@host"),
    ("http://a@b:c@host", f"http://a@b:{MASK}@host"),
    ("http://[::1", MASK),  # not a URL at all: nothing of it is shown
    ("", ""),
    ("no-scheme-at-all", "no-scheme-at-all"),
])
def test_redact_url_edges(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "pw-secret" not in redact_url(url)


# -- validate_messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "error"), [
    ("hello", r"^messages must be a list of \{'role', 'content'\} mappings, got str$"),
    (b"hello", r"^messages must be a list of .* got bytes$"),
    ({"role": "user"}, r"^messages must be a list of .* got dict$"),
    (None, r"^messages must be a list of .* got NoneType$"),
    ([], r"^messages must not be empty$"),
    (["hi"], r"^messages\[0\] must be a mapping with 'role' and 'content', got str$"),
    ([{"role": "user", "content": "a"}, 3], r"^messages\[1\] must be a mapping .* got int$"),
    ([{"content": "a"}], r"^messages\[0\]\['role'\] must be a non-empty string, got None$"),
    ([{"role": "", "content": "a"}], r"^messages\[0\]\['role'\] must be a non-empty string, got ''$"),
    ([{"role": 1, "content": "a"}], r"^messages\[0\]\['role'\] must be a non-empty string, got 1$"),
    ([{"role": "user"}], r"^messages\[0\] has no 'content'$"),
    ([{"role": "user", "content": None}], r"^messages\[0\]\['content'\] is None \(allowed only with 'tool_calls'\)$"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], r"is None \(allowed only with 'tool_calls'\)$"),
    ([{"role": "user", "content": ["text"]}],
     r"^messages\[0\]\['content'\]\[0\] must be a content part mapping with a 'type'$"),
    ([{"role": "user", "content": [{"type": "text"}, {"text": "no type"}]}], r"\['content'\]\[1\] must be a content"),
    ([{"role": "user", "content": [{"type": 5}]}], r"\['content'\]\[0\] must be a content part mapping"),
    ([{"role": "user", "content": 5}],
     r"^messages\[0\]\['content'\] must be a string or a list of content parts, got int$"),
    ([{"role": "user", "content": {"type": "text"}}], r"must be a string or a list of content parts, got dict$"),
])
def test_invalid_messages_name_what_is_wrong(messages: Any, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error):
        validate_messages(messages)


def test_valid_messages_come_back_as_plain_dict_copies() -> None:
    original = ({"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "user", "content": [{"type": "text", "text": "x"}]},
                {"role": "user", "content": []})
    checked = validate_messages(original)
    assert checked == list(original)
    assert all(type(m) is dict for m in checked)
    checked[0]["content"] = "changed"
    assert original[0]["content"] == "hi"


# -- retry ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"max_attempts": 0}, "^max_attempts must be a whole number of attempts >= 1, got 0$"),
    ({"initial_delay": -0.1}, "^initial_delay must be a number of seconds >= 0, got -0.1$"),
    ({"max_delay": -0.1}, "^max_delay must be a number of seconds >= 0, got -0.1$"),
    ({"jitter": 1.01}, "^jitter must be a number between 0 and 1, got 1.01$"),
    ({"jitter": -0.01}, "^jitter must be a number between 0 and 1, got -0.01$"),
])
def test_invalid_policies_say_why(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RetryPolicy(**options)


def test_boundary_policies_are_accepted() -> None:
    for options in ({"max_attempts": 1}, {"initial_delay": 0}, {"max_delay": 0}, {"jitter": 0}, {"jitter": 1}):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_max_delay_zero_retries_at_once() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=5, max_delay=0, random=lambda: 1.0)
    assert policy.delay_for(1, ServerError(503, "busy")) == 0.0


def test_the_last_attempt_is_not_retried_and_the_one_before_is() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=1, jitter=0)
    error = ServerError(503, "busy")
    assert policy.delay_for(2, error) == 2.0
    assert policy.delay_for(3, error) is None
    assert policy.delay_for(4, error) is None


def test_retry_after_equal_to_the_cap_is_waited_for() -> None:
    policy = RetryPolicy(max_retry_after=10)
    assert policy.delay_for(1, ServerError(503, "busy", retry_after=10.0)) == 10.0
    assert policy.delay_for(1, ServerError(503, "busy", retry_after=10.01)) is None
    assert policy.delay_for(1, ServerError(503, "busy", retry_after=-4.0)) == 0.0


def test_full_jitter_spans_zero_to_twice_the_delay() -> None:
    error = ServerError(503, "busy")
    assert RetryPolicy(initial_delay=2, jitter=1, random=lambda: 0.0).delay_for(1, error) == 0.0
    assert RetryPolicy(initial_delay=2, jitter=1, random=lambda: 1.0).delay_for(1, error) == 4.0
    assert RetryPolicy(initial_delay=2, jitter=0.5, random=lambda: 0.5).delay_for(1, error) == 2.0


def test_a_proxy_error_is_retried_unless_it_says_not_to() -> None:
    assert is_retryable(ProxyError("proxy down"))
    assert not is_retryable(ProxyError("proxy refused the credentials", retryable=False))
    assert not is_retryable(ValueError("not a netfly error"))


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "0"}, 0.0),
    ({"retry-after-ms": "-20"}, 0.0),
    ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),
    ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),
    ({"retry-after-ms": "", "retry-after": "5"}, 5.0),
    ({"retry-after": "0.25"}, 0.25),
])
def test_retry_after_header_forms(headers: dict[str, str], seconds: float) -> None:
    assert parse_retry_after(headers) == seconds


def test_retry_after_date_in_the_past_is_zero_and_in_the_future_is_the_difference() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": email.utils.formatdate(now + 90, usegmt=True)}, now=now) == 90.0
