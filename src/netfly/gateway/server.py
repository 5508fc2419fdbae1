"""Running the gateway: bind, guard the connections, serve until told to stop, shut down cleanly.

On SIGTERM (or ``runner.cleanup()``) the gateway stops accepting connections, closes idle ones and
gives the requests in flight ``shutdown_timeout`` seconds (the grace) to finish. A request still
running after the grace is cut on purpose: a stream gets one last ``data:`` event with an error of
type ``server_shutdown`` (and no ``[DONE]``), a request whose answer has not started gets a 503 of
that type, and the access log says ``server shutdown`` rather than "client disconnected".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import _json
from .connections import ConnectionGuard, ConnectionLimits, Handler
from .errors import ErrorInfo
from .format import sse_event
from .logfmt import mark_cut_by_shutdown

logger = logging.getLogger("netfly.gateway")

DEFAULT_SHUTDOWN_GRACE = 10.0
# After the grace, cut requests only have to unwind their cancellation: this bounds that.
_AFTER_CUT_TIMEOUT = 2.0


async def start(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_GRACE,
    limits: ConnectionLimits | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Start serving ``app`` on ``host:port``; stop it with ``await runner.cleanup()``.

    ``handler_cancellation=True``: a client that disconnects cancels its handler, and so the
    upstream request, at once. aiohttp's own access log is off: the gateway logs each request.
    ``limits`` (default: :class:`ConnectionLimits`'s) bounds slow and idle clients and the number of
    connections. On cleanup, requests in flight get ``shutdown_timeout`` seconds to finish (see
    the module's doc). ``app`` must not have been started before (its hooks are added here).
    ``reuse_port``: several processes may listen on the port (``SO_REUSEPORT``; the kernel spreads
    the connections over them).
    """
    limits = limits or ConnectionLimits()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=_AFTER_CUT_TIMEOUT,
                           keepalive_timeout=limits.keepalive_timeout)
    guard = ConnectionGuard(limits, lambda: _protocol(runner))
    shutdown = _GracefulShutdown(shutdown_timeout)
    app.middlewares.insert(0, guard.middleware)
    app.middlewares.insert(0, shutdown.middleware)
    app.on_response_prepare.append(shutdown.on_response_prepare)
    app.on_shutdown.append(shutdown.on_shutdown)
    await runner.setup()
    try:
        site = _GuardedSite(runner, host, port, guard, reuse_port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner listens on (useful with ``port=0``)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the gateway is not listening on a TCP port")


async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_GRACE,
    limits: ConnectionLimits | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` until SIGTERM, SIGINT or cancellation, then close every connection."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before listening: whoever sees the port answer (or the "listening" line) may send SIGTERM at
    # once, and it must stop the gateway gracefully, not kill it with the default action.
    installed = _on_signals(loop, (signal.SIGTERM,), stop.set)
    try:
        runner = await start(app, host, port, shutdown_timeout=shutdown_timeout, limits=limits,
                             reuse_port=reuse_port)
    except BaseException:
        _off_signals(loop, installed)
        raise
    logger.info("gateway listening on http://%s:%d", _url_host(host), bound_port(runner))
    try:
        await stop.wait()
    finally:
        _off_signals(loop, installed)  # a second SIGTERM during the grace ends the process at once
        await runner.cleanup()
        logger.info("gateway stopped")


def _on_signals(loop: asyncio.AbstractEventLoop, signals: tuple[signal.Signals, ...],
                callback: Callable[[], None]) -> list[signal.Signals]:
    installed = []
    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows, non-main thread
            loop.add_signal_handler(signum, callback)
            installed.append(signum)
    return installed


def _off_signals(loop: asyncio.AbstractEventLoop, installed: list[signal.Signals]) -> None:
    for signum in installed:
        loop.remove_signal_handler(signum)


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard,
                 reuse_port: bool = False) -> None:
        super().__init__(runner)
        self._reuse_port = reuse_port
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{_url_host(self._host)}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard, self._host, self._port, reuse_port=self._reuse_port)


def _protocol(runner: web.AppRunner) -> asyncio.Protocol:
    server = runner.server
    assert server is not None, "connections are accepted only once the runner is set up"
    return server()


class _GracefulShutdown:
    """Tracks the requests being handled, and at shutdown waits for them, then cuts the rest."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        # Keyed by the handler's task (requests are not hashable): its request and prepared response.
        self._running: dict[asyncio.Task[Any], web.Request] = {}
        self._responses: dict[asyncio.Task[Any], web.StreamResponse] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = request
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            del self._running[task]
            self._responses.pop(task, None)
            if not self._running:
                self._idle.set()

    async def on_response_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        task = asyncio.current_task()
        if task in self._running:
            self._responses[task] = response

    async def on_shutdown(self, app: web.Application) -> None:
        if not self._running:
            return
        logger.info("shutting down: %d request(s) in flight get %g s to finish", len(self._running), self.grace)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.grace)
        if self._running:
            logger.warning("shutdown grace of %g s over: cutting %d request(s) still running",
                           self.grace, len(self._running))
            await asyncio.gather(*(self._cut(task, request) for task, request in list(self._running.items())))

    async def _cut(self, task: asyncio.Task[Any], request: web.Request) -> None:
        info = ErrorInfo(503, f"the gateway is shutting down and cut this request after the {self.grace:g} s grace",
                         "server_shutdown", code="server_shutdown")
        response = self._responses.get(task)
        mark_cut_by_shutdown(task, response.status if response is not None else info.status)
        # Cancel first: the handler then writes nothing more (no [DONE]); the error below is written
        # before it unwinds and closes the connection.
        task.cancel()
        with contextlib.suppress(ConnectionError, RuntimeError):
            if response is None:
                answer = web.json_response(info.body(), status=info.status, dumps=_dumps)
                await answer.prepare(request)
                await answer.write_eof()
            elif response.content_type == "text/event-stream":
                await response.write_eof(sse_event(info.body()))


def _dumps(obj: object) -> str:
    return _json.dumps(obj).decode()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

