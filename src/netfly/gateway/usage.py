"""Usage accounting per key and public model, kept in the state store (so shared when it is)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..stream import ChatStream
from .keys import StateStore

__all__ = ["TokenCount", "UsageBook", "count_tokens", "reported_tokens"]

_PREFIX = "usage:"


@dataclass(frozen=True)
class TokenCount:
    prompt: int
    completion: int
    estimated: bool  # the upstream sent no usage: counted from characters (~4 a token)

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def count_tokens(stream: ChatStream, prompt_estimate: Callable[[], int]) -> TokenCount:
    """The answer's real usage when the upstream sent it, else an estimate from the text received."""
    usage = stream.result.usage if stream.result is not None else None
    if usage and isinstance(usage.get("prompt_tokens"), int) and isinstance(usage.get("completion_tokens"), int):
        return TokenCount(usage["prompt_tokens"], usage["completion_tokens"], estimated=False)
    text = stream.text
    if not text and stream.result is None:
        return TokenCount(0, 0, estimated=True)  # failed before any answer: nothing was produced
    return TokenCount(prompt_estimate(), math.ceil(len(text) / 4), estimated=True)


def reported_tokens(usage: Mapping[str, Any], name: str, detail: str | None = None) -> int:
    """``usage[name]`` (or ``usage[name][detail]``) when the upstream reported a count there, else 0: an
    upstream's usage arrives as it was sent, whatever its fields hold."""
    value = usage.get(name)
    if detail is not None:
        value = value.get(detail) if isinstance(value, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@functools.lru_cache(maxsize=1024)  # asked once a request, of few keys and models
def _counter_name(key: str, model: str) -> str:
    return _PREFIX + json.dumps([key, model])


class UsageBook:
    """Requests and tokens by key and model."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def record(self, key: str, model: str, tokens: TokenCount) -> None:
        await self.store.add(_counter_name(key, model), {
            "requests": 1,
            "prompt_tokens": tokens.prompt,
            "completion_tokens": tokens.completion,
            "estimated_requests": int(tokens.estimated),
        })

    async def report(self) -> list[dict[str, Any]]:
        """One entry per key and model, sorted; ``total_tokens`` added."""
        rows = []
        for name, counts in (await self.store.counters(_PREFIX)).items():
            key, model = json.loads(name[len(_PREFIX):])
            rows.append({"key": key, "model": model, **counts,
                         "total_tokens": counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)})
        return sorted(rows, key=lambda row: (row["key"], row["model"]))
