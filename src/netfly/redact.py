"""Keeping secrets (API keys, proxy and URL passwords, credential headers) out of messages, reprs
and logs.

The rule everywhere: scrub first, then cut. Cutting a text first could split a secret so that its
first part is no longer recognised and is shown.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Collection, Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

# Headers whose values are credentials: never printed, never sent to another origin.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"})

# A secret shorter than this is not searched for: it would mask ordinary text.
_MIN_SECRET = 4


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


@functools.lru_cache(maxsize=256)  # asked on every call, of the few URLs a process calls
def url_secrets(url: str) -> tuple[str, ...]:
    """The password of ``url`` (as written and percent-decoded) and the Basic credentials the HTTP
    client makes of it, if it has one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ()
    if not parts.password:
        return ()
    user, password = unquote(parts.username or ""), unquote(parts.password)
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return parts.password, password, basic


def header_secrets(headers: Mapping[str, str], secret_names: Collection[str] = ()) -> tuple[str, ...]:
    """The credential values among ``headers``; for ``Scheme token`` values (``Bearer sk-…``) the
    token, which is what a server echoes back."""
    names = SENSITIVE_HEADERS | {n.lower() for n in secret_names} if secret_names else SENSITIVE_HEADERS
    found: list[str] = []
    for name, value in headers.items():
        if name.lower() in names and value.strip():
            scheme, _, token = value.strip().partition(" ")
            found.append(token.strip() if token.strip() and scheme.isalpha() else value)
    return tuple(found)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each (non-trivial) secret in ``text`` with ``***``, also where
    JSON escaped its ``/`` as ``\\/``."""
    for secret in sorted((s for s in secrets if s and len(s) >= _MIN_SECRET), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
        if "/" in secret:
            escaped = secret.replace("/", "\\/")
            if escaped in text:
                text = text.replace(escaped, MASK)
    return text


def scrub_value(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` (a parsed JSON document, an error code…) with every string in it scrubbed."""
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {scrub_value(k, secrets): scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v, secrets) for v in value)
    return value


def clip(text: str, limit: int, secrets: Iterable[str | None] = ()) -> str:
    """``text`` scrubbed, then cut to ``limit`` characters (in that order: see the module's doc)."""
    return scrub(text, secrets)[:limit]


def drop_secret_prefix(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` (cut by a reader, then scrubbed) without a trailing first part of a secret (or a
    whole one)."""
    cut = 0
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET:
            sizes = range(min(len(secret), len(text)), cut, -1)
            cut = next((size for size in sizes if text.endswith(secret[:size])), cut)
    return text[: len(text) - cut]


def redact_headers(headers: Mapping[str, str], secret_names: Collection[str] = ()) -> dict[str, str]:
    """A copy of ``headers`` fit for printing: credentials replaced with ``***``."""
    names = SENSITIVE_HEADERS | {n.lower() for n in secret_names} if secret_names else SENSITIVE_HEADERS
    return {k: (MASK if k.lower() in names else v) for k, v in headers.items()}
