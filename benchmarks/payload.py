"""The answer every benchmark client receives: N realistic ``chat.completion.chunk`` events.

Deterministic, so the server and each client build the same bytes and the same expected text
independently. Text pieces are ~4 characters of mixed Latin, Cyrillic and emoji, so UTF-8 sequences
of 1, 2 and 4 bytes occur throughout and the 16 KiB write slices split some of them.
"""

from __future__ import annotations

import itertools
import json
import random
from functools import lru_cache

SLICE = 16 * 1024
_NUDGE = 512
MODEL = "gpt-4o-2024-08-06"
_ID = "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"
_CREATED = 1741569952
_FINGERPRINT = "fp_f9f4fb6dbf"

_LATIN = "the quick brown fox jumps over lazy dogs and rivers flow into seas".split()
_CYRILLIC = "тихий лес шумит над рекой и ветер несёт запах хвои вдаль".split()
_EMOJI = ["🌲", "🌊", "🍂", "☀️", "🦊", "✨", "🌧", "🏔"]


def pieces(n: int) -> list[str]:
    """``n`` text pieces of about four characters; the first has no leading space."""
    rng = random.Random(20240601)
    out: list[str] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.45:
            word = rng.choice(_LATIN)
        elif kind < 0.85:
            word = rng.choice(_CYRILLIC)
        else:
            word = rng.choice(_EMOJI) + rng.choice(_EMOJI)
        piece = word[:4] if i == 0 else (" " + word)[:4]
        out.append(piece)
    return out


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    obj = {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    # Real servers send raw UTF-8 (not \u escapes) and no spaces after separators.
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@lru_cache(maxsize=8)
def body(n: int) -> bytes:
    """The whole event stream: a role prelude, ``n`` content chunks, a finish chunk, ``[DONE]``."""
    parts = [_chunk({"role": "assistant", "content": "", "refusal": None})]
    parts.extend(_chunk({"content": piece}) for piece in pieces(n))
    parts.append(_chunk({}, finish="stop"))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


@lru_cache(maxsize=8)
def completion(n: int) -> bytes:
    """The same answer not streamed: one ``chat.completion`` object (for ``stream: false``)."""
    obj = {
        "id": _ID, "object": "chat.completion", "created": _CREATED, "model": MODEL, "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": expected_text(n), "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n},
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@lru_cache(maxsize=8)
def slices(n: int) -> tuple[bytes, ...]:
    """The body cut into ~16 KiB writes, each cut moved (by < 512 bytes) into a multi-byte character.

    Lines are ~300 bytes, so every cut also falls mid-line.
    """
    data = body(n)
    cuts = [0]
    while cuts[-1] + SLICE < len(data):
        cut = cuts[-1] + SLICE
        for shift in range(_NUDGE):
            if cut + shift < len(data) and data[cut + shift] & 0xC0 == 0x80:  # a continuation byte
                cut += shift
                break
        cuts.append(cut)
    cuts.append(len(data))
    return tuple(data[a:b] for a, b in itertools.pairwise(cuts))


@lru_cache(maxsize=8)
def expected_text(n: int) -> str:
    return "".join(pieces(n))


def split_characters(n: int) -> tuple[int, int]:
    """(slice boundaries inside a multi-byte UTF-8 character, all boundaries), for the report."""
    parts = slices(n)
    return sum(1 for part in parts[1:] if part[0] & 0xC0 == 0x80), len(parts) - 1
