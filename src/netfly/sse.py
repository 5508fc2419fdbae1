"""A server-sent events decoder: bytes in, events out, no I/O.

Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR (also when CR and LF arrive in
different reads); ``field: value`` with or without the space after the colon; several ``data`` lines
joined with ``\\n``; ``:`` comment lines ignored; ``event``, ``id`` and ``retry`` fields; one leading
UTF-8 BOM skipped. Lines are split on bytes before decoding, and UTF-8 never uses the bytes of CR or
LF inside a character, so a character split across reads is never garbled.

Three departures from a browser, all deliberate for API clients: a line longer than
``max_line_bytes`` and an event whose data is longer than ``max_event_bytes`` (many ``data`` lines
and no blank line) raise :class:`StreamDecodeError` instead of growing memory, and an event still
pending when the stream ends (no final blank line) is delivered by :meth:`SSEDecoder.flush`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigurationError, StreamDecodeError

DEFAULT_MAX_LINE_BYTES = 1 << 20
DEFAULT_MAX_EVENT_BYTES = 8 << 20
# Pending data lines are folded into one bytearray past this many: a million one-byte lines would
# otherwise cost a million bytes objects (about 40 bytes each) before the event size limit is reached.
_FOLD_LINES = 64
# A retry value longer than this is garbage (over 30 years in milliseconds) and int() of a huge digit
# string raises ValueError past 4,300 digits.
_MAX_RETRY_DIGITS = 12
_BOM = b"\xef\xbb\xbf"
T = TypeVar("T")


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, which was
# the largest cost of decoding an event.
@dataclass(slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id seen so far in the stream (spec rule)."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder. Call :meth:`feed` with each read, then :meth:`flush` at end of stream."""

    __slots__ = ("max_line_bytes", "max_event_bytes", "_buffer", "_pending_cr", "_bom_checked", "_data",
                 "_data_size", "_event", "_last_id", "_retry")

    def __init__(
        self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        self.max_line_bytes = _positive_int("max_line_bytes", max_line_bytes)
        self.max_event_bytes = _positive_int("max_event_bytes", max_event_bytes)
        self._buffer = b""
        self._pending_cr = False  # the previous read ended in CR: a leading LF belongs to it
        self._bom_checked = False
        self._data: list[bytes | bytearray] = []
        # Size of the pending event's data as it will be delivered: each line's value plus one for
        # the newline joining it to the next (so one more than the joined size).
        self._data_size = 0
        self._event: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode one read and return the events it completed (often none, sometimes several)."""
        if not chunk:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        buf = self._buffer + chunk if self._buffer else chunk
        if not self._bom_checked:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._buffer = buf  # could still become a BOM
                return []
            self._bom_checked = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        if b"\r" in buf:
            self._pending_cr = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buffer = lines.pop()
        if len(buf) > self.max_line_bytes:
            self._check_lengths(lines)
        events: list[ServerSentEvent] = []
        data = self._data  # cleared in place by _dispatch, so this alias stays valid
        size, budget = self._data_size, self.max_event_bytes + 1
        for line in lines:
            # Nearly every line is "data: ..." or the blank line ending an event: those two are
            # handled inline (this loop runs once per line of the stream), the rest by _process_line.
            if line.startswith(b"data: "):
                data.append(line[6:])
                size += len(line) - 5
            elif line:
                size += self._process_line(line)
            elif data:
                if size > budget:
                    self._event_too_large()
                self._dispatch(events)
                size = 0
            else:
                self._event = None  # a blank line with no data: nothing to dispatch, reset the type
        self._data_size = size
        if size > budget:
            self._event_too_large()
        if len(data) > _FOLD_LINES:
            self._fold()
        return events

    def feed_whole(
        self, chunk: bytes, parse: Callable[[bytes], tuple[list[T], int] | None]
    ) -> tuple[list[T], list[ServerSentEvent]]:
        """:meth:`feed` ``chunk``, first offering its whole events to ``parse`` in one piece of bytes (from
        the start of the line still pending from the read before): what ``parse`` returns for the first of
        them, and the events :meth:`feed` decodes of the rest. ``parse`` returns its values and how many
        bytes of the piece they span (the end of an event), or ``None``: all are fed as usual.

        They are offered only when this decoder would decode them exactly as if it started afresh on them:
        no event pending, no CR to fold, the piece within both limits. Then a caller that knows their shape
        (``data:`` lines of one form) may read them all at once, instead of an event object each."""
        end = self._whole_end(chunk)
        if end:
            piece = self._buffer + chunk[:end] if self._buffer else chunk[:end]
            parsed = parse(piece)
            if parsed is not None:
                values, used = parsed
                self._buffer = b""
                rest = chunk[end:] if used == len(piece) else piece[used:] + chunk[end:]
                return values, self.feed(rest)
        return [], self.feed(chunk)

    def _whole_end(self, chunk: bytes) -> int:
        """Where the whole events of ``chunk`` end when :meth:`feed_whole` may offer them, else 0."""
        if self._data or self._event is not None or self._pending_cr or not self._bom_checked:
            return 0
        if b"\r" in chunk:
            return 0
        end = chunk.rfind(b"\n\n") + 2
        if end < 2 or len(self._buffer) + end > min(self.max_line_bytes, self.max_event_bytes):
            return 0
        return end

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: deliver an unterminated last line and any event still pending."""
        events: list[ServerSentEvent] = []
        self._pending_cr = False
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._data_size += self._process_line(line)
            if self._data_size > self.max_event_bytes + 1:
                self._event_too_large()
        self._dispatch(events)
        return events

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def _check_lengths(self, lines: list[bytes]) -> None:
        limit = self.max_line_bytes
        if len(self._buffer) > limit or any(len(line) > limit for line in lines):
            self._drop_event()
            raise StreamDecodeError(f"event-stream line longer than {limit} bytes (max_line_bytes)")

    def _event_too_large(self) -> None:
        self._drop_event()
        raise StreamDecodeError(
            f"event-stream event with more than {self.max_event_bytes} bytes of data (max_event_bytes)"
        )

    def _drop_event(self) -> None:
        # After an error the rest of the stream cannot be trusted; a reused decoder starts afresh
        # (the last event id and retry, which outlive events by the spec, are kept).
        self._buffer = b""
        self._data.clear()
        self._data_size = 0
        self._event = None

    def _fold(self) -> None:
        # Many short data lines become one bytearray, so memory follows the data's size, not the
        # number of lines; the first element stays the accumulator for the next fold.
        data = self._data
        head = data[0]
        if isinstance(head, bytearray):
            head += b"\n"
            head += b"\n".join(data[1:])
        else:
            head = bytearray(b"\n".join(data))
        data[:] = [head]

    def _process_line(self, line: bytes) -> int:
        """Apply one line, never blank (a blank line ends an event: the callers handle it); returns
        the bytes it added to the pending data."""
        if line[0] == 0x3A:  # ":" starts a comment (keep-alives such as ": ping")
            return 0
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            return len(value) + 1
        if field == b"event":
            self._event = value.decode("utf-8", "replace")
        elif field == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif field == b"retry":
            if value.isdigit() and len(value) <= _MAX_RETRY_DIGITS:
                self._retry = int(value)
        # Any other field name is ignored, as the spec says.
        return 0

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        data, event = self._data, self._event
        self._event = None
        self._data_size = 0
        if not data:
            return
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        data.clear()
        events.append(ServerSentEvent(text, event or "message", self._last_id, self._retry))


def _positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive whole number of bytes, got {value!r}")
    return value
