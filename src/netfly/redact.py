"""Keeping secrets (API keys, proxy passwords) out of messages, reprs and logs."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """``http://user:secret@host:1080`` → ``http://user:***@host:1080``; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.password is None and parts.username is None:
        return url
    # The host and port as written (brackets of an IPv6 literal, an out-of-range port): parsing them
    # could fail, and only the userinfo before the last "@" needs hiding.
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    userinfo = f"{user}:{MASK}" if parts.password is not None else MASK
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each (non-trivial) secret in ``text`` with ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """A copy of ``headers`` fit for printing: credentials replaced with ``***``."""
    sensitive = {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
    return {k: (MASK if k.lower() in sensitive else v) for k, v in headers.items()}
