"""Running the gateway: bind, guard the connections, serve until told to stop, shut down cleanly.

On SIGTERM or SIGINT (or ``runner.cleanup()``) the gateway stops accepting connections, closes idle
ones and gives the requests in flight ``shutdown_timeout`` seconds (the grace) to finish. A request still
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
from typing import Any, cast

from .connections import ConnectionLimits, raw_response
from .errors import ErrorInfo
from .format import sse_event
from .http1 import Connection
from .logfmt import mark_cut_by_shutdown
from .web import App, json_response

logger = logging.getLogger("netfly.gateway")

DEFAULT_SHUTDOWN_GRACE = 10.0
# After the grace, cut requests only have to unwind their cancellation: this bounds that.
_AFTER_CUT_TIMEOUT = 2.0
_BACKLOG = 1024  # connections the kernel queues before accept: a burst of clients is not dropped


async def start(
    app: App,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_GRACE,
    limits: ConnectionLimits | None = None,
    reuse_port: bool = False,
) -> Runner:
    """Start serving ``app`` on ``host:port``; stop it with ``await runner.cleanup()``.

    A client that disconnects cancels its handler, and so the upstream request, at once. ``limits``
    (default: :class:`ConnectionLimits`'s) bounds slow and idle clients and the number of
    connections. On cleanup, requests in flight get ``shutdown_timeout`` seconds to finish (see
    the module's doc). ``reuse_port``: several processes may listen on the port (``SO_REUSEPORT``;
    the kernel spreads the connections over them).
    """
    app.freeze()
    listener = Listener(app, limits or ConnectionLimits())
    await app.startup()
    try:
        server = await listener.loop.create_server(listener, host, port, reuse_port=reuse_port, backlog=_BACKLOG)
    except BaseException:
        await app.shutdown()
        await app.cleanup()
        raise
    return Runner(app, server, listener, _GracefulShutdown(shutdown_timeout))


class Runner:
    """A started server: its addresses, and :meth:`cleanup` to stop it."""

    def __init__(self, app: App, server: asyncio.Server, listener: Listener, shutdown: _GracefulShutdown) -> None:
        self.app = app
        self.server = server
        self.listener = listener
        self._shutdown = shutdown
        self._stopped = False

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for sock in self.server.sockets]

    async def cleanup(self) -> None:
        """Stop accepting, close idle connections, give requests in flight the grace, then cut them."""
        if self._stopped:
            return
        self._stopped = True
        self.server.close()
        self.listener.close_idle()
        await self.app.shutdown()
        await self._shutdown.run(self.listener)
        await self.listener.wait_idle(_AFTER_CUT_TIMEOUT)
        self.listener.abort_all()
        await asyncio.sleep(0)  # the transports' connection_lost, before the app's cleanup
        await self.app.cleanup()


def bound_port(runner: Runner) -> int:
    """The port the runner listens on (useful with ``port=0``)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the gateway is not listening on a TCP port")


async def serve(
    app: App,
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
    # once, and it must stop the gateway gracefully, not kill it with the default action. SIGINT too:
    # Python 3.10's asyncio.run leaves Ctrl-C to KeyboardInterrupt, which uvloop can miss for good.
    installed = _on_signals(loop, (signal.SIGTERM, signal.SIGINT), stop.set)
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


class Listener:
    """The protocol factory of a listening socket: the connection cap, and the connections for shutdown."""

    def __init__(self, app: App, limits: ConnectionLimits) -> None:
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.count = 0  # counted here: several connections can be accepted in one loop turn
        self.closing = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._warned_full = False

    def __call__(self) -> asyncio.Protocol:
        if self.count >= self.limits.max_connections:
            if not self._warned_full:
                self._warned_full = True
                logger.warning("%d connections open (max_connections): refusing new ones with 503 until one closes",
                               self.count)
            return _Refused()
        self.count += 1
        return Connection(self)

    def closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.count -= 1
        if self.count < self.limits.max_connections:
            self._warned_full = False

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def running(self) -> list[Connection]:
        return [c for c in self.connections if c.task is not None]

    async def wait_idle(self, timeout: float) -> None:
        """Until no request is being handled, or ``timeout`` seconds."""
        if self.in_flight == 0:
            return
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def close_idle(self) -> None:
        """Stop: connections without a request in flight close now, the others after their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()

    def abort_all(self) -> None:
        """Drop every connection but those already closing: they still send their last bytes (a cut
        stream's error event) as the client reads them."""
        for connection in list(self.connections):
            if connection.transport is not None and not connection.transport.is_closing():
                connection.close(abort=True)


class _Refused(asyncio.Protocol):
    """A connection over the cap: told 503 at once, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        info = ErrorInfo(503, "too many open connections to this gateway; retry shortly", "server_error",
                         code="too_many_connections", retry_after=1)
        transport = cast(asyncio.Transport, transport)
        transport.write(raw_response(info))
        transport.close()


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


class _GracefulShutdown:
    """At shutdown: waits for the requests being handled, then cuts the rest."""

    def __init__(self, grace: float) -> None:
        self.grace = grace

    async def run(self, listener: Listener) -> None:
        if not listener.in_flight:
            return
        logger.info("shutting down: %d request(s) in flight get %g s to finish", listener.in_flight, self.grace)
        await listener.wait_idle(self.grace)
        running = listener.running()
        if running:
            logger.warning("shutdown grace of %g s over: cutting %d request(s) still running",
                           self.grace, len(running))
            for connection in running:
                self._cut(connection)

    def _cut(self, connection: Connection) -> None:
        task, request, response = connection.task, connection.current, connection.response
        assert task is not None and request is not None
        info = ErrorInfo(503, f"the gateway is shutting down and cut this request after the {self.grace:g} s grace",
                         "server_shutdown", code="server_shutdown")
        mark_cut_by_shutdown(task, response.status if response is not None else info.status)
        # Cancel first: the handler then writes nothing more (no [DONE]); the error below is written
        # before it unwinds and closes the connection.
        task.cancel()
        with contextlib.suppress(ConnectionError):
            if response is None:
                connection.write_whole(request, json_response(info.body(), status=info.status))
            elif response.content_type == "text/event-stream":
                response.end(sse_event(info.body()))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

