"""Running netfly's async API from synchronous code.

A single daemon thread runs one event loop for every synchronous call, so pooled connections are
reused across calls and the sync API also works where a loop is already running (e.g. Jupyter).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="netfly-sync", daemon=True)
            thread.start()
            _loop = loop
            atexit.register(_shutdown, loop, thread)
        return _loop


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    from .transport import aclose

    if loop.is_closed():
        return
    try:
        asyncio.run_coroutine_threadsafe(aclose(), loop).result(timeout=5)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not loop.is_running():
        loop.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


def iterate(make_iterator: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Drive the async iterator returned by ``make_iterator()`` from synchronous code.

    Closing the sync generator early (``break``) closes the async one, and so its connection.
    """
    loop = _background_loop()

    async def start() -> AsyncIterator[T]:
        return make_iterator()

    async def step() -> T:
        return await iterator.__anext__()

    iterator = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(step(), loop).result()
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            asyncio.run_coroutine_threadsafe(aclose(), loop).result()
