"""The gateway's one-line summary of a stream's figures, for its access log."""

from __future__ import annotations

from ..stream import StreamStats


def summarize_stats(stats: StreamStats) -> str:
    """One line of a stream's figures, for log lines (the gateway's access log)."""
    ttft = f"{stats.time_to_first_token * 1000:.0f}ms" if stats.time_to_first_token is not None else "-"
    failed = sum(1 for record in stats.attempts if record.error is not None)
    return (
        f"provider={stats.provider} attempts={len(stats.attempts)} failed={failed} ttft={ttft} "
        f"chunks={stats.chunks} chars={stats.characters}"
    )
