"""One streamed answer: a stream object fed by a source of items, and the single-provider source —
the retry policy wrapped around whole attempts, each attempt flowing transport → SSE decoder →
chunk interpreter → caller.

:class:`ChatStream` is the one stream type. It is iterated for text (the seed's contract) or through
:meth:`ChatStream.events` for typed events, keeps the statistics and assembles the result. Where the
items come from is its :meth:`ChatStream._source`: the retry loop here, routing in
:mod:`netfly.routing`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _json
from .chunks import ChunkInterpreter, Item, as_events, only_texts, runs
from .errors import (
    LocalServerError,
    NetflyError,
    NetflyTimeoutError,
    StreamDecodeError,
    StreamInterruptedError,
    TransportError,
    UpstreamError,
)
from .events import ChatAccumulator, ChatResult, ChoiceDelta, Event
from .redact import clip, redact_headers, redact_url, scrub, scrub_value
from .retry import RetryPolicy
from .sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES, SSEDecoder
from .transport import Proxy, SessionPool, StreamingResponse, Timeout, open_stream

logger = logging.getLogger("netfly")

_JSON_BODY_LIMIT = 32 * 1024 * 1024
_JOIN_EVERY = 128  # text pieces kept apart before they are joined into one block


@dataclass
class ChatRequest:
    """Everything one call needs, built and validated by the provider before any I/O."""

    provider: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    proxy: Proxy | None = None
    timeout: Timeout = field(default_factory=Timeout)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    strict: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    secrets: tuple[str, ...] = ()
    payload: bytes = b""  # the serialised body; built once by the provider
    secret_headers: frozenset[str] = frozenset()  # beyond redact.SENSITIVE_HEADERS

    def __repr__(self) -> str:
        return (
            f"ChatRequest(provider={self.provider!r}, url={redact_url(self.url)!r}, "
            f"headers={redact_headers(self.headers, self.secret_headers)!r}, model={self.body.get('model')!r}, "
            f"proxy={self.proxy!r}, timeout={self.timeout!r})"
        )


@dataclass(frozen=True)
class PreparedCall:
    """A validated call that has not started: ``request`` is what it sends (a router's: its first
    provider's), ``open()`` starts its stream. Lets a router validate once and start later."""

    request: ChatRequest
    open: Callable[[], ChatStream]


@dataclass
class AttemptRecord:
    """One attempt of a call: its error (``None`` when it succeeded) and how long it took."""

    number: int
    error: str | None = None
    status: int | None = None
    duration: float = 0.0


@dataclass
class StreamStats:
    """Figures of one streamed answer, filled in as it runs.

    ``time_to_first_token``: seconds until the first output of any kind (text, reasoning, a tool-call
    fragment, a refusal); ``chunks``: deltas with output; ``characters``: characters of text.
    """

    provider: str
    model: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    time_to_first_token: float | None = None
    chunks: int = 0
    characters: int = 0
    duration: float | None = None


class ChatStream:
    """An async iterator of answer text that also exposes ``.stats`` and, once done, ``.result``.

    Iterate it once, either for text (``async for text in stream``) or for typed events
    (``async for event in stream.events()``), not both. Leaving the loop early (``break``) closes the
    connection when the stream is garbage-collected; use ``async with`` or :meth:`aclose` to close
    it at a known point.
    """

    def __init__(
        self, request: ChatRequest, pool: SessionPool | None = None, *, stats: StreamStats | None = None
    ) -> None:
        self._set_up(request, stats or StreamStats(provider=request.provider, model=request.body.get("model")), pool)
        self._accumulate(ChatAccumulator())

    def _set_up(self, request: ChatRequest, stats: StreamStats, pool: SessionPool | None) -> None:
        """Everything of a new stream but the assembly of its result (see :meth:`_accumulate`): no text yet."""
        self._parts: list[str] = []
        self._joined = 0  # how many of the first parts are joined blocks (see _note_text)
        self.request = request
        self.stats = stats
        self.result: ChatResult | None = None
        # The upstream's answer is all in, its body ended too: the read being handed on is the last,
        # and the stream ends as soon as it is asked for the next (a relay sends it with the end).
        self.at_end = False
        self._pool = pool
        self._started = 0.0  # monotonic time the source started; set by the source
        self._events_mode = False
        self._items = self._source()  # one list of items per upstream read
        self._next_read = self._items.__anext__
        self._pending: Iterator[Item] = iter(())  # what text iteration has not returned of the last read

    # -- iteration -----------------------------------------------------------------------------

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        while True:
            for item in self._pending:
                if isinstance(item, str):
                    self._note_text(item)
                    return item
                text = self._note_events(item)
                if text:
                    return text
            self._pending = iter(await self._next_read())

    async def events(self) -> AsyncGenerator[Event, None]:
        """The answer as typed events, in order: :class:`ChunkMeta`, :class:`ChoiceDelta` and
        :class:`Usage` (see :mod:`netfly.events`), finish reasons and usage included."""
        async with aclosing(self.event_batches()) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def event_batches(self) -> AsyncGenerator[list[Event], None]:
        """:meth:`events` grouped by upstream read: all the events one read completed, in one list; the
        first output of the first read goes ahead of the rest of that read, in a list of its own.

        A relay that writes each list at once sends as soon as :meth:`events` would, in far fewer writes.
        """
        async with aclosing(self.reads()) as reads:
            async for read in reads:
                yield [event for item in read for event in as_events(item)]

    async def reads(self) -> AsyncGenerator[list[Item], None]:
        """:meth:`event_batches` as the engine has them: each item a text of choice 0 alone (``str``: a
        plain chunk, nearly every one of a long answer) or a list of events (see
        :func:`netfly.chunks.as_events`). The cheapest way to relay a stream: a run of texts can be
        encoded at once."""
        items = self._read_for_events()
        try:
            async for read in items:
                self._note_read(read)
                yield read
        finally:
            await self.aclose()

    async def collect(self) -> ChatResult:
        """Read the whole answer and return its :attr:`result`: :meth:`reads` with nothing handed on,
        the cheapest way to wait for a whole answer."""
        items = self._read_for_events()
        try:
            async for read in items:
                self._note_read(read)
        finally:
            await self.aclose()
        assert self.result is not None  # set by every source that ends without an error
        return self.result

    def _read_for_events(self) -> AsyncGenerator[list[Item], None]:
        if self._events_mode or self._started:
            raise RuntimeError("a stream is iterated once: for text or for events(), not both")
        self._events_mode = True
        return self._items

    async def aclose(self) -> None:
        await self._items.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def text(self) -> str:
        """The text (of choice 0) received so far."""
        return "".join(self._parts)

    # -- bookkeeping, for every source ---------------------------------------------------------

    def _accumulate(self, accumulator: ChatAccumulator) -> None:
        """Assemble the result in ``accumulator`` from now on (a fresh one when an attempt is retried)."""
        self._acc = accumulator
        self._parts = accumulator.text_parts(0)
        self._joined = 0  # how many of the first parts are joined blocks (see _note_text)

    def _note_text(self, text: str) -> None:
        stats = self.stats
        if stats.time_to_first_token is None:
            stats.time_to_first_token = time.monotonic() - self._started
        stats.chunks += 1
        stats.characters += len(text)
        self._parts.append(text)
        self._join_parts()

    def _join_parts(self) -> None:
        parts = self._parts
        if len(parts) - self._joined >= _JOIN_EVERY:
            # A few characters each, the pieces cost ~70 bytes apiece: a long answer (or hundreds of
            # them in a gateway) is kept as blocks of joined text instead, each piece copied once.
            parts[self._joined :] = ["".join(parts[self._joined :])]
            self._joined += 1

    def _note_events(self, events: list[Event]) -> str | None:
        """Account for ``events``; return choice 0's text among them (what text iteration yields)."""
        stats, text = self.stats, None
        for event in events:
            self._acc.add(event)
            if type(event) is ChoiceDelta and event.has_output:
                if stats.time_to_first_token is None:
                    stats.time_to_first_token = time.monotonic() - self._started
                stats.chunks += 1
                if event.text:
                    stats.characters += len(event.text)
                    if event.index == 0:
                        text = event.text if text is None else text + event.text
        return text

    def _note_read(self, read: list[Item]) -> None:
        if only_texts(read):  # no step per text
            self._note_texts(read)
            return
        for texts, events in runs(read):
            if texts:
                self._note_texts(texts)
            else:
                self._note_events(events)

    def _note_texts(self, texts: list[str]) -> None:
        """:meth:`_note_text` of each of ``texts``, at once."""
        stats = self.stats
        if stats.time_to_first_token is None:
            stats.time_to_first_token = time.monotonic() - self._started
        stats.chunks += len(texts)
        stats.characters += sum(map(len, texts))
        self._parts += texts
        self._join_parts()

    async def _next_noted(self) -> list[Item]:
        """The next read's items, accounted for: how a router reads the stream of the provider it chose."""
        read = await self._next_read()
        self._note_read(read)
        return read

    @property
    def delivered(self) -> bool:
        """Whether output of any kind has reached the caller: from then on nothing may be retried."""
        return self.stats.time_to_first_token is not None

    def _partial_result(self, malformed_chunks: int = 0) -> ChatResult:
        return self._acc.result(malformed_chunks=malformed_chunks)

    def _finish(self, malformed_chunks: int) -> None:
        self.result = self._acc.result(malformed_chunks=malformed_chunks)
        if self.result.model:
            self.stats.model = self.result.model

    # -- hooks of a provider's own stream ------------------------------------------------------

    async def _prepare(self) -> None:
        """Awaited once before the first attempt, outside retries and the total timeout
        (``Local`` starts its server here)."""

    async def _explain(self, error: NetflyError) -> NetflyError:
        """A failed attempt's error, or a truer one (``Local`` names a crashed child)."""
        return error

    # -- the source: retries around whole attempts ---------------------------------------------

    async def _source(self) -> AsyncGenerator[list[Item], None]:
        request, stats = self.request, self.stats
        await self._prepare()
        self._started = started = time.monotonic()
        deadline = started + request.timeout.total if request.timeout.total else None
        attempt = 0
        try:
            while True:
                attempt += 1
                record = AttemptRecord(attempt)
                stats.attempts.append(record)
                attempt_started = time.monotonic()
                logger.debug("%s: attempt %d: %r", request.provider, attempt, request)
                interpreter = ChunkInterpreter(strict=request.strict, secrets=request.secrets)
                reads = self._attempt(interpreter, deadline)
                try:
                    try:
                        async for read in reads:
                            yield read
                    finally:
                        # Leaving early closes the attempt (and its connection) right here, not whenever
                        # the garbage collector gets to it (aclosing() would do it too, at twice the cost).
                        await reads.aclose()
                except NetflyError as exc:
                    error = await self._explain(_scrub_error(exc, request.secrets))
                else:
                    record.duration = time.monotonic() - attempt_started
                    self._finish(interpreter.malformed_chunks)
                    return
                record.duration = time.monotonic() - attempt_started
                record.error = f"{type(error).__name__}: {error}"
                record.status = getattr(error, "status", None)
                await self._before_retry(attempt, error, deadline, interpreter)
        finally:
            stats.duration = time.monotonic() - started

    async def _before_retry(
        self, attempt: int, error: NetflyError, deadline: float | None, interpreter: ChunkInterpreter
    ) -> None:
        """Raise ``error`` unless another attempt is allowed; then wait for it."""
        request = self.request
        if self.delivered:
            # Output already reached the caller: a retry would repeat it. Only a cut stream (the
            # local server's death included) is an interruption; an in-stream error or a decode
            # error keeps its own type.
            if not isinstance(error, (TransportError, LocalServerError)):
                raise error
            raise StreamInterruptedError(
                f"{request.provider}: stream interrupted after {len(self.text)} characters: {error}",
                self.text,
                self._partial_result(interpreter.malformed_chunks),
            ) from error
        delay = request.retry.delay_for(attempt, error)
        if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
            raise error
        logger.warning(
            "%s: attempt %d/%d failed (%s); retrying in %.2f s",
            request.provider, attempt, request.retry.max_attempts, self.stats.attempts[-1].error, delay,
        )
        self._accumulate(ChatAccumulator())  # nothing of the failed attempt was output: forget it
        await asyncio.sleep(delay)

    async def _attempt(
        self, interpreter: ChunkInterpreter, deadline: float | None
    ) -> AsyncGenerator[list[Item], None]:
        request = self.request
        response = await open_stream(
            request.url, request.payload or _json.dumps(request.body), request.headers,
            target=request.provider, timeout=request.timeout, remaining=_remaining(request, deadline),
            proxy=request.proxy, secrets=request.secrets, pool=self._pool,
        )
        try:
            content_type = response.content_type
            if content_type == "application/json":
                yield [await self._whole_answer(response, interpreter)]
                return
            if content_type == "text/html":
                raise await _html_page_error(request, response)
            decoder = SSEDecoder(request.max_line_bytes, request.max_event_bytes)
            first = True
            async for raw in response:
                for items in _interpreted(interpreter, decoder, raw, first):
                    if interpreter.done:
                        self.at_end = response.at_end
                    yield items  # a read's items together: a relay writes them at once
                first = False
                if interpreter.done:
                    break
            else:
                items = _interpreted_end(request, interpreter, decoder)
                if items:
                    yield items
            await response.drain()
        finally:
            response.release()

    async def _whole_answer(self, response: StreamingResponse, interpreter: ChunkInterpreter) -> list[Event]:
        body = await response.read(_JSON_BODY_LIMIT)
        try:
            parsed = _json.loads(body)
        except _json.JSONDecodeError as exc:
            raise StreamDecodeError(f"{self.request.provider}: invalid JSON reply: {exc}") from None
        return interpreter.interpret_completion(parsed)


def _remaining(request: ChatRequest, deadline: float | None) -> float | None:
    """Seconds left of the call's total timeout (``None``: no limit); raises when none are left."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise NetflyTimeoutError(f"{request.provider}: total timeout of {request.timeout.total} s exceeded", "total")
    return remaining


async def _html_page_error(request: ChatRequest, response: StreamingResponse) -> UpstreamError:
    snippet = (await response.read(2048)).decode("utf-8", "replace")
    return UpstreamError(
        f"{request.provider}: expected an event stream, got an HTML page: {clip(snippet, 200, request.secrets)!r}"
    )


def _interpreted_end(request: ChatRequest, interpreter: ChunkInterpreter, decoder: SSEDecoder) -> list[Item]:
    """The items of an event the body ended in without its blank line; a warning when the answer has no end."""
    items: list[Item] = []
    interpreter.interpret_events(decoder.flush(), items)
    if not interpreter.done and not interpreter.finished:
        logger.warning(
            "%s: stream ended without [DONE] or finish_reason; the answer may be incomplete", request.provider
        )
    return items


def _interpreted(interpreter: ChunkInterpreter, decoder: SSEDecoder, raw: bytes, first: bool) -> Iterator[list[Item]]:
    """The items of one upstream read, to hand on together; an error in it is raised after the items
    before it. The first read's first output goes ahead of the rest, interpreted only then: a fast
    upstream's first read may hold the whole answer, which would hold back the first token."""
    items: list[Item] = []
    try:
        if first:
            raw = interpreter.interpret_until_output(raw, decoder, items)
            if raw and items:
                yield items
                items = []
        interpreter.interpret_read(raw, decoder, items)
    except NetflyError:
        if items:
            yield items
        raise
    if items:
        yield items


# Every field of an error that may hold text an upstream sent.
_UPSTREAM_FIELDS = ("message", "code", "type", "param", "body", "location")


def _scrub_error(error: NetflyError, secrets: tuple[str, ...]) -> NetflyError:
    """Remove secrets a server echoed back (in an error body, an in-stream error's code or type, a
    redirect's Location) from every text of ``error``."""
    if secrets:
        error.args = tuple(scrub(a, secrets) if isinstance(a, str) else a for a in error.args)
        for name in _UPSTREAM_FIELDS:
            if hasattr(error, name):
                setattr(error, name, scrub_value(getattr(error, name), secrets))
    return error
