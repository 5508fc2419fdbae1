"""JSON parsing: orjson (a dependency: several times faster on chunk-sized documents); the standard
library's json where orjson cannot be installed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:  # pragma: no cover - which branch runs depends on the environment
    import orjson

    loads: Callable[[str | bytes], Any] = orjson.loads
    JSONDecodeError: type[ValueError] = orjson.JSONDecodeError
    dumps: Callable[[Any], bytes] = orjson.dumps  # itself, not wrapped: a call per text chunk relayed

except ImportError:  # pragma: no cover
    JSONDecodeError = json.JSONDecodeError
    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def strings_between(prefix: bytes, texts: list[str], suffix: bytes) -> bytes:
    """Each of ``texts`` as a JSON string between ``prefix`` and ``suffix``, all in a row: the text
    events of a run of text deltas, in C loops."""
    return prefix + (suffix + prefix).join(map(dumps, texts)) + suffix
