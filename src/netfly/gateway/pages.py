"""The pages for people: a chat playground at ``/`` and live state at ``/status``.

Plain files shipped as package data (``static/``): no build step, nothing fetched from the network,
so they work offline. The pages load without a token; the API calls they make carry the one the
person typed (kept in the browser's session storage). ``GET /v1/netfly/status`` is the JSON the
status page reads; ``x-netfly-provider`` and ``x-netfly-attempts`` on a streamed answer tell the
chat page who served it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING

from ..__about__ import __version__
from ..stream import ChatStream
from .status import StatusBook
from .web import App, HTTPError, Request, Response, StreamResponse, json_response

if TYPE_CHECKING:
    from .app import Gateway

Handler = Callable[[Request], Awaitable[StreamResponse]]
STATIC = resources.files("netfly.gateway") / "static"
PAGE_ROUTES = {"/": "chat.html", "/status": "status.html"}
STATIC_PREFIX = "/static/"
CONTENT_TYPES = {
    ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain",
}
# The pages run only their own scripts, talk only to this origin, and cannot be framed elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(request: Request) -> bool:
    """A page or one of its assets: loaded without a token (they hold no data)."""
    path = request.path
    return request.method in ("GET", "HEAD") and (path in PAGE_ROUTES or path.startswith(STATIC_PREFIX))


def install(app: App, gateway: Gateway) -> None:
    """Add the pages, their assets and the status endpoint to the gateway's ``app``."""
    for path, name in PAGE_ROUTES.items():
        app.add_get(path, _file_handler(name))
    app.add_get(STATIC_PREFIX + "{name:[A-Za-z0-9._/-]+}", _static)
    app.add_get("/v1/netfly/status", _status_handler(gateway))
    app.on_response_prepare.append(_served_by_headers)


def _file_handler(name: str) -> Handler:
    async def page(request: Request) -> StreamResponse:
        return _asset(name)
    return page


async def _static(request: Request) -> StreamResponse:
    name = request.match_info["name"]
    if ".." in name.split("/"):
        raise HTTPError(404)
    return _asset(name)


def _asset(name: str) -> Response:
    resource = STATIC.joinpath(*name.split("/"))
    suffix = "." + name.rpartition(".")[2]
    if suffix not in CONTENT_TYPES or not resource.is_file():
        raise HTTPError(404)
    return Response(resource.read_bytes(), content_type=f"{CONTENT_TYPES[suffix]}; charset=utf-8",
                    headers=PAGE_HEADERS)


def _status_handler(gateway: Gateway) -> Handler:
    async def status(request: Request) -> StreamResponse:
        providers = dict.fromkeys((gateway.router.default, *gateway.router.providers.values()))
        return json_response(gateway.status.snapshot(providers, __version__),
                                 headers={"Cache-Control": "no-store"})
    return status


# -- who served a streamed answer ------------------------------------------------------------------

_REQUEST_STREAM = "netfly.pages.stream"  # request.state[_REQUEST_STREAM]: the request's upstream ChatStream


def watch(request: Request, book: StatusBook, stream: ChatStream) -> None:
    """The request's upstream stream exists: count it, and let its head name the provider."""
    book.started(stream)
    request.state[_REQUEST_STREAM] = stream


def _served_by_headers(request: Request, response: StreamResponse) -> None:
    stream: ChatStream | None = request.state.get(_REQUEST_STREAM)
    if stream is not None:  # the head goes out with the first output: the provider is known by then
        # Every attempt before the one now answering failed; a router records the winner's at its end.
        failed = sum(1 for attempt in stream.stats.attempts if attempt.error is not None)
        response.headers["x-netfly-provider"] = stream.stats.provider
        response.headers["x-netfly-attempts"] = str(failed + 1)
