"""Terminal text: the table of ``netfly check`` and the report of ``netfly chat --stats``."""

from __future__ import annotations

from collections.abc import Sequence

from ..health import HealthResult
from ..stream import StreamStats


def format_health_table(results: Sequence[HealthResult]) -> str:
    """A plain-text table of check results, one provider a line."""
    header = ("PROVIDER", "DECLARED", "MEASURED", "LATENCY", "SERVED BY", "DETAIL")
    rows = [header]
    for result in results:
        rows.append((
            result.provider,
            "working" if result.declared else "-",
            "ok" if result.ok else "FAILED",
            f"{result.latency * 1000:.0f} ms",
            result.served_by or "-",
            _detail(result),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _detail(result: HealthResult) -> str:
    detail = result.error or (f"model {result.model}" if result.model else "")
    if result.engine:
        detail += f" (engine {result.engine})" if detail else f"engine {result.engine}"
    return " ".join(detail.split())


def format_stats(stats: StreamStats) -> str:
    """A short human-readable report of one stream's figures (for ``netfly chat --stats`` and logs)."""
    ttft = f"{stats.time_to_first_token:.3f} s" if stats.time_to_first_token is not None else "-"
    duration = f"{stats.duration:.3f} s" if stats.duration is not None else "-"
    lines = [
        f"provider: {stats.provider}" + (f"  model: {stats.model}" if stats.model else ""),
        f"time to first token: {ttft}  duration: {duration}  chunks: {stats.chunks}  characters: {stats.characters}",
    ]
    for record in stats.attempts:
        who = getattr(record, "provider", None) or stats.provider
        outcome = "ok" if record.error is None else record.error
        lines.append(f"attempt {record.number}: {who}: {outcome} ({record.duration:.3f} s)")
    skipped = getattr(stats, "skipped", None)
    if skipped:
        for name, reason in skipped.items():
            lines.append(f"skipped: {name}: {reason}")
    return "\n".join(lines)
