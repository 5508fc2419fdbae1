"""One streamed answer: the retry policy wrapped around whole attempts, each attempt flowing
transport → SSE decoder → chunk interpreter → caller.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from . import _json
from .chunks import ChatResult, ChunkInterpreter, error_message_from_body
from .errors import (
    LocalServerError,
    NetflyError,
    NetflyTimeoutError,
    ProxyError,
    StreamDecodeError,
    StreamInterruptedError,
    TransportError,
    UpstreamError,
    error_for_status,
)
from .redact import redact_headers, scrub
from .retry import RetryPolicy, parse_retry_after
from .sse import DEFAULT_MAX_LINE_BYTES, SSEDecoder
from .transport import Proxy, SessionPool, Timeout, client_timeout, default_pool, translate_client_error

logger = logging.getLogger("netfly")

_CLIENT_FAILURES: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
try:
    import aiohttp_socks

    # Not subclasses of each other, nor of OSError / TimeoutError: each is named.
    _CLIENT_FAILURES += (aiohttp_socks.ProxyError, aiohttp_socks.ProxyConnectionError, aiohttp_socks.ProxyTimeoutError)
except ImportError:  # pragma: no cover
    pass

_ERROR_BODY_LIMIT = 64 * 1024
_JSON_BODY_LIMIT = 32 * 1024 * 1024
_READ_SIZE = 16 * 1024
# After [DONE], how long to wait for the end of the body so the connection can be reused; a server
# that keeps the body open longer only costs the caller this much.
_DRAIN_AFTER_DONE = 0.25


@dataclass
class ChatRequest:
    """Everything one call needs, built and validated by the provider before any I/O."""

    provider: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    proxy: Proxy | None = None
    timeout: Timeout = field(default_factory=Timeout)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    strict: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    secrets: tuple[str, ...] = ()
    payload: bytes = b""  # the serialised body; built once by the provider

    def __repr__(self) -> str:
        return (
            f"ChatRequest(provider={self.provider!r}, url={self.url!r}, "
            f"headers={redact_headers(self.headers)!r}, model={self.body.get('model')!r}, "
            f"proxy={self.proxy!r}, timeout={self.timeout!r})"
        )


@dataclass
class AttemptRecord:
    """One attempt of a call: its error (``None`` when it succeeded) and how long it took."""

    number: int
    error: str | None = None
    status: int | None = None
    duration: float = 0.0


@dataclass
class StreamStats:
    """Figures of one streamed answer, filled in as it runs."""

    provider: str
    model: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    time_to_first_token: float | None = None
    chunks: int = 0
    characters: int = 0
    duration: float | None = None


class ChatStream:
    """An async iterator of answer text that also exposes ``.stats`` and, once done, ``.result``.

    Iterate it once. Leaving the loop early (``break``) closes the connection when the stream is
    garbage-collected; use ``async with`` or :meth:`aclose` to close it at a known point.
    """

    def __init__(self, request: ChatRequest, pool: SessionPool | None = None) -> None:
        self.request = request
        self.stats = StreamStats(provider=request.provider, model=request.body.get("model"))
        self.result: ChatResult | None = None
        self._pool = pool or default_pool
        self._parts: list[str] = []
        self._iterator = self._run()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._iterator.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    async def _run(self) -> AsyncGenerator[str, None]:
        request, stats = self.request, self.stats
        started = time.monotonic()
        deadline = started + request.timeout.total if request.timeout.total else None
        attempt = 0
        try:
            while True:
                attempt += 1
                record = AttemptRecord(attempt)
                stats.attempts.append(record)
                attempt_started = time.monotonic()
                logger.debug("%s: attempt %d: %r", request.provider, attempt, request)
                interpreter = ChunkInterpreter(strict=request.strict, secrets=request.secrets)
                try:
                    # aclosing: leaving early closes the attempt (and its connection) right here,
                    # not whenever the garbage collector gets to it.
                    async with aclosing(self._attempt(interpreter, deadline)) as texts:
                        async for text in texts:
                            if stats.time_to_first_token is None:
                                stats.time_to_first_token = time.monotonic() - started
                            stats.chunks += 1
                            stats.characters += len(text)
                            self._parts.append(text)
                            yield text
                except NetflyError as exc:
                    error: NetflyError = await self._explain(_scrub_error(exc, request.secrets))
                else:
                    record.duration = time.monotonic() - attempt_started
                    self.result = interpreter.result(self.text)
                    if interpreter.model:
                        stats.model = interpreter.model
                    return
                record.duration = time.monotonic() - attempt_started
                record.error = f"{type(error).__name__}: {error}"
                record.status = getattr(error, "status", None)
                if self._parts:
                    # Text already reached the caller: a retry would repeat it. Only a cut stream
                    # (the local server's death included) is an interruption; an in-stream error or
                    # a decode error keeps its own type.
                    if not isinstance(error, (TransportError, LocalServerError)):
                        raise error
                    raise StreamInterruptedError(
                        f"{request.provider}: stream interrupted after {len(self.text)} characters: {error}",
                        self.text,
                    ) from error
                delay = request.retry.delay_for(attempt, error)
                if delay is None:
                    raise error
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise error
                logger.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    request.provider, attempt, request.retry.max_attempts, record.error, delay,
                )
                await asyncio.sleep(delay)
        finally:
            stats.duration = time.monotonic() - started

    async def _explain(self, error: NetflyError) -> NetflyError:
        """A failed attempt's error, or a truer one: a hook for streams that know their server
        (``Local``'s replaces a cut connection with the child's crash, which is not retried)."""
        return error

    async def _attempt(self, interpreter: ChunkInterpreter, deadline: float | None) -> AsyncGenerator[str, None]:
        request = self.request
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetflyTimeoutError(
                    f"{request.provider}: total timeout of {request.timeout.total} s exceeded", "total"
                )
        proxy = request.proxy
        http_proxy = proxy if proxy is not None and not proxy.is_socks else None
        headers, proxy_headers = _with_proxy_authorization(request, http_proxy)
        try:
            session = await self._pool.session(proxy)
            response = await session.post(
                request.url,
                data=_request_body(request),
                headers=headers,
                proxy=http_proxy.url_without_credentials if http_proxy else None,
                proxy_headers=proxy_headers,
                timeout=client_timeout(request.timeout, remaining),
            )
        except _CLIENT_FAILURES as exc:
            raise self._transport_error(exc) from None
        finished = False
        try:
            try:
                if response.status >= 300:
                    raise await self._status_error(response)
                content_type = response.content_type
                if content_type == "application/json":
                    body = await _read_limited(response, _JSON_BODY_LIMIT)
                    try:
                        parsed = _json.loads(body)
                    except _json.JSONDecodeError as exc:
                        raise StreamDecodeError(f"{request.provider}: invalid JSON reply: {exc}") from None
                    text = interpreter.interpret_completion(parsed)
                    finished = True
                    if text:
                        yield text
                    return
                if content_type == "text/html":
                    snippet = (await _read_limited(response, 2048)).decode("utf-8", "replace")
                    raise UpstreamError(
                        f"{request.provider}: expected an event stream, got an HTML page: {snippet[:200]!r}"
                    )
                decoder = SSEDecoder(request.max_line_bytes)
                content = response.content
                interpret = interpreter.interpret
                # Reads of at most 16 KiB: a burst (a fast server, a proxy flushing its buffer) is
                # decoded a slice at a time, so its first text is not held back behind the whole burst.
                async for raw in content.iter_chunked(_READ_SIZE):
                    for event in decoder.feed(raw):
                        text = interpret(event)
                        if text is not None:
                            yield text
                        elif interpreter.done:
                            break
                    if interpreter.done:
                        break
                else:
                    for event in decoder.flush():
                        text = interpret(event)
                        if text is not None:
                            yield text
                    if not interpreter.done and interpreter.finish_reason is None:
                        logger.warning(
                            "%s: stream ended without [DONE] or finish_reason; the answer may be incomplete",
                            request.provider,
                        )
                if interpreter.done and not content.is_eof():
                    await _drain(content)
                finished = content.is_eof()
            except _CLIENT_FAILURES as exc:
                raise self._transport_error(exc) from None
        finally:
            if finished:
                response.release()  # back to the pool for the next call
            else:
                response.close()  # early exit, cancellation or error: drop the connection now

    def _transport_error(self, exc: BaseException) -> NetflyError:
        request = self.request
        error = translate_client_error(exc, target=request.provider, proxy=request.proxy, timeout=request.timeout)
        message = scrub(str(error), request.secrets)
        if message != str(error):
            error.args = (message,)
        return error

    async def _status_error(self, response: aiohttp.ClientResponse) -> NetflyError:
        request = self.request
        if response.status == 407 and request.proxy is not None and not request.proxy.is_socks:
            # A plain-http target through an HTTP proxy: the proxy's refusal arrives as the response.
            return ProxyError(
                f"proxy {request.proxy} refused the credentials for {request.provider}: HTTP 407 {response.reason}",
                retryable=False,
            )
        try:
            raw = await _read_limited(response, _ERROR_BODY_LIMIT)
        except _CLIENT_FAILURES:
            raw = b""
        # Servers echo a wrong key back ("Incorrect API key provided: sk-..."): scrub before parsing
        # so neither the message nor ``error.body`` keeps it.
        text = scrub(raw.decode("utf-8", "replace"), request.secrets)
        body: Any = text
        if text.strip():
            try:
                body = _json.loads(text)
            except _json.JSONDecodeError:
                pass
        message = scrub(error_message_from_body(body, response.reason or ""), request.secrets)
        return error_for_status(
            response.status,
            message,
            provider=request.provider,
            retry_after=parse_retry_after(response.headers),
            body=body if isinstance(body, dict) else None,
        )


def _scrub_error(error: NetflyError, secrets: tuple[str, ...]) -> NetflyError:
    """Remove secrets a server echoed back (in an error body or an in-stream error) from ``error``."""
    if secrets:
        error.args = tuple(scrub(a, secrets) if isinstance(a, str) else a for a in error.args)
        message = getattr(error, "message", None)
        if isinstance(message, str):
            error.message = scrub(message, secrets)  # type: ignore[attr-defined]
    return error


def _with_proxy_authorization(
    request: ChatRequest, proxy: Proxy | None
) -> tuple[dict[str, str], dict[str, str] | None]:
    """(request headers, CONNECT headers) carrying Basic ``Proxy-Authorization`` for an HTTP(S) proxy.

    aiohttp deprecates ``proxy_auth`` and sends ``proxy_headers`` only on a CONNECT (https targets);
    a plain-http target is asked for through the proxy directly, so the header goes on the request.
    It must never go on a request inside a tunnel: the target server would see the password.
    """
    if proxy is None or proxy.username is None:
        return request.headers, None
    token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode("ascii")
    authorization = {"Proxy-Authorization": f"Basic {token}"}
    if request.url.lower().startswith("https:"):
        return request.headers, authorization
    return {**request.headers, **authorization}, None


def _request_body(request: ChatRequest) -> bytes | io.BytesIO:
    # aiohttp warns (ResourceWarning) about raw bytes over 1 MiB; a BytesIO is sent in parts instead.
    payload = request.payload or _json.dumps(request.body)
    return io.BytesIO(payload) if len(payload) > 512 * 1024 else payload


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for raw in response.content.iter_any():
        parts.append(raw)
        size += len(raw)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


async def _drain(content: aiohttp.StreamReader) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the body), briefly."""
    try:
        await asyncio.wait_for(_read_to_eof(content), _DRAIN_AFTER_DONE)
    except _CLIENT_FAILURES:  # asyncio.TimeoutError included
        pass  # the answer is complete; the connection is simply not reused


async def _read_to_eof(content: aiohttp.StreamReader) -> None:
    while await content.readany():
        pass

