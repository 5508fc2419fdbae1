"""The gateway's aiohttp application: OpenAI's chat completions API over netfly's providers.

It only calls the public provider API (``Provider.stream`` → :class:`~netfly.ChatStream`). Run it
with :func:`netfly.gateway.serve` (or ``netfly serve``); when mounting it in another runner, pass
``handler_cancellation=True`` to that runner so a client that disconnects cancels its upstream
request at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from .. import _json
from ..__about__ import __version__
from ..errors import ConfigurationError, NetflyError
from ..health import engine_state, summarize_stats
from ..provider import Provider
from ..providers import get_provider
from ..stream import ChatStream
from ..transport import Proxy, Timeout, aclose
from .errors import ErrorInfo, GatewayError, describe
from .format import DONE_EVENT, CompletionFormatter, model_list, model_object, sse_event
from .logfmt import access_line
from .router import ModelRouter
from .schema import ChatCompletionRequest, parse_chat_request

logger = logging.getLogger("netfly.gateway")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Words for the access log line of the request being handled (middleware and handler share a task).
_notes: ContextVar[list[str] | None] = ContextVar("netfly_gateway_notes", default=None)
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tells nginx-style proxies in front not to buffer the stream
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """The request handlers and the settings they share."""

    def __init__(
        self,
        router: ModelRouter,
        *,
        auth_token: str | None,
        max_body_bytes: int,
        call_options: Mapping[str, Any],
        upstream_usage: bool,
    ) -> None:
        self.router = router
        self._token = auth_token.encode() if auth_token is not None else None
        self.max_body_bytes = max_body_bytes
        self.call_options = dict(call_options)
        self.upstream_usage = upstream_usage

    # -- middlewares (outermost first) ---------------------------------------------------------

    @web.middleware
    async def log_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One line per request: method, path (no query string), status, duration, and a note."""
        started = time.monotonic()
        status = 500
        notes: list[str] = []
        reset = _notes.set(notes)
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request": the handler was cancelled by the disconnect
            _note("client disconnected")
            raise
        finally:
            _notes.reset(reset)
            logger.info("%s", access_line(request.method, request.rel_url.raw_path, status,
                                          time.monotonic() - started, notes))

    @web.middleware
    async def openai_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes an OpenAI-style JSON error; nothing escapes to crash a connection."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            info = ErrorInfo(exc.status, f"{exc.reason}: {request.method} {request.rel_url.raw_path}", kind)
        except GatewayError as exc:
            info = describe(exc)
        except NetflyError as exc:
            info = describe(exc)
            _note(type(exc).__name__)
        except Exception as exc:
            logger.exception("unexpected error handling %s %s", request.method, request.rel_url.raw_path)
            info = describe(exc)
            _note(type(exc).__name__)
        return error_response(info)

    @web.middleware
    async def require_token(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of the token was right.
            # surrogateescape: header bytes that are not UTF-8 compare as the bytes they are (a 401, not a 500).
            given_bytes = given.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self._token):
                raise GatewayError(401, "missing or invalid bearer token in the Authorization header",
                                   type="authentication_error", code="invalid_api_key")
        return await handler(request)

    # -- handlers ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"status": "ok", "version": __version__}
        local = self._local_engine()
        if local is not None:
            body["local"] = local
        return web.json_response(body, dumps=_dumps)

    def _local_engine(self) -> dict[str, Any] | None:
        """The state of the local model's engine (the default provider's, else any routed one's)."""
        for provider in (self.router.default, *self.router.providers.values()):
            state = engine_state(provider)
            if state is not None:
                return {"provider": provider.name(), **state.as_dict()}
        return None

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(model_list(self.router.model_ids()), dumps=_dumps)

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model"]
        try:
            route = self.router.resolve(model_id)
        except GatewayError as exc:
            raise GatewayError(
                404, exc.message, type="not_found_error", param="model", code="model_not_found"
            ) from None
        return web.json_response(model_object(route.public_id, route.provider.name()), dumps=_dumps)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        chat = parse_chat_request(await self._read_body(request))
        route = self.router.resolve(chat.model)
        _check_configured(route.provider)
        _note(f"model={route.public_id}")
        params = dict(chat.params)
        if self.upstream_usage:
            params["stream_options"] = {"include_usage": True}  # so usage can be reported to the client
        elif chat.stream and chat.include_usage:
            params["stream_options"] = {"include_usage": True}
        stream = route.provider.stream(route.model, chat.messages, **params, **self.call_options)
        formatter = CompletionFormatter(route.public_id, include_usage=chat.include_usage)
        try:
            async with stream:
                if chat.stream:
                    return await self._relay(request, stream, formatter, chat)
                async for _ in stream:
                    pass
                assert stream.result is not None
                return web.json_response(formatter.completion(stream.result), dumps=_dumps)
        finally:
            _note(summarize_stats(stream.stats))

    async def _relay(
        self, request: web.Request, stream: ChatStream, formatter: CompletionFormatter, chat: ChatCompletionRequest
    ) -> web.StreamResponse:
        # Wait for the first text (or the end) before sending the head: until then an upstream
        # error can still be reported with its own status.
        first: str | None
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        try:
            await response.write(formatter.role() + (formatter.content(first) if first else b""))
            async for text in stream:
                await response.write(formatter.content(text))  # one write per chunk: sent as it arrives
            result = stream.result
            assert result is not None
            tail = formatter.finish(result.finish_reason)
            if chat.include_usage:
                tail += formatter.usage(result.usage)
            await response.write(tail + DONE_EVENT)
            await response.write_eof()
        except ConnectionResetError:
            # The client went away; leaving closes the upstream stream (``async with`` in the caller).
            _note("client disconnected")
        except Exception as exc:  # NetflyError after the head was sent, or a bug: tell the client in-band
            if not isinstance(exc, NetflyError):
                logger.exception("unexpected error while relaying %s", request.rel_url.raw_path)
            _note(f"{type(exc).__name__} after the stream started")
            try:
                await response.write(sse_event(describe(exc).body()))
                await response.write_eof()
            except ConnectionResetError:
                _note("client disconnected")
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        too_large = GatewayError(413, f"request body is larger than the limit of {limit} bytes",
                                 code="request_too_large")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        async for piece in request.content.iter_chunked(64 * 1024):
            body += piece
            if len(body) > limit:
                raise too_large
        return bytes(body)


def create_app(
    provider: type[Provider] | str,
    *,
    providers: Mapping[str, type[Provider]] | None = None,
    auth_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_retries: int | None = None,
    retry_delay: float | None = None,
    timeout: Timeout | float | None = None,
    proxy: str | None = None,
    upstream_usage: bool = True,
) -> web.Application:
    """The gateway application.

    ``provider`` (a class or a registered name) serves bare model names; ``providers`` (default:
    every registered provider) are reachable as ``"name/model"``. ``auth_token``, when set, is
    required as ``Authorization: Bearer <token>``. ``max_retries``, ``retry_delay``, ``timeout`` and
    ``proxy`` apply to every upstream call (default: each provider's own). ``upstream_usage`` asks
    upstreams for token usage (``stream_options.include_usage``) so it can be reported.
    """
    default = get_provider(provider) if isinstance(provider, str) else provider
    if auth_token is not None and not auth_token.strip():
        raise ConfigurationError("auth_token must not be empty (pass None for no authentication)")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ConfigurationError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    gateway = Gateway(
        ModelRouter(default, providers),
        auth_token=auth_token,
        max_body_bytes=max_body_bytes,
        call_options=_call_options(max_retries, retry_delay, timeout, proxy),
        upstream_usage=upstream_usage,
    )
    app = web.Application(
        middlewares=[gateway.log_requests, gateway.openai_errors, gateway.require_token],
        client_max_size=max_body_bytes,
    )
    app[GATEWAY] = gateway
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/v1/models", gateway.list_models)
    app.router.add_get("/v1/models/{model:.+}", gateway.get_model)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.on_cleanup.append(_close_connections)
    return app


GATEWAY = web.AppKey("netfly.gateway", Gateway)


def error_response(info: ErrorInfo) -> web.Response:
    return web.json_response(info.body(), status=info.status, headers=info.headers(), dumps=_dumps)


def _call_options(
    max_retries: int | None, retry_delay: float | None, timeout: Timeout | float | None, proxy: str | None
) -> dict[str, Any]:
    # Checked here, at start-up: a bad setting must not turn into a 400 on every request.
    options: dict[str, Any] = {}
    if max_retries is not None:
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 1:
            raise ConfigurationError(f"max_retries must be a whole number of attempts >= 1, got {max_retries!r}")
        options["max_retries"] = max_retries
    if retry_delay is not None:
        if not isinstance(retry_delay, (int, float)) or isinstance(retry_delay, bool) or retry_delay < 0:
            raise ConfigurationError(f"retry_delay must be a number of seconds >= 0, got {retry_delay!r}")
        options["retry_delay"] = float(retry_delay)
    if timeout is not None:
        options["timeout"] = Timeout.coerce(timeout)
    if proxy:
        Proxy.parse(proxy)
        options["proxy"] = proxy
    return options


def _check_configured(provider: type[Provider]) -> None:
    # A provider that needs a key the gateway does not have is the operator's problem, not the client's.
    if provider.needs_auth and not provider.resolve_api_key():
        raise GatewayError(503, f"provider {provider.name()} is not configured on this gateway (no API key)",
                           type="server_error", code="provider_not_configured")


def _note(text: str) -> None:
    notes = _notes.get()
    if notes is not None:
        notes.append(text)


def _dumps(obj: Any) -> str:
    return _json.dumps(obj).decode()


async def _close_connections(app: web.Application) -> None:
    await aclose()
