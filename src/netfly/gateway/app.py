"""The gateway's application: OpenAI's chat completions API over netfly's providers.

It only calls the public provider API (``Provider.stream`` → :class:`~netfly.ChatStream`). Its
handlers, middlewares and hooks run on netfly's own HTTP/1.1 server (:mod:`.web`, :mod:`.http1`):
run it with :func:`netfly.gateway.serve` or :func:`~netfly.gateway.start` (or ``netfly serve``). A
client that disconnects cancels its handler, and so its upstream request, at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from .. import _checks, _ids
from ..__about__ import __version__
from ..errors import ConfigurationError, NetflyError
from ..events import ChatResult
from ..health import engine_state
from ..provider import Provider
from ..providers import get_provider
from ..stream import ChatStream
from ..transport import Proxy, Timeout, aclose
from . import pages
from .chat import ChatChunkEncoder
from .embeddings import parse_embeddings_request, relay_embeddings
from .errors import ErrorInfo, GatewayError, describe
from .format import model_list, model_object
from .logfmt import access_line
from .messages import MessageBuilder, MessagesEncoder, anthropic_error, parse_messages_request
from .operations import Operations
from .relay import DEFAULT_KEEPALIVE, SSEChannel, StreamEncoder, relay
from .responses import ResponseBuilder, ResponsesEncoder, parse_responses_request
from .router import ModelRouter, Route
from .schema import ChatCall, parse_chat_request
from .stats_line import summarize_stats
from .status import StatusBook
from .web import App, HTTPError, Request, Response, StreamResponse, json_response, text_response

logger = logging.getLogger("netfly.gateway")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Words for the access log line of the request being handled (middleware and handler share a task).
_notes: ContextVar[list[str] | None] = ContextVar("netfly_gateway_notes", default=None)
# Response headers a browser script may read: the ones the SDKs read.
EXPOSED_HEADERS = ", ".join((
    "x-request-id", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens", "openai-processing-ms", "request-id", "x-netfly-provider", "x-netfly-attempts",
))
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's id is echoed only if it is harmless
# The id of the request being handled, for the headers of a response the handler streams itself.
_request_id: ContextVar[str | None] = ContextVar("netfly_gateway_request_id", default=None)

Handler = Callable[[Request], Awaitable[StreamResponse]]


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
        cors_origins: Iterable[str] | None = None,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        operations: Operations | None = None,
    ) -> None:
        self.router = router
        self.operations = operations or Operations()
        self._token = auth_token.encode() if auth_token is not None else None
        self.max_body_bytes = max_body_bytes
        self.call_options = dict(call_options)
        self.upstream_usage = upstream_usage
        origins = frozenset(cors_origins) if cors_origins is not None else frozenset({"*"})
        self.cors_origins = None if "*" in origins else origins  # None: every origin
        self.cors_enabled = bool(origins)
        self.keepalive = keepalive
        self.status = StatusBook()

    # -- middlewares (outermost first) ---------------------------------------------------------

    async def log_requests(self, request: Request, handler: Handler) -> StreamResponse:
        """One line per request: method, path (no query string), status, duration, and a note."""
        started = time.monotonic()
        status = 500
        notes: list[str] = []
        reset = _notes.set(notes)
        given = request.headers.get("X-Request-Id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else _ids.unique_hex()
        reset_id = _request_id.set(request_id)
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:  # streamed responses got these headers when they were prepared
                self._decorate(request, response, request_id)
            return response
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request": the handler was cancelled by the disconnect
            _note("client disconnected")
            raise
        finally:
            _notes.reset(reset)
            _request_id.reset(reset_id)
            if not self.operations.log.json:  # the JSON log has its own line (operations.observe)
                logger.info("%s", access_line(request.method, request.raw_path, status,
                                              time.monotonic() - started, notes, request_id=request_id))

    async def cors_preflight(self, request: Request, handler: Handler) -> StreamResponse:
        """A browser's preflight is answered here, before authentication (it never carries the token)."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not self._cors_origin(request):
            return text_response("origin not allowed", status=403)
        requested = request.headers.get("Access-Control-Request-Headers", "")
        headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600"}
        if requested:
            headers["Access-Control-Allow-Headers"] = requested  # "*" would not cover Authorization
        return Response(status=204, headers=headers)

    def _cors_origin(self, request: Request) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for this request, or None (not allowed)."""
        origin = request.headers.get("Origin")
        if not self.cors_enabled or not origin:
            return None
        if self.cors_origins is None:
            return "*"
        return origin if origin in self.cors_origins else None

    def on_prepare(self, request: Request, response: StreamResponse) -> None:
        request_id = _request_id.get()
        if request_id is not None:  # set while the handler runs: a response it streams itself
            self._decorate(request, response, request_id)

    def _decorate(self, request: Request, response: StreamResponse, request_id: str) -> None:
        """Headers every response carries, streamed or not: the request id, CORS."""
        response.headers["X-Request-Id"] = request_id
        origin = self._cors_origin(request)
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            if origin != "*":
                response.headers["Vary"] = "Origin"

    async def openai_errors(self, request: Request, handler: Handler) -> StreamResponse:
        """Every failure becomes an OpenAI-style JSON error; nothing escapes to crash a connection."""
        try:
            return await handler(request)
        except HTTPError as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            info = ErrorInfo(exc.status, f"{exc.reason}: {request.method} {request.raw_path}", kind)
            return _error_answer(request, info, exc.headers)
        except GatewayError as exc:
            info = describe(exc)
        except NetflyError as exc:
            info = describe(exc)
            _note(type(exc).__name__)
        except Exception as exc:
            logger.exception("unexpected error handling %s %s", request.method, request.raw_path)
            info = describe(exc)
            _note(type(exc).__name__)
        return _error_answer(request, info)

    async def require_token(self, request: Request, handler: Handler) -> StreamResponse:
        """With ``auth_token``: every request but the public pages needs it."""
        if self._token is not None and not pages.is_public(request):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                given = request.headers.get("x-api-key", "")  # the Anthropic SDK's header
            # compare_digest: the time taken does not tell how much of the token was right.
            # surrogateescape: header bytes that are not UTF-8 compare as the bytes they are (a 401, not a 500).
            given_bytes = given.strip().encode("utf-8", "surrogateescape")
            if not given or not hmac.compare_digest(given_bytes, self._token):
                raise GatewayError(401, "missing or invalid token: send it as 'Authorization: Bearer <token>' "
                                        "or 'x-api-key: <token>'",
                                   type="authentication_error", code="invalid_api_key")
        return await handler(request)

    # -- handlers ------------------------------------------------------------------------------

    async def health(self, request: Request) -> StreamResponse:
        body: dict[str, Any] = {"status": "ok", "version": __version__, "state": self.operations.store.status()}
        local = self._local_engine()
        if local is not None:
            body["local"] = local
        return json_response(body)

    def _local_engine(self) -> dict[str, Any] | None:
        """The state of the local model's engine (the default provider's, else any routed one's)."""
        for provider in (self.router.default, *self.router.providers.values()):
            state = engine_state(provider)
            if state is not None:
                return {"provider": provider.name(), **state.as_dict()}
        return None

    async def list_models(self, request: Request) -> StreamResponse:
        return json_response(model_list(await self.router.model_ids()))

    async def get_model(self, request: Request) -> StreamResponse:
        model_id = request.match_info["model"]
        try:
            route = self.router.resolve(model_id)
        except GatewayError as exc:
            raise GatewayError(
                404, exc.message, type="not_found_error", param="model", code="model_not_found"
            ) from None
        return json_response(model_object(route.public_id, route.provider.name()))

    async def chat_completions(self, request: Request) -> StreamResponse:
        chat = parse_chat_request(await self._read_body(request))
        route = self._route(chat.model)
        params = dict(chat.params)
        if chat.stream and (self.upstream_usage or chat.include_usage):
            # merged, not replaced: the client's other options (continuous_usage_stats...) still reach it
            params["stream_options"] = {**chat.stream_options, "include_usage": True}
        elif chat.stream and chat.stream_options:
            params["stream_options"] = chat.stream_options
        call = ChatCall(chat.model, chat.messages, chat.stream, params, {})
        encoder = ChatChunkEncoder(route.public_id, include_usage=chat.include_usage)
        return await self._answer(request, route, call, encoder, encoder.completion)

    async def responses(self, request: Request) -> StreamResponse:
        call = _with_usage(parse_responses_request(await self._read_body(request)))
        route = self._route(call.model)
        builder = ResponseBuilder(route.public_id, call.body)
        return await self._answer(request, route, call, ResponsesEncoder(builder),
                                  lambda result: builder.response(result, "completed"))

    async def messages(self, request: Request) -> StreamResponse:
        call = _with_usage(parse_messages_request(await self._read_body(request)))
        route = self._route(call.model)
        builder = MessageBuilder(route.public_id)
        return await self._answer(request, route, call, MessagesEncoder(builder), builder.message)

    async def count_tokens(self, request: Request) -> StreamResponse:
        raise GatewayError(501, "token counting is not available: the upstream providers of this gateway "
                                "cannot count tokens", type="api_error", code="not_implemented")

    async def embeddings(self, request: Request) -> StreamResponse:
        body = parse_embeddings_request(await self._read_body(request))
        route = self._route(body.get("model"))
        await self.operations.admit(request, route.public_id, [], None)
        timeout = self.call_options.get("timeout")
        return json_response(await relay_embeddings(route.provider, route.model, route.public_id, body, timeout))

    def _route(self, model: str | None) -> Route:
        route = self.router.resolve(model)
        _check_configured(route.provider)
        _note(f"model={route.public_id}")
        return route

    async def _answer(self, request: Request, route: Route, call: ChatCall, encoder: StreamEncoder,
                      whole: Callable[[ChatResult], dict[str, Any]]) -> StreamResponse:
        """Run ``call`` on the route's provider; stream it through ``encoder`` or answer ``whole``."""
        # Every client field goes in extra_body: none can be taken for a call option (or collide
        # with a parameter name such as ``cls``).
        max_tokens = call.params.get("max_completion_tokens", call.params.get("max_tokens"))
        await self.operations.admit(request, route.public_id, call.messages, max_tokens)
        # A client that wants the whole answer gets it from a whole upstream answer: one JSON body
        # to read instead of a stream to re-assemble.
        params = call.params if call.stream else {**call.params, "stream": False}
        stream = route.provider.stream(route.model, call.messages, extra_body=params, **self.call_options)
        pages.watch(request, self.status, stream)
        self.operations.watch(request, stream)
        try:
            if call.stream:
                return await self._relay(request, stream, encoder)
            return json_response(whole(await stream.collect()))
        finally:
            await stream.aclose()  # what ``async with stream`` does, without its two coroutines
            self.status.finished(stream)
            _note(summarize_stats(stream.stats))

    async def _relay(self, request: Request, stream: ChatStream, encoder: StreamEncoder) -> StreamResponse:
        channel = SSEChannel(request, encoder.start(), self.keepalive)
        try:
            await relay(channel, stream.reads(), encoder, lambda: stream.at_end)
        except ConnectionResetError:
            # The client went away; leaving closes the upstream stream (the caller's ``finally``).
            _note("client disconnected")
        except Exception as exc:  # NetflyError after the head was sent, or a bug: tell the client in-band
            if not channel.started:
                raise  # nothing sent yet: the error middleware answers with the error's own status
            if not isinstance(exc, NetflyError):
                logger.exception("unexpected error while relaying %s", request.raw_path)
            _note(f"{type(exc).__name__} after the stream started")
            try:
                await channel.close(encoder.error(describe(exc)))
            except ConnectionResetError:
                _note("client disconnected")
        return channel.response or Response(status=499)  # 499: the client left before the head

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)  # before reading: the client need not send it (Expect: 100-continue)
        try:
            return await request.read()
        except HTTPError as exc:
            if exc.status == 413:  # a chunked body past the limit (the server keeps no more of it)
                raise _too_large(limit) from None
            raise


def create_app(
    provider: type[Provider] | str | None = None,
    *,
    providers: Mapping[str, type[Provider]] | None = None,
    auth_token: str | None = None,
    max_body_bytes: int | None = None,
    max_retries: int | None = None,
    retry_delay: float | None = None,
    timeout: Timeout | float | None = None,
    proxy: str | None = None,
    upstream_usage: bool = True,
    cors_origins: Iterable[str] | None = None,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    operations: Operations | None = None,
    log_format: str = "text",
) -> App:
    """The gateway application.

    ``provider`` (a class or a registered name) serves bare model names and is reachable as
    ``"name/model"``; so are ``providers`` (default: none more). Nothing else is reachable: a
    built-in preset is exposed only when passed here. ``auth_token``, when set, is required as
    ``Authorization: Bearer <token>`` (or ``x-api-key: <token>``). ``max_retries``, ``retry_delay``,
    ``timeout`` and ``proxy`` apply to every upstream call (default: each provider's own).
    ``upstream_usage`` asks upstreams for token usage (``stream_options.include_usage``) so it can
    be reported. ``cors_origins`` (default: every origin, ``"*"``; empty: no CORS) are the browser
    origins allowed. ``keepalive``: seconds of upstream silence before a stream gets a comment line
    (None: never).

    ``operations`` (default: one without keys) brings a configuration file's models, keys and
    limits, and the metrics and request log; with a file, ``provider`` may be ``None`` (a flag's
    provider replaces the file's). ``log_format="json"`` logs requests as JSON lines instead of text.
    """
    operations = operations or Operations(log_format=log_format)
    server = operations.config.server if operations.config else None
    if server is not None:  # the file's settings, where no argument overrides them
        timeout = server.timeout if timeout is None else timeout
        cors_origins = server.cors_origins if cors_origins is None else cors_origins
    if max_body_bytes is None:
        max_body_bytes = server.max_body_bytes if server else DEFAULT_MAX_BODY_BYTES
    _check_access(auth_token, operations, max_body_bytes)
    gateway = Gateway(
        _router(provider, providers, operations),
        auth_token=auth_token,
        max_body_bytes=max_body_bytes,
        call_options=_call_options(max_retries, retry_delay, timeout, proxy),
        upstream_usage=upstream_usage,
        cors_origins=cors_origins,
        keepalive=_keepalive(keepalive),
        operations=operations,
    )
    # The token is fixed for the app's life (keys are not: a reload may bring the first ones).
    token = [gateway.require_token] if auth_token is not None else []
    app = App(
        middlewares=[gateway.log_requests, operations.observe, gateway.openai_errors, gateway.cors_preflight,
                     operations.authenticate, *token],
        client_max_size=max_body_bytes,
    )
    operations.install(app, gateway, request_id=_request_id.get,
                       metrics_route=server is None or (server.metrics and server.metrics_port is None))
    app.state[GATEWAY] = gateway
    app.error_shape = error_shape
    app.on_response_prepare.append(gateway.on_prepare)
    _add_api_routes(app, gateway)
    pages.install(app, gateway)
    app.on_cleanup.append(_close_connections)
    return app


GATEWAY = "netfly.gateway"  # app.state[GATEWAY]: the app's Gateway


def _check_access(auth_token: str | None, operations: Operations, max_body_bytes: object) -> None:
    # Checked at start-up: a bad setting must not turn into an error on every request.
    if auth_token is not None and operations.keys:
        raise ConfigurationError("auth_token and [keys] exclude each other: clients present one of the keys")
    if auth_token is not None and not auth_token.strip():
        raise ConfigurationError("auth_token must not be empty (pass None for no authentication)")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ConfigurationError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")


def _add_api_routes(app: App, gateway: Gateway) -> None:
    """One route per wire API; each handler is an adapter over the same stream of events."""
    app.add_get("/health", gateway.health)
    app.add_get("/v1/models", gateway.list_models)
    app.add_get("/v1/models/{model:.+}", gateway.get_model)
    app.add_post("/v1/chat/completions", gateway.chat_completions)
    app.add_post("/v1/responses", gateway.responses)
    app.add_post("/v1/messages", gateway.messages)
    app.add_post("/v1/messages/count_tokens", gateway.count_tokens)
    app.add_post("/v1/embeddings", gateway.embeddings)


def _router(
    provider: type[Provider] | str | None, providers: Mapping[str, type[Provider]] | None, operations: Operations
) -> ModelRouter:
    """The flags' provider when given, else the configuration file's models."""
    if provider is not None:
        router = ModelRouter(get_provider(provider) if isinstance(provider, str) else provider, providers)
        for exposed in router.providers.values():
            exposed.check_credentials()
        return router
    configured = operations.router()
    if configured is None:
        raise ConfigurationError("no provider: pass one, or a configuration with [providers]")
    return configured


def _error_answer(request: Request, info: ErrorInfo, extra: Mapping[str, str] | None = None) -> Response:
    headers = {**info.headers(), **extra} if extra else info.headers()
    return json_response(error_shape(request.path, info), status=info.status, headers=headers)


def error_shape(path: str, info: ErrorInfo) -> dict[str, Any]:
    """The error object the clients of ``path`` expect: Anthropic's on its Messages API, else OpenAI's."""
    return anthropic_error(info) if path.startswith("/v1/messages") else info.body()


def _call_options(
    max_retries: int | None, retry_delay: float | None, timeout: Timeout | float | None, proxy: str | None
) -> dict[str, Any]:
    # Checked here, at start-up: a bad setting must not turn into a 400 on every request.
    options: dict[str, Any] = {}
    if max_retries is not None:
        options["max_retries"] = _checks.whole("max_retries", max_retries, unit="attempts")
    if retry_delay is not None:
        options["retry_delay"] = _checks.seconds("retry_delay", retry_delay)
    if timeout is not None:
        options["timeout"] = Timeout.coerce(timeout)
    if proxy:
        Proxy.parse(proxy)
        options["proxy"] = proxy
    return options


def _keepalive(seconds: float | None) -> float | None:
    return _checks.optional_seconds("keepalive (0: never)", seconds) or None


def _with_usage(call: ChatCall) -> ChatCall:
    """``call`` asking a streamed upstream for usage: every API but chat always reports it."""
    if call.stream:
        call.params["stream_options"] = {"include_usage": True}
    return call


def _check_configured(provider: type[Provider]) -> None:
    # A provider that needs a key the gateway does not have is the operator's problem, not the client's.
    if provider.needs_auth and not provider.resolve_api_key():
        raise GatewayError(503, f"provider {provider.name()} is not configured on this gateway (no API key)",
                           type="server_error", code="provider_not_configured")


def _note(text: str) -> None:
    notes = _notes.get()
    if notes is not None:
        notes.append(text)


async def _close_connections(app: App) -> None:
    await aclose()


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
