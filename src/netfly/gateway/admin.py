"""``/admin/*``: usage and reloading, for keys with ``admin = true``."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .errors import GatewayError
from .keys import presented_key
from .web import Request, StreamResponse, json_response

if TYPE_CHECKING:
    from .operations import Operations

Handler = Callable[[Request], Awaitable[StreamResponse]]


def usage(operations: Operations) -> Handler:
    """``GET /admin/usage``: requests and tokens per key and model since the gateway started."""

    async def handler(request: Request) -> StreamResponse:
        require_admin(operations, request)
        return json_response({"object": "list", "data": await operations.usage.report()})

    return handler


def reload(operations: Operations) -> Handler:
    """``POST /admin/reload``: read the configuration file again; 400 with the problems when invalid
    (the running configuration stays)."""

    async def handler(request: Request) -> StreamResponse:
        require_admin(operations, request)
        try:
            config = await operations.reload()
        except ConfigurationError as exc:
            raise GatewayError(400, f"configuration not reloaded, the old one stays: {exc}",
                               code="invalid_configuration") from None
        return json_response({"status": "reloaded", "models": sorted(config.models), "keys": sorted(config.keys)})

    return handler


def require_admin(operations: Operations, request: Request) -> None:
    key = operations.keys.identify(request.headers) if operations.keys else None
    if key is None or not key.admin:
        raise GatewayError(403, "this needs a key with admin = true in the configuration",
                           type="permission_error", code="admin_key_required")


def require_bearer(request: Request, token: str) -> None:
    given = presented_key(request.headers).encode("utf-8", "surrogateescape")
    if not given or not hmac.compare_digest(given, token.encode()):
        raise GatewayError(401, "missing or invalid bearer token in the Authorization header",
                           type="authentication_error", code="invalid_api_key")
