"""Running the gateway: bind, serve until told to stop, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

logger = logging.getLogger("netfly.gateway")


async def start(
    app: web.Application, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 10.0
) -> web.AppRunner:
    """Start serving ``app`` on ``host:port``; stop it with ``await runner.cleanup()``.

    ``handler_cancellation=True``: a client that disconnects cancels its handler, and so the
    upstream request, at once. aiohttp's own access log is off: the gateway logs each request.
    On cleanup, answers in flight get ``shutdown_timeout`` seconds to finish.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
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
    app: web.Application, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 10.0
) -> None:
    """Serve ``app`` until SIGTERM, SIGINT or cancellation, then close every connection."""
    runner = await start(app, host, port, shutdown_timeout=shutdown_timeout)
    logger.info("gateway listening on http://%s:%d", _url_host(host), bound_port(runner))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGTERM,):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows, non-main thread
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        logger.info("gateway stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
