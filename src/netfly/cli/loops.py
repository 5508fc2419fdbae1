"""The event loop that runs ``netfly serve``: uvloop when it is installed, else asyncio's own."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import ConfigurationError

LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


def chosen_loop(name: str) -> str:
    """``auto`` → ``uvloop`` when importable, else ``asyncio``; an explicit choice must be available."""
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    if name == "auto":
        return "uvloop" if has_uvloop else "asyncio"
    if name == "uvloop" and not has_uvloop:
        raise ConfigurationError("--loop uvloop: uvloop is not installed (pip install uvloop), or use --loop asyncio",
                                 param="loop")
    return name


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` to completion on a new loop of the chosen kind (see :func:`chosen_loop`)."""
    if loop == "uvloop":
        # The gateway's work is mostly loop callbacks: libuv's loop spends ~10 % less CPU per request.
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
