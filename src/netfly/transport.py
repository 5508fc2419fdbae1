"""Transport: pooled aiohttp sessions, proxies and timeouts; turns client failures into netfly errors.

One :class:`aiohttp.ClientSession` is kept per event loop (and per SOCKS proxy, which needs its own
connector) and reused by every call. Sessions are closed by :func:`aclose`, or automatically when
``asyncio.run`` shuts its loop down: a small async generator registered with the loop is finalized
by ``loop.shutdown_asyncgens()`` and closes the loop's sessions on the way out.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from . import _json
from .chunks import error_message_from_body
from .errors import (
    ConfigurationError,
    NetflyTimeoutError,
    ProxyError,
    StreamDecodeError,
    TransportError,
    error_for_status,
)
from .redact import redact_url, scrub
from .retry import parse_retry_after

try:
    import aiohttp_socks
except ImportError:  # pragma: no cover - aiohttp-socks is a declared dependency
    aiohttp_socks = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Timeout:
    """Time limits in seconds; ``None`` disables one.

    ``connect``: resolving the host and opening the TCP (and proxy, TLS) connection. ``idle``: the
    longest silence allowed between two reads, the wait for the response head included. ``total``:
    the whole call, retries and their waits included.
    """

    connect: float | None = 10.0
    idle: float | None = 60.0
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "idle", "total"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ConfigurationError(f"timeout {name} must be a positive number or None, got {value!r}")

    @classmethod
    def coerce(cls, value: Timeout | float | int | None) -> Timeout:
        """A number means the total limit; ``None`` means the defaults."""
        if value is None:
            return cls()
        if isinstance(value, Timeout):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(total=float(value))
        raise ConfigurationError(f"timeout must be a number of seconds or a netfly.Timeout, got {value!r}")


_PROXY_SCHEMES = {"http", "https", "socks4", "socks4a", "socks5", "socks5h"}


@dataclass(frozen=True)
class Proxy:
    """A parsed proxy URL; its ``str`` and ``repr`` never show the password."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> Proxy:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"invalid proxy URL {redact_url(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _PROXY_SCHEMES:
            raise ConfigurationError(
                f"unsupported proxy scheme {scheme!r} in {redact_url(url)!r}; "
                f"use one of: {', '.join(sorted(_PROXY_SCHEMES))}"
            )
        if not parts.hostname:
            raise ConfigurationError(f"proxy URL {redact_url(url)!r} has no host")
        if port is None:
            port = {"http": 80, "https": 443}.get(scheme, 1080)
        return cls(
            scheme,
            parts.hostname,
            port,
            unquote(parts.username) if parts.username is not None else None,
            unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def is_socks(self) -> bool:
        return self.scheme.startswith("socks")

    @property
    def url_without_credentials(self) -> str:
        return urlunsplit((self.scheme, self._netloc, "", "", ""))

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username is not None else ""
        return f"{self.scheme}://{user}{self._netloc}"

    def __repr__(self) -> str:
        return f"Proxy({str(self)!r})"


def _new_connector(proxy: Proxy | None) -> aiohttp.BaseConnector:
    # No small pool cap: many concurrent streams to one server is the normal case for a gateway.
    options: dict[str, object] = {"limit": 1000, "limit_per_host": 0, "ttl_dns_cache": 300}
    if proxy is None or not proxy.is_socks:
        return aiohttp.TCPConnector(**options)  # type: ignore[arg-type]
    if aiohttp_socks is None:  # pragma: no cover
        raise ConfigurationError("SOCKS proxies need the aiohttp-socks package: pip install aiohttp-socks")
    kind = aiohttp_socks.ProxyType.SOCKS4 if proxy.scheme.startswith("socks4") else aiohttp_socks.ProxyType.SOCKS5
    return aiohttp_socks.ProxyConnector(
        host=proxy.host,
        port=proxy.port,
        proxy_type=kind,
        username=proxy.username,
        password=proxy.password,
        rdns=proxy.scheme in ("socks5h", "socks4a"),
        **options,  # type: ignore[arg-type]
    )


class SessionPool:
    """Reusable client sessions, one per (event loop, SOCKS proxy)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSessions] = (
            weakref.WeakKeyDictionary()
        )

    async def session(self, proxy: Proxy | None = None) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        sessions = self._by_loop.get(loop)
        if sessions is None:
            sessions = _LoopSessions()
            self._by_loop[loop] = sessions
            await sessions.watch_loop_shutdown()
        key = str(proxy) + (proxy.password or "") if proxy is not None and proxy.is_socks else ""
        session = sessions.by_key.get(key)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=_new_connector(proxy if key else None),
                auto_decompress=True,
                # netfly applies its own per-call timeouts to each request.
                timeout=aiohttp.ClientTimeout(total=None),
            )
            sessions.by_key[key] = session
        return session

    async def aclose(self) -> None:
        """Close the sessions of the running loop."""
        sessions = self._by_loop.pop(asyncio.get_running_loop(), None)
        if sessions is not None:
            await sessions.aclose()


class _LoopSessions:
    def __init__(self) -> None:
        self.by_key: dict[str, aiohttp.ClientSession] = {}
        self._watcher: AsyncIterator[None] | None = None

    async def watch_loop_shutdown(self) -> None:
        # asyncio.run() calls loop.shutdown_asyncgens(), which closes this generator and so the
        # sessions, before the loop closes: no "Unclosed client session" for callers who never
        # call netfly.aclose().
        self._watcher = self._close_on_shutdown()
        await self._watcher.__anext__()

    async def _close_on_shutdown(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self._close_sessions()

    async def aclose(self) -> None:
        await self._close_sessions()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher.aclose()  # type: ignore[attr-defined]

    async def _close_sessions(self) -> None:
        sessions, self.by_key = list(self.by_key.values()), {}
        for session in sessions:
            await session.close()


default_pool = SessionPool()


async def aclose() -> None:
    """Close netfly's pooled connections on the running event loop."""
    await default_pool.aclose()


def client_timeout(timeout: Timeout, remaining_total: float | None) -> aiohttp.ClientTimeout:
    # ``connect`` also bounds DNS resolution, which ``sock_connect`` alone leaves unbounded (a dead
    # resolver would hang the call). It includes waiting for a free pooled connection too, but the
    # pool allows 1000, so that wait only happens under a load where failing fast is right.
    return aiohttp.ClientTimeout(
        total=remaining_total, connect=timeout.connect, sock_connect=timeout.connect, sock_read=timeout.idle
    )


def translate_client_error(
    exc: BaseException, *, target: str, proxy: Proxy | None, timeout: Timeout
) -> TransportError:
    """A netfly error for an aiohttp / aiohttp-socks / OS failure, with no secrets in it."""
    via = f" via proxy {proxy}" if proxy is not None else ""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return NetflyTimeoutError(f"connect to {target}{via} timed out after {timeout.connect} s", "connect")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return NetflyTimeoutError(f"no data from {target} for {timeout.idle} s (idle timeout)", "idle")
    # aiohttp-socks' own ProxyTimeoutError / ProxyConnectionError are plain Exceptions (neither a
    # TimeoutError nor an OSError), so they are matched by type here.
    if aiohttp_socks is not None and isinstance(exc, aiohttp_socks.ProxyTimeoutError):
        return NetflyTimeoutError(f"proxy {proxy} timed out", "connect")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return NetflyTimeoutError(f"request to {target} exceeded the total timeout of {timeout.total} s", "total")
    if aiohttp_socks is not None and isinstance(exc, aiohttp_socks.ProxyConnectionError):
        return ProxyError(f"cannot connect to proxy {proxy}: {_describe(exc)}")
    if aiohttp_socks is not None and isinstance(exc, aiohttp_socks.ProxyError):
        # A refused login or auth method will be refused again; a refused target may come back.
        return ProxyError(
            f"proxy {proxy} failed for {target}: {_describe(exc)}",
            retryable="authentication" not in str(exc).lower(),
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ProxyError(f"cannot connect to proxy {proxy}: {_describe(exc.os_error)}")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ProxyError(
            f"proxy {proxy} refused the tunnel to {target}: HTTP {exc.status} {exc.message}",
            retryable=exc.status != 407,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportError(f"cannot connect to {target}{via}: {_describe(exc.os_error)}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransportError(f"{target} closed the connection{via}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransportError(f"response from {target} was cut off: {_describe(exc)}")
    return TransportError(f"request to {target}{via} failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def fetch_json(
    url: str, *, headers: dict[str, str], timeout: Timeout, target: str, secrets: tuple[str, ...] = (),
    body: bytes | None = None,
) -> Any:
    """GET a small JSON document (POST ``body`` when given) through the pooled session, with netfly's errors."""
    session = await default_pool.session()
    method = "GET" if body is None else "POST"
    limits = client_timeout(timeout, timeout.total)
    try:
        async with session.request(method, url, headers=headers, data=body, timeout=limits) as response:
            raw = await response.read()
            if response.status >= 300:
                try:
                    reply: Any = _json.loads(raw)
                except ValueError:
                    reply = raw.decode("utf-8", "replace")
                message = scrub(error_message_from_body(reply, response.reason or ""), secrets)
                raise error_for_status(
                    response.status, message, provider=target, retry_after=parse_retry_after(response.headers)
                )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise translate_client_error(exc, target=target, proxy=None, timeout=timeout) from None
    try:
        return _json.loads(raw)
    except ValueError:
        raise StreamDecodeError(f"{target}: invalid JSON from {url}") from None
