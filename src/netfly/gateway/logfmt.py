"""The gateway's access log line: client text escaped and cut, so a request cannot forge or flood the log.

Every field that comes from a client (method, path, the notes naming its model) passes through
:func:`log_field`: control characters, backslashes and the Unicode characters that reorder or break
lines are written as escapes (``\\x1b``, ``\\u202e``), and a field longer than :data:`MAX_FIELD_CHARS`
is cut, the cut marked in place with the number of characters left out.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Sequence
from typing import Any

MAX_FIELD_CHARS = 256
# Handler tasks the server cut at shutdown, with the status their client was sent. Keyed by task:
# the access line is written from inside the handler's own task, as it unwinds.
_cut_by_shutdown: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()
# The note the log middleware adds when a handler is cancelled; after a shutdown cut it is not true.
_DISCONNECTED = "client disconnected"

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def log_field(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` fit for one log line: escaped, and cut after ``limit`` characters (marked)."""
    if text.isascii() and text.isprintable() and "\\" not in text and len(text) <= limit:
        return text  # nothing to escape or cut (nearly every field): told in C, no regex scan
    cut = ""
    if len(text) > limit:
        cut = f"...[{len(text) - limit} more chars]"
        text = text[:limit]
    return _UNSAFE.sub(_escape, text) + cut


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def mark_cut_by_shutdown(task: asyncio.Task[Any], status_sent: int) -> None:
    """Record that the server is cutting ``task``'s request at shutdown (see :mod:`.server`)."""
    _cut_by_shutdown[task] = status_sent


def _cut_status() -> int | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: not a request being handled
        return None
    return _cut_by_shutdown.get(task) if task is not None else None


def access_line(
    method: str, path: str, status: int, elapsed: float, notes: Sequence[str], *, request_id: str = ""
) -> str:
    """``METHOD /path STATUS 12.3ms request_id=… (note; note)``, each client-given part through :func:`log_field`.

    Called from the request's own task. A request the server cut at shutdown is logged with the
    status it was sent and the note ``server shutdown``, not as a client that went away (499).
    """
    cut_status = _cut_status() if _cut_by_shutdown else None  # empty until a shutdown cuts requests
    if cut_status is not None:
        status = cut_status
        notes = [note for note in notes if note != _DISCONNECTED] + ["server shutdown: cut after the grace period"]
    shown = f" ({'; '.join(log_field(note) for note in notes)})" if notes else ""
    rid = f" request_id={log_field(request_id, 64)}" if request_id else ""
    return f"{log_field(method, 32)} {log_field(path)} {status} {elapsed * 1000:.1f}ms{rid}{shown}"
