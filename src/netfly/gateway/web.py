"""netfly's HTTP server, the side its handlers see: requests, responses, routes, middlewares, hooks.

The gateway's handlers are ``async def handler(request) -> StreamResponse``; a middleware is
``async def middleware(request, handler) -> StreamResponse`` (outermost first; the second
parameter is called ``handler``), composed once per
route when the server starts, not per request. Response-prepare hooks are plain functions that may
add headers before the head goes out (for a streamed answer: with its first bytes). Start-up,
shutdown and cleanup hooks are ``async def hook(app)``. :mod:`.http1` is the protocol that parses
the bytes, runs one handler task per request and writes the answers.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from .. import _json

if TYPE_CHECKING:
    from .errors import ErrorInfo
    from .http1 import Connection

__all__ = [
    "App", "HTTPError", "Headers", "Request", "Response", "StreamResponse", "json_response",
]

Handler = Callable[["Request"], Awaitable["StreamResponse"]]
Middleware = Callable[["Request", Handler], Awaitable["StreamResponse"]]
PrepareHook = Callable[["Request", "StreamResponse"], None]
AppHook = Callable[["App"], Awaitable[None]]
ErrorShape = Callable[[str, "ErrorInfo"], dict[str, Any]]  # (request path, error) -> the JSON error object

REASONS = {status.value: status.phrase for status in HTTPStatus}
JSON_TYPE = "application/json; charset=utf-8"
DEFAULT_MAX_BODY = 1024 * 1024  # aiohttp's client_max_size


class HTTPError(Exception):
    """A request the server cannot route or take: its status and reason phrase."""

    def __init__(self, status: int, reason: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason or REASONS.get(status, "Error")
        self.headers = dict(headers or {})  # e.g. a 405's Allow
        super().__init__(f"{self.status} {self.reason}")


class Headers(Mapping[str, str]):
    """A request's headers: read-only, names case-insensitive; a repeated name keeps its first value."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields  # lower-case names

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"<Headers {sorted(self._fields)}>"  # names only: values carry secrets


class Request:
    """One request: its head at once, its body on :meth:`read` (bounded in bytes and time)."""

    __slots__ = (
        "method", "path", "raw_path", "query_string", "headers", "http10", "keep_alive", "content_length",
        "match_info", "route", "state", "connection", "body_limit", "complete", "error", "discarding",
        "expect_continue", "_body", "_size", "_waiter",
    )

    def __init__(self, connection: Connection, method: str, target: str, headers: Headers, *, http10: bool,
                 keep_alive: bool, content_length: int | None, body_limit: int) -> None:
        self.connection = connection
        self.method = method
        self.raw_path, _, self.query_string = target.partition("?")
        self.path = _decoded(self.raw_path)
        self.headers = headers
        self.http10, self.keep_alive = http10, keep_alive
        self.content_length = content_length
        self.match_info: dict[str, str] = {}
        self.route: str | None = None  # the matched route's template, e.g. "/v1/models/{model}"
        self.state: dict[str, Any] = {}  # what middlewares and handlers note about the request
        self.body_limit = body_limit
        self.complete = False  # the whole body has arrived
        self.error: BaseException | None = None  # the body is too large or late
        self.discarding = False  # body bytes are counted, not kept
        self.expect_continue = False
        self._body = bytearray()  # one buffer: a body of a million 1-byte chunks is not a million objects
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        if content_length is not None and content_length > body_limit:
            self.fail(HTTPError(413))

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    @property
    def peer(self) -> str:
        return self.connection.peer

    async def read(self) -> bytes:
        """The whole body; raises :class:`HTTPError` 413 past the body limit, or the body timeout's error."""
        while not self.complete and self.error is None:
            self.connection.want_body(self)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.error is not None:
            raise self.error
        return bytes(self._body)

    # -- from the connection --

    def feed(self, data: bytes) -> None:
        self._size += len(data)
        if self.discarding:
            return
        if self._size > self.body_limit:
            self.fail(HTTPError(413))
        else:
            self._body += data

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """The body will not arrive (late, or the connection closed): a reader gets ``error``."""
        if self.error is None:
            self.error = error
        self.discarding = True
        self._body.clear()
        self._wake()

    @property
    def received(self) -> int:
        return self._size

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class StreamResponse:
    """An answer written as it is produced; the head goes out with the first body bytes, in one write."""

    def __init__(self, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.prepared = False
        self.finished = False
        self._connection: Connection | None = None
        self._head = b""  # not yet written
        self._chunked = False

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip()

    async def prepare(self, request: Request) -> None:
        """Run the prepare hooks and fix the head; nothing is written yet."""
        if self.prepared:
            return
        connection = self._connection = request.connection
        self._head, self._chunked = connection.stream_head(request, self)

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the client reads slower than the answer is produced."""
        if not data:
            return
        connection = self._connection
        assert connection is not None, "prepare() first"
        connection.send(self._frame(data))
        if connection.paused:
            await connection.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """Send ``data`` and end the body, in one write (with the head, if it has not gone out)."""
        self.end(data)

    def end(self, data: bytes = b"") -> None:
        if self.finished:
            return
        connection = self._connection
        assert connection is not None, "prepare() first"
        self.finished = True
        framed = self._frame(data) if data else self._head
        self._head = b""
        connection.send(framed + b"0\r\n\r\n" if self._chunked else framed)

    def _frame(self, data: bytes) -> bytes:
        head, self._head = self._head, b""
        if self._chunked:
            return b"%s%x\r\n%s\r\n" % (head, len(data), data)
        return head + data if head else data


class Response(StreamResponse):
    """A whole answer: head and body in one write."""

    def __init__(self, body: bytes = b"", *, status: int = 200, content_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, headers)
        self.body = body
        if content_type is not None:
            self.headers["Content-Type"] = content_type


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_json.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def text_response(text: str, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(text.encode(), status=status, content_type="text/plain; charset=utf-8", headers=headers)


# -- the application ------------------------------------------------------------------------------


class _Route:
    """The handlers of one path (or path pattern), by method, each inside the middleware chain."""

    __slots__ = ("template", "canonical", "pattern", "handlers", "chains", "not_allowed")

    def __init__(self, template: str) -> None:
        self.template = template
        self.canonical = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template)  # "/v1/models/{model}": a metric label
        self.pattern = _compile(template) if "{" in template else None
        self.handlers: dict[str, Handler] = {}
        self.chains: dict[str, Handler] = {}
        self.not_allowed: Handler | None = None  # its 405, naming the methods there are


class App:
    """Routes, middlewares and hooks: what one server serves."""

    def __init__(self, *, middlewares: list[Middleware] | None = None, client_max_size: int = DEFAULT_MAX_BODY) -> None:
        self.middlewares: list[Middleware] = list(middlewares or ())
        self.client_max_size = client_max_size
        self.on_response_prepare: list[PrepareHook] = []
        self.on_startup: list[AppHook] = []
        self.on_shutdown: list[AppHook] = []
        self.on_cleanup: list[AppHook] = []
        self.state: dict[str, Any] = {}
        # The error object of a request refused before any handler sees it (default: OpenAI's).
        self.error_shape: ErrorShape | None = None
        self._exact: dict[str, _Route] = {}
        self._patterns: list[_Route] = []
        self._not_found: Handler = functools.partial(_raise, 404, {})
        self.frozen = False

    def add_route(self, method: str, template: str, handler: Handler) -> None:
        if self.frozen:
            raise RuntimeError("routes cannot be added once the server runs")
        route = self._exact.get(template) or next((r for r in self._patterns if r.template == template), None)
        if route is None:
            route = _Route(template)
            if route.pattern is None:
                self._exact[template] = route
            else:
                self._patterns.append(route)
        route.handlers[method] = handler

    def add_get(self, template: str, handler: Handler) -> None:
        """GET, and HEAD with the same head and no body."""
        self.add_route("GET", template, handler)
        self.add_route("HEAD", template, handler)

    def add_post(self, template: str, handler: Handler) -> None:
        self.add_route("POST", template, handler)

    def freeze(self) -> None:
        """Compose every handler with the middlewares: once, so a request pays only the calls."""
        if self.frozen:
            return
        self.frozen = True
        for route in (*self._exact.values(), *self._patterns):
            route.chains = {method: self._chain(handler) for method, handler in route.handlers.items()}
            allow = {"Allow": ", ".join(sorted(route.handlers))}
            route.not_allowed = self._chain(functools.partial(_raise, 405, allow))
        self._not_found = self._chain(functools.partial(_raise, 404, {}))

    def _chain(self, handler: Handler) -> Handler:
        for middleware in reversed(self.middlewares):  # a partial: no frame of its own per call
            handler = cast(Handler, functools.partial(cast(Any, middleware), handler=handler))
        return handler

    def resolve(self, request: Request) -> Handler:
        """The request's handler chain; sets its ``match_info`` and ``route``."""
        path = request.path
        route = self._exact.get(path)
        if route is None:
            route = self._match(request, path)
            if route is None:
                return self._not_found
        chain = route.chains.get(request.method)
        if chain is None:
            request.match_info = {}
            assert route.not_allowed is not None, "routes are resolved once the app is frozen"
            return route.not_allowed
        request.route = route.canonical
        return chain

    def _match(self, request: Request, path: str) -> _Route | None:
        for route in self._patterns:
            assert route.pattern is not None
            found = route.pattern.fullmatch(path)
            if found is not None:
                request.match_info = found.groupdict()
                return route
        return None

    def prepare(self, request: Request, response: StreamResponse) -> None:
        """Run the prepare hooks: the response's head is about to be fixed."""
        response.prepared = True
        for hook in self.on_response_prepare:
            hook(request, response)

    async def startup(self) -> None:
        for hook in self.on_startup:
            await hook(self)

    async def shutdown(self) -> None:
        for hook in self.on_shutdown:
            await hook(self)

    async def cleanup(self) -> None:
        for hook in self.on_cleanup:
            await hook(self)


async def _raise(status: int, headers: Mapping[str, str], request: Request) -> StreamResponse:
    raise HTTPError(status, headers=headers)


def _compile(template: str) -> re.Pattern[str]:
    """``/v1/models/{model:.+}`` → a pattern with a named group per ``{name}`` (default: one segment)."""
    parts = re.split(r"(\{\w+(?::[^}]*)?\})", template)
    pattern = ""
    for part in parts:
        field = re.fullmatch(r"\{(\w+)(?::([^}]*))?\}", part)
        pattern += f"(?P<{field[1]}>{field[2] or '[^/]+'})" if field else re.escape(part)
    return re.compile(pattern)


def _decoded(raw_path: str) -> str:
    return unquote(raw_path, errors="surrogateescape") if "%" in raw_path else raw_path
