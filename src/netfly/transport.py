"""Transport: all of netfly's HTTP. Pooled aiohttp sessions, proxies and timeouts; opening a
streamed response (:func:`open_stream`), status → error mapping, draining and releasing connections;
client failures become netfly errors here and nowhere else.

:func:`open_stream` without a proxy goes through :mod:`netfly._http1`, a lean HTTP/1.1 client (a
quarter of the gateway's CPU per request was aiohttp's client); proxies, URLs with credentials and
anything else it does not take go through aiohttp. This module is the one place that chooses.

One :class:`aiohttp.ClientSession` is kept per event loop (and per SOCKS proxy, which needs its own
connector) and reused by every call. Sessions are closed by :func:`aclose`, or automatically when
``asyncio.run`` shuts its loop down: a small async generator registered with the loop is finalized
by ``loop.shutdown_asyncgens()`` and closes the loop's sessions on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import re
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from . import _checks, _http1, _json
from .errors import (
    ConfigurationError,
    NetflyError,
    NetflyTimeoutError,
    ProxyError,
    RedirectError,
    StreamDecodeError,
    TransportError,
    error_for_status,
    error_message_from_body,
)
from .redact import clip, drop_secret_prefix, redact_url, scrub, scrub_value
from .retry import parse_retry_after

try:
    import aiohttp_socks
except ImportError:  # pragma: no cover - aiohttp-socks is a declared dependency
    aiohttp_socks = None  # type: ignore[assignment]

# Every failure of the HTTP client stack. aiohttp-socks' errors are neither OSError nor TimeoutError
# nor subclasses of each other: each is named.
CLIENT_FAILURES: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
if aiohttp_socks is not None:
    CLIENT_FAILURES += (aiohttp_socks.ProxyError, aiohttp_socks.ProxyConnectionError, aiohttp_socks.ProxyTimeoutError)

_ERROR_BODY_LIMIT = 64 * 1024
_READ_SIZE = 16 * 1024
# After the end of an answer, how long to wait for the end of the body so the connection can be
# reused; a server that keeps the body open longer only costs the caller this much.
_DRAIN_AFTER_END = 0.25
_NEVER_ROUND = float("inf")
_LOCATION_CHARS = 500


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
            _checks.optional_seconds(f"timeout {name}", getattr(self, name), positive=True, param="timeout")

    @classmethod
    def coerce(cls, value: Timeout | float | int | None) -> Timeout:
        """A number means the total limit; ``None`` means the defaults."""
        if value is None:
            return cls()
        if isinstance(value, Timeout):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(total=float(value))
        raise ConfigurationError(f"timeout must be a number of seconds or a netfly.Timeout, got {value!r}",
                                 param="timeout")


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
            raise ConfigurationError(f"invalid proxy URL {redact_url(url)!r}: {exc}", param="proxy") from None
        scheme = parts.scheme.lower()
        if scheme not in _PROXY_SCHEMES:
            raise ConfigurationError(
                f"unsupported proxy scheme {scheme!r} in {redact_url(url)!r}; "
                f"use one of: {', '.join(sorted(_PROXY_SCHEMES))}", param="proxy"
            )
        if not parts.hostname:
            raise ConfigurationError(f"proxy URL {redact_url(url)!r} has no host", param="proxy")
        if scheme.startswith("socks") and aiohttp_socks is None:  # pragma: no cover
            raise ConfigurationError("SOCKS proxies need the aiohttp-socks package: pip install aiohttp-socks",
                                     param="proxy")
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
        self._forget_last()

    def _forget_last(self) -> None:
        # The last loop asked for and its sessions, held weakly as the dictionary holds them: nearly every
        # call comes from the same loop, and a weak-key lookup makes a new weak reference each time.
        self._last_loop: Callable[[], asyncio.AbstractEventLoop | None] = _nothing
        self._last_sessions: Callable[[], _LoopSessions | None] = _nothing

    def _current(self) -> _LoopSessions | None:
        """The running loop's sessions if it was the last loop asked for."""
        return self._last_sessions() if self._last_loop() is asyncio.get_running_loop() else None

    async def _loop_sessions(self) -> _LoopSessions:
        loop = asyncio.get_running_loop()
        sessions = self._by_loop.get(loop)
        if sessions is None:
            sessions = _LoopSessions()
            self._by_loop[loop] = sessions
            await sessions.watch_loop_shutdown()
        self._last_loop, self._last_sessions = weakref.ref(loop), weakref.ref(sessions)
        return sessions

    async def http1(self) -> _http1.Pool:
        """The running loop's lean keep-alive pool (direct requests)."""
        sessions = self._current() or await self._loop_sessions()
        if sessions.http1 is None:
            sessions.http1 = _http1.Pool()
        return sessions.http1

    async def session(self, proxy: Proxy | None = None) -> aiohttp.ClientSession:
        sessions = self._current() or await self._loop_sessions()
        key = str(proxy) + (proxy.password or "") if proxy is not None and proxy.is_socks else ""
        session = sessions.by_key.get(key)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=_new_connector(proxy if key else None),
                auto_decompress=True,
                # One session serves every call, whoever made it: a cookie one upstream set must
                # not be sent back on another caller's request (nor cost a jar lookup per call).
                cookie_jar=aiohttp.DummyCookieJar(),
                # netfly applies its own per-call timeouts to each request.
                timeout=aiohttp.ClientTimeout(total=None),
            )
            sessions.by_key[key] = session
        return session

    async def aclose(self) -> None:
        """Close the sessions of the running loop."""
        sessions = self._by_loop.pop(asyncio.get_running_loop(), None)
        self._forget_last()
        if sessions is not None:
            await sessions.aclose()


class _LoopSessions:
    def __init__(self) -> None:
        self.by_key: dict[str, aiohttp.ClientSession] = {}
        self.http1: _http1.Pool | None = None
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
        http1, self.http1 = self.http1, None
        if http1 is not None:
            await http1.aclose()
        for session in sessions:
            await session.close()


def _nothing() -> None:
    return None


default_pool = SessionPool()


async def aclose() -> None:
    """Close netfly's pooled connections on the running event loop."""
    await default_pool.aclose()


def client_timeout(timeout: Timeout, remaining_total: float | None) -> aiohttp.ClientTimeout:
    if remaining_total is None:
        return _untimed_client_timeout(timeout)
    return _client_timeout(timeout, remaining_total)


@functools.lru_cache(maxsize=64)
def _untimed_client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    # Without a total limit a call's limits are its Timeout's: built once, not per call (both frozen).
    return _client_timeout(timeout, None)


def _client_timeout(timeout: Timeout, remaining_total: float | None) -> aiohttp.ClientTimeout:
    # ``connect`` also bounds DNS resolution, which ``sock_connect`` alone leaves unbounded (a dead
    # resolver would hang the call). It includes waiting for a free pooled connection too, but the
    # pool allows 1000, so that wait only happens under a load where failing fast is right.
    # ceil_threshold: aiohttp rounds deadlines of 5 s and more up to a whole second (to batch timer
    # wake-ups); a total of 7 s would fire at up to 8 s. Limits are kept to the millisecond instead.
    return aiohttp.ClientTimeout(
        total=remaining_total, connect=timeout.connect, sock_connect=timeout.connect, sock_read=timeout.idle,
        ceil_threshold=_NEVER_ROUND,
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
    if isinstance(exc, (aiohttp.ClientConnectorError, _http1.ConnectError)):
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
    """GET a small JSON document (POST ``body`` when given) through the pooled session, with netfly's
    errors."""
    session = await default_pool.session()
    method = "GET" if body is None else "POST"
    limits = client_timeout(timeout, timeout.total)
    try:
        async with session.request(
            method, url, headers=headers, data=body, timeout=limits, allow_redirects=False
        ) as response:
            if response.status >= 300:
                failed = _AiohttpResponse(response, _Failure(target, None, timeout, secrets))
                raise await _status_error(failed, target=target, proxy=None, secrets=secrets)
            raw = await response.read()
    except CLIENT_FAILURES as exc:
        raise translate_client_error(exc, target=target, proxy=None, timeout=timeout) from None
    try:
        return _json.loads(raw)
    except ValueError:
        raise StreamDecodeError(f"{target}: invalid JSON from {redact_url(url)}") from None


# -- streamed responses ----------------------------------------------------------------------------


class StreamingResponse:
    """An open response whose body is read as it arrives; :func:`open_stream` returns it with a 2xx status.

    Iterate it for the body's bytes (reads of at most 16 KiB), or :meth:`read` a bounded whole body.
    Client failures while reading raise netfly errors. :meth:`drain` after the answer's end lets the
    connection be reused; :meth:`release` (always, in a ``finally``) returns a fully read connection
    to the pool and drops any other. Two kinds: aiohttp's and the lean client's.
    """

    status: int
    reason: str
    headers: Mapping[str, str]  # looked up by lower-case name
    content_type: str

    def __init__(self, fail: _Failure) -> None:
        self._fail = fail

    def __aiter__(self) -> StreamingResponse:
        # An iterator object, not an async generator: a caller that stops at the answer's end
        # leaves no generator for the event loop to finalise (a thread-safe wake-up per request).
        return self

    async def __anext__(self) -> bytes:
        # Bounded reads: a burst (a fast server, a proxy flushing its buffer) is handed on a slice
        # at a time, so its first text is not held back behind the whole burst.
        try:
            raw = await self._read(_READ_SIZE)
        except CLIENT_FAILURES as exc:
            raise self._fail(exc) from None
        if not raw:
            raise StopAsyncIteration
        return raw

    async def read(self, limit: int) -> bytes:
        """The body, up to ``limit`` bytes."""
        try:
            return await self._read_limited(limit)
        except CLIENT_FAILURES as exc:
            raise self._fail(exc) from None

    async def _read_limited(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < limit:
            raw = await self._read(_READ_SIZE)
            if not raw:
                break
            parts.append(raw)
            size += len(raw)
        return b"".join(parts)[:limit]

    async def drain(self) -> None:
        """Read what follows the answer's end (normally just the end of the body), briefly."""
        if self.at_end:
            return
        try:
            await asyncio.wait_for(self._read_to_end(), _DRAIN_AFTER_END)
        except CLIENT_FAILURES:  # asyncio.TimeoutError included
            pass  # the answer is complete; the connection is simply not reused

    async def _read_to_end(self) -> None:
        while await self._read(_READ_SIZE):
            pass

    async def _read(self, size: int) -> bytes:
        """Up to ``size`` body bytes, b"" at the end; client failures raised as they are."""
        raise NotImplementedError

    @property
    def at_end(self) -> bool:
        """Whether the body has ended (its end has arrived): :meth:`drain` would not wait."""
        raise NotImplementedError

    def release(self) -> None:
        """Back to the pool when read to the end; else (early exit, cancellation, error) dropped now."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the connection, whatever is left of the body."""
        raise NotImplementedError


class _AiohttpResponse(StreamingResponse):
    def __init__(self, response: aiohttp.ClientResponse, fail: _Failure) -> None:
        super().__init__(fail)
        self._response = response
        self.status, self.reason, self.headers = response.status, response.reason or "", response.headers
        self.content_type = response.content_type

    async def _read(self, size: int) -> bytes:
        return await self._response.content.read(size)

    @property
    def at_end(self) -> bool:
        return self._response.content.is_eof()

    def release(self) -> None:
        if self._response.content.is_eof():
            self._response.release()  # back to the pool for the next call
        else:
            self._response.close()  # early exit, cancellation or error: drop the connection now

    def close(self) -> None:
        self._response.close()


class _LeanResponse(StreamingResponse):
    def __init__(self, connection: _http1.Connection, fail: _Failure) -> None:
        super().__init__(fail)
        self._connection: _http1.Connection | None = connection
        self.status, self.headers = connection.status, connection.headers
        self.reason = connection.reason.decode("latin-1")
        raw_type = connection.headers.get("content-type", "")
        self.content_type = raw_type.partition(";")[0].strip().lower() or "application/octet-stream"
        self._at_end = False

    async def _read(self, size: int) -> bytes:
        if self._connection is None:
            return b""
        return await self._connection.read(size)

    @property
    def at_end(self) -> bool:
        return self._at_end if self._connection is None else self._connection.at_end

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:  # once: a released connection may already serve another call
            self._at_end = connection.at_end
            connection.release()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.busy = False
            connection.close()


class _Failure:
    """Turns a client failure of one request into its netfly error, secrets scrubbed."""

    def __init__(self, target: str, proxy: Proxy | None, timeout: Timeout, secrets: tuple[str, ...]) -> None:
        self.target, self.proxy, self.timeout, self.secrets = target, proxy, timeout, secrets

    def __call__(self, exc: BaseException) -> NetflyError:
        error = translate_client_error(exc, target=self.target, proxy=self.proxy, timeout=self.timeout)
        message = scrub(str(error), self.secrets)
        if message != str(error):
            error.args = (message,)
        return error


async def open_stream(
    url: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    target: str,
    timeout: Timeout,
    remaining: float | None = None,
    proxy: Proxy | None = None,
    secrets: tuple[str, ...] = (),
    pool: SessionPool | None = None,
) -> StreamingResponse:
    """POST ``payload`` to ``url`` and return the response once its head arrived with a 2xx status.

    A non-2xx status raises its :class:`ResponseStatusError` (server message, ``Retry-After``); a
    client failure its :class:`TransportError`. ``remaining`` bounds this request's total time.
    """
    fail = _Failure(target, proxy, timeout, secrets)
    route = _lean_route(url) if proxy is None and _plain_headers(tuple(headers.items())) else None
    try:
        if route is not None:
            response = await _open_lean(route, payload, headers, timeout, remaining, pool, fail)
        else:
            response = await _open_aiohttp(url, payload, headers, timeout, remaining, proxy, pool, fail)
    except CLIENT_FAILURES as exc:
        raise fail(exc) from None
    if response.status < 300:
        return response
    try:
        raise await _status_error(response, target=target, proxy=proxy, secrets=secrets)
    except CLIENT_FAILURES as exc:
        raise fail(exc) from None
    finally:
        response.close()


async def _open_aiohttp(
    url: str, payload: bytes, headers: Mapping[str, str], timeout: Timeout, remaining: float | None,
    proxy: Proxy | None, pool: SessionPool | None, fail: _Failure,
) -> StreamingResponse:
    http_proxy = proxy if proxy is not None and not proxy.is_socks else None
    headers, proxy_headers = _with_proxy_authorization(url, headers, http_proxy)
    session = await (pool or default_pool).session(proxy)
    response = await session.post(
        url,
        data=io.BytesIO(payload) if len(payload) > 512 * 1024 else payload,  # aiohttp warns about big bytes
        headers=headers,
        proxy=http_proxy.url_without_credentials if http_proxy else None,
        proxy_headers=proxy_headers,
        timeout=client_timeout(timeout, remaining),
        # Never followed: see RedirectError (a POST turned into a GET, credentials to another host).
        allow_redirects=False,
    )
    return _AiohttpResponse(response, fail)


@dataclass(frozen=True)
class _Route:
    origin: _http1.Origin
    target: str  # path and query, as sent
    host: str  # the Host header


# What the lean client sends verbatim: aiohttp (yarl) would re-quote or normalise anything else.
_PLAIN_URL = re.compile(r"[A-Za-z0-9\-._~:/?&=+,;!$'()*@\[\]]*")


@functools.lru_cache(maxsize=256)
def _lean_route(url: str) -> _Route | None:
    """Where the lean client sends a POST to ``url``, or None for a URL it leaves to aiohttp."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if not _PLAIN_URL.fullmatch(url) or "/." in parts.path:
        return None
    default_port = 443 if scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host_header = host if port in (None, default_port) else f"{host}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Route((scheme, parts.hostname, port or default_port), target, host_header)


@functools.lru_cache(maxsize=64)  # a provider sends the same headers every time: checked once
def _plain_headers(headers: tuple[tuple[str, str], ...]) -> bool:
    # aiohttp refuses a header with a line break in it (ValueError): leave those to it, unchanged. A
    # caller's own Accept-Encoding may ask for brotli, which only aiohttp decodes.
    return not any("\n" in value or "\r" in value or name.lower() == "accept-encoding" for name, value in headers)


async def _open_lean(
    route: _Route, payload: bytes, headers: Mapping[str, str], timeout: Timeout, remaining: float | None,
    pool: SessionPool | None, fail: _Failure,
) -> StreamingResponse:
    http1 = await (pool or default_pool).http1()
    head = _http1.request_head("POST", route.target, route.host, headers, len(payload))
    connection = await http1.request(
        route.origin, head, payload, connect=timeout.connect, idle=timeout.idle, remaining=remaining
    )
    return _LeanResponse(connection, fail)


async def _status_error(
    response: StreamingResponse, *, target: str, proxy: Proxy | None, secrets: tuple[str, ...]
) -> NetflyError:
    if response.status == 407 and proxy is not None and not proxy.is_socks:
        # A plain-http target through an HTTP proxy: the proxy's refusal arrives as the response.
        return ProxyError(
            f"proxy {proxy} refused the credentials for {target}: HTTP 407 {response.reason}", retryable=False
        )
    if 300 <= response.status < 400:
        location = clip(redact_url(response.headers.get("location", "")), _LOCATION_CHARS, secrets)
        return RedirectError(response.status, location, provider=target)
    body = await _error_body(response, secrets)
    return error_for_status(
        response.status,
        scrub(error_message_from_body(body, response.reason or ""), secrets),
        provider=target,
        retry_after=parse_retry_after(response.headers),
        body=body if isinstance(body, dict) else None,
    )


async def _error_body(response: StreamingResponse, secrets: tuple[str, ...]) -> Any:
    """The error body, parsed as JSON when it is JSON, else its text; scrubbed of ``secrets``."""
    try:
        raw = await response.read(_ERROR_BODY_LIMIT)
    except NetflyError:  # a body cut short is no reason to hide the status
        raw = b""
    # Servers echo a wrong key back ("Incorrect API key provided: sk-..."): scrub the raw text before
    # parsing, and the parsed body after, since JSON may have escaped the key (``\/`` for ``/``).
    text = scrub(raw.decode("utf-8", "replace"), secrets)
    if len(raw) >= _ERROR_BODY_LIMIT:
        text = drop_secret_prefix(text, secrets)  # the read cut a key in two
    body: Any = text
    if text.strip():
        try:
            body = scrub_value(_json.loads(text), secrets)
        except _json.JSONDecodeError:
            pass
    return body


def _with_proxy_authorization(
    url: str, headers: Mapping[str, str], proxy: Proxy | None
) -> tuple[Mapping[str, str], dict[str, str] | None]:
    """(request headers, CONNECT headers) carrying Basic ``Proxy-Authorization`` for an HTTP(S) proxy.

    aiohttp deprecates ``proxy_auth`` and sends ``proxy_headers`` only on a CONNECT (https targets);
    a plain-http target is asked for through the proxy directly, so the header goes on the request.
    It must never go on a request inside a tunnel: the target server would see the password.
    """
    if proxy is None or proxy.username is None:
        return headers, None
    token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode("ascii")
    authorization = {"Proxy-Authorization": f"Basic {token}"}
    if url.lower().startswith("https:"):
        return headers, authorization
    return {**headers, **authorization}, None
