"""``--log-format json``: one JSON object per request on the ``netfly.gateway.requests`` logger.

It names the key (never the key itself), the route, the public model, the provider that served,
every attempt with its error, the status, the time to first token, the duration and the tokens. The
prompt and the answer are left out unless ``log_content`` is set.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .. import _json

if TYPE_CHECKING:
    from .operations import RequestRecord

__all__ = ["RequestLog", "request_entry"]

logger = logging.getLogger("netfly.gateway.requests")


class RequestLog:
    def __init__(self, log_format: str = "text", log_content: bool = False) -> None:
        if log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
        self.json = log_format == "json"
        self.content = log_content

    def write(self, record: RequestRecord) -> None:
        if self.json and logger.isEnabledFor(logging.INFO):
            logger.info("%s", _json.dumps(request_entry(record, content=self.content)).decode())


def request_entry(record: RequestRecord, *, content: bool = False) -> dict[str, Any]:
    """The log object of one finished request."""
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.time, timezone.utc).isoformat(timespec="milliseconds"),
        "request_id": record.request_id,
        "key": record.key.name if record.key else None,
        "route": record.route,
        "model": record.model,
        "status": record.status,
        "duration_ms": round((time.monotonic() - record.started) * 1000, 1),
    }
    stream = record.stream
    if stream is not None:
        stats = stream.stats
        entry["provider"] = stats.provider
        entry["upstream_model"] = stats.model
        entry["attempts"] = [
            {"provider": getattr(a, "provider", "") or stats.provider, "error": a.error, "status": a.status,
             "duration_ms": round(a.duration * 1000, 1)}
            for a in stats.attempts
        ]
        entry["ttft_ms"] = None if stats.time_to_first_token is None else round(stats.time_to_first_token * 1000, 1)
        entry["completed"] = stream.result is not None
    if record.tokens is not None:
        entry.update(tokens_in=record.tokens.prompt, tokens_out=record.tokens.completion,
                     tokens_estimated=record.tokens.estimated)
    if content and stream is not None:
        entry["messages"] = list(record.messages)
        entry["answer"] = stream.text
    return entry
