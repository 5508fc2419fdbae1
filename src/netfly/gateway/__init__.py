"""The gateway: an OpenAI-compatible HTTP API (``netfly serve``) over netfly's providers.

    from netfly.gateway import create_app, serve
    asyncio.run(serve(create_app("OpenAICompatible"), "127.0.0.1", 8000))
"""

from __future__ import annotations

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .errors import GatewayError
from .server import bound_port, serve, start

__all__ = ["DEFAULT_MAX_BODY_BYTES", "GatewayError", "bound_port", "create_app", "serve", "start"]
