"""What makes the gateway operable: keys and limits, usage, metrics, the request log, reloading.

:class:`Operations` is made by ``create_app`` and plugs in at a few points: two middlewares
(``observe`` just inside the access log, ``authenticate`` inside the error middleware), two calls
in the handlers (``admit`` once the public model is known, ``watch`` once the upstream stream exists), a
response-prepare hook (the ``x-ratelimit-*`` headers, also on streams) and its own routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._ids import unique_hex
from ..config import NetflyConfig, load_config
from ..errors import ConfigurationError
from ..routing import CircuitBreakers
from ..stream import ChatStream
from . import admin, pages
from .groups import ConfigRouter
from .keys import (
    Admission,
    ClientKey,
    KeyRing,
    LimitExceeded,
    MemoryStore,
    StateStore,
    admit,
    estimate_tokens,
    limits_described,
    read_limits,
)
from .metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from .requestlog import RequestLog
from .usage import TokenCount, UsageBook, count_tokens
from .web import App, HTTPError, Request, Response, StreamResponse

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["Operations", "RequestRecord"]

logger = logging.getLogger("netfly.gateway")
_SETTLING_PATIENCE = 2.0  # seconds that stopping waits for requests still settling before closing the store

Handler = Callable[[Request], Awaitable[StreamResponse]]
_OPEN_PATHS = ("/health", "/metrics")  # /metrics has its own optional token


@dataclass
class RequestRecord:
    """One request as the operator sees it; filled in along the way, settled at the end."""

    request_id: str
    route: str
    started: float = field(default_factory=time.monotonic)
    time: float = field(default_factory=time.time)
    key: ClientKey | None = None
    model: str | None = None
    admission: Admission | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    stream: ChatStream | None = None
    messages: Sequence[Any] = ()
    tokens: TokenCount | None = None
    status: int = 500
    _prompt_tokens: int | None = field(default=None, repr=False)

    def prompt_estimate(self) -> int:
        """The prompt's tokens, estimated once: needed only for a key's TPM or when the upstream sends no
        usage (a method, not a cached property: that one takes a lock each request)."""
        if self._prompt_tokens is None:
            self._prompt_tokens = estimate_tokens(self.messages, None)
        return self._prompt_tokens


_RECORD = "netfly.record"  # request.state[_RECORD]: the request's RequestRecord


class Operations:
    """Keys, limits, usage, metrics and the request log of one gateway app."""

    def __init__(
        self,
        config: NetflyConfig | None = None,
        *,
        path: str | Path | None = None,
        store: StateStore | None = None,
        log_format: str = "text",
        log_content: bool = False,
        metrics_token: str | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.store = store or MemoryStore()
        self.keys = KeyRing.from_config(config.keys) if config else KeyRing({}, {})
        self.usage = UsageBook(self.store)
        self.metrics = GatewayMetrics(self._breakers, self.store.status)
        self.log = RequestLog(log_format, log_content)
        self.metrics_token = metrics_token or _metrics_token(config)
        self.gateway: Gateway | None = None
        self._request_id: Callable[[], str | None] = lambda: None
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Operations:
        return cls(load_config(path), path=path, **options)

    def router(self) -> ConfigRouter | None:
        """The router of the file's providers and models; ``None`` when it declares no provider."""
        if self.config is None or not self.config.providers:
            return None
        return self._shared(ConfigRouter(self.config))

    def _shared(self, router: ConfigRouter) -> ConfigRouter:
        """With a shared store, the router's circuit breakers are shared too."""
        bench = getattr(self.store, "bench", None)
        if bench is not None:
            for model, book in router.breakers().items():
                book.share(bench, model)
        return router

    # -- wiring --------------------------------------------------------------------------------

    def install(
        self, app: App, gateway: Gateway, *, request_id: Callable[[], str | None],
        metrics_route: bool = True,
    ) -> None:
        """Add the routes and hooks; ``request_id`` gives the id of the request being handled."""
        self.gateway = gateway
        self._request_id = request_id
        if metrics_route:
            app.add_get("/metrics", self.serve_metrics)
        app.add_get("/admin/usage", admin.usage(self))
        app.add_post("/admin/reload", admin.reload(self))
        app.on_response_prepare.append(self._add_headers)
        app.on_startup.append(self._open_store)
        app.on_cleanup.append(self._close_store)
        if self.path is not None:
            app.on_startup.append(self._reload_on_sighup)
            app.on_cleanup.append(self._stop_sighup)

    async def observe(self, request: Request, handler: Handler) -> StreamResponse:
        """Just inside the access log (which sets the request id): the request's record, then its
        metrics, usage and JSON log line once it ends."""
        record = RequestRecord(request_id=self._request_id() or unique_hex(), route=request.route or "unmatched")
        request.state[_RECORD] = record
        try:
            response = await handler(request)
            record.status = response.status
            return response
        except HTTPError as exc:
            record.status = exc.status
            raise
        except asyncio.CancelledError:
            record.status = 499  # the client went away
            raise
        finally:
            if record.key is None:
                self._settle_now(record)  # no usage or limits to store: nothing to wait for, no task
            elif not self.store.suspends:
                await self._settle(record)  # never suspends, so no cancellation can cut it: no task
            else:
                await self._settle_shielded(record)

    async def _settle_shielded(self, record: RequestRecord) -> None:
        # A client that closes its connection as soon as it has the answer cancels this handler
        # (the server cancels a handler whose client left), often right here: the settling runs on regardless,
        # or the stream slot, usage, metrics and log line of the request would be lost.
        settling = asyncio.ensure_future(self._settle(record))
        self._tasks.add(settling)
        settling.add_done_callback(self._tasks.discard)
        await asyncio.shield(settling)

    async def authenticate(self, request: Request, handler: Handler) -> StreamResponse:
        """With ``[keys]``: every request but /health, /metrics and the pages needs one of them."""
        if not self.keys or request.path in _OPEN_PATHS or pages.is_public(request):
            return await handler(request)
        record: RequestRecord = request.state[_RECORD]
        record.key = self.keys.identify(request.headers)
        try:
            response = await handler(request)
        except Exception:
            await self._read_limits(record)  # the error's answer carries them too
            raise
        if not limits_described(record.key, record.rate_headers):  # admitted: described already
            await self._read_limits(record)
        return response

    async def _read_limits(self, record: RequestRecord) -> None:
        """The ``x-ratelimit-*`` headers the admission did not write (the request was answered or refused
        without one): read, not taken. Read here rather than before the handler, since an admitted
        request's own are newer and would replace them."""
        key = record.key
        if key is None or limits_described(key, record.rate_headers):
            return
        headers = await read_limits(self.store, key)
        headers.update(record.rate_headers)  # what an admission took is newer
        record.rate_headers = headers

    async def _open_store(self, app: App) -> None:
        await self.store.open()

    async def _close_store(self, app: App) -> None:
        # Requests whose handlers ended may still be settling (usage, slots): closing the store under
        # them would fail their calls. Each state call is cut at its timeout, so this wait is short.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_SETTLING_PATIENCE)
        await self.store.close()

    # -- calls from the model handlers ---------------------------------------------------------

    async def admit(self, request: Request, model: str, messages: Sequence[Any], max_tokens: Any) -> None:
        """The request's public model is known: check its key's limits and take from them."""
        record: RequestRecord = request.state[_RECORD]
        record.model, record.messages = model, messages
        if record.key is None:
            return
        # The admission writes its x-ratelimit-* headers straight into the response's.
        record.admission = admission = Admission(record.key, self.store, headers=record.rate_headers)
        # Only a count can be a cap (``type``: a bool is no count): a negative one, charged, would
        # leave the key in debt for ages.
        cap = max_tokens if type(max_tokens) is int and max_tokens > 0 else 0
        try:
            await admit(self.store, record.key, model, record.prompt_estimate() + cap, admission)
        except LimitExceeded as exc:
            self.metrics.rate_limited.labels(record.key.name, exc.limit).inc()
            raise

    def watch(self, request: Request, stream: ChatStream) -> None:
        """The upstream stream exists: its stats and result are read when the request ends."""
        record: RequestRecord = request.state[_RECORD]
        record.stream = stream
        self.metrics.in_flight.labels(self.metrics.model_label(record.model or "")).inc()

    # -- the end of a request ------------------------------------------------------------------

    async def _settle(self, record: RequestRecord) -> None:
        label = self.metrics.model_label(record.model or "")
        self._count_stream(record, label)
        if record.key is not None and record.tokens is not None:
            await self.usage.record(record.key.name, record.model or "", record.tokens)
        if record.admission is not None:
            await record.admission.finish(record.tokens.total if record.tokens else 0)
        self._count_request(record, label)

    def _settle_now(self, record: RequestRecord) -> None:
        """:meth:`_settle` for a request without a key: the same figures, nothing stored."""
        label = self.metrics.model_label(record.model or "")
        self._count_stream(record, label)
        self._count_request(record, label)

    def _count_stream(self, record: RequestRecord, label: str) -> None:
        """The answer's tokens and metrics (``label``: its model's), once it ended."""
        stream = record.stream
        if stream is None:
            return
        record.tokens = tokens = count_tokens(stream, record.prompt_estimate)
        self.metrics.in_flight.labels(label).dec()
        self.metrics.observe_stream(label, stream.stats)
        self.metrics.tokens.labels(label, "prompt").observe(tokens.prompt)
        self.metrics.tokens.labels(label, "completion").observe(tokens.completion)

    def _count_request(self, record: RequestRecord, label: str) -> None:
        """The request's metrics (``label``: its model's) and JSON log line."""
        key_name = record.key.name if record.key else ""
        self.metrics.requests.labels(record.route, label, key_name, str(record.status)).inc()
        self.metrics.duration.labels(record.route, label).observe(time.monotonic() - record.started)
        self.log.write(record)

    def _add_headers(self, request: Request, response: StreamResponse) -> None:
        record: RequestRecord | None = request.state.get(_RECORD)
        if record is None:
            return
        response.headers.update(record.rate_headers)

    # -- metrics -------------------------------------------------------------------------------

    async def serve_metrics(self, request: Request) -> StreamResponse:
        if self.metrics_token is not None:
            admin.require_bearer(request, self.metrics_token)
        return Response(self.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    def metrics_app(self) -> App:
        """``/metrics`` alone, for a separate bind (``[server] metrics_port``)."""
        app = App()
        app.add_get("/metrics", self.serve_metrics)
        return app

    def _breakers(self) -> Mapping[str, CircuitBreakers]:
        router = self.gateway.router if self.gateway is not None else None
        return router.breakers() if isinstance(router, ConfigRouter) else {}

    # -- reloading -----------------------------------------------------------------------------

    async def reload(self) -> NetflyConfig:
        """Read the file again and switch to it; answers in flight keep the providers they started
        with. An invalid file changes nothing and raises :class:`ConfigurationError`."""
        if self.path is None:
            raise ConfigurationError("this gateway was not started from a configuration file")
        async with self._reloading:
            config = load_config(self.path)
            router = self._shared(ConfigRouter(config)) if config.providers else None
            keys = KeyRing.from_config(config.keys)
            if self.gateway is not None and router is not None:
                self.gateway.router = router
            self.config, self.keys = config, keys
        logger.info("configuration reloaded from %s: %d model(s), %d key(s)",
                    self.path, len(config.models), len(config.keys))
        return config

    async def _reload_on_sighup(self, app: App) -> None:
        loop = asyncio.get_running_loop()

        def reload() -> None:
            task = loop.create_task(self._reload_logged())
            self._tasks.add(task)  # kept until done: the loop holds tasks only weakly
            task.add_done_callback(self._tasks.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):  # not main thread
            loop.add_signal_handler(signal.SIGHUP, reload)

    async def _stop_sighup(self, app: App) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigurationError as exc:
            logger.error("configuration not reloaded, the old one stays: %s", " | ".join(str(exc).splitlines()))



def _metrics_token(config: NetflyConfig | None) -> str | None:
    variable = config.server.metrics_token_env if config else None
    if variable is None:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ConfigurationError(f"server.metrics_token_env: environment variable {variable} is not set")
    return token
