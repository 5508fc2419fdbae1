"""``POST /v1/embeddings``: relayed to the provider's own embeddings endpoint.

The answer is OpenAI's: one flat vector per input. Some servers (llama-cpp-python without a pooling
type, for a model like SmolLM2) return one vector per *token*; those are mean-pooled here, so every
input gets one vector of the model's width.
"""

from __future__ import annotations

import array
import base64
from typing import Any

from .. import _json
from ..provider import Provider
from ..providers.local import Local
from ..routing import RoutedProvider
from ..transport import fetch_json
from .errors import GatewayError
from .schema import check_encodable, expect_type, load_object


def parse_embeddings_request(raw: bytes) -> dict[str, Any]:
    body = load_object(raw)
    expect_type(body, "model", str)
    value = body.get("input")
    if not value or not (isinstance(value, str) or isinstance(value, list)):
        raise GatewayError(400, "field 'input' must be a non-empty string or array", param="input")
    check_encodable(body, body)  # all of it goes to the upstream
    return body


async def relay_embeddings(provider: type[Provider], model: str, public_id: str, body: dict[str, Any],
                           timeout: Any = None) -> dict[str, Any]:
    """The provider's embeddings for ``body`` (its ``model`` replaced by the resolved name)."""
    provider, model = _serving(provider, model)
    if issubclass(provider, Local):
        await provider.start()  # the child serves embeddings too; it starts on the first use
    url = provider.endpoint_url().replace("/chat/completions", "/embeddings")
    key = provider.resolve_api_key()
    headers = provider.default_headers()
    if key:
        headers["authorization"] = f"Bearer {key}"
    # Floats from the upstream, whatever the client asked: per-token vectors can only be pooled as floats.
    upstream = {k: v for k, v in body.items() if k != "encoding_format"}
    reply = await fetch_json(url, headers=headers, timeout=timeout or provider.timeout, target=provider.name(),
                             secrets=(key,) if key else (), body=_json.dumps({**upstream, "model": model}))
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        raise GatewayError(502, f"{provider.name()} answered embeddings without a 'data' list",
                           type="upstream_error")
    as_base64 = body.get("encoding_format") == "base64"
    return {**reply, "model": public_id, "data": [_flat(item, as_base64, provider.name()) for item in data]}


def _serving(provider: type[Provider], model: str) -> tuple[type[Provider], str]:
    """The provider and model that answer: a model group's first target (groups route chat calls only)."""
    if issubclass(provider, RoutedProvider) and provider.providers:
        target = provider.providers[0]
        return target, target.get_model(None)
    return provider, model


def _flat(item: Any, as_base64: bool, name: str) -> Any:
    vector = item.get("embedding") if isinstance(item, dict) else None
    if not isinstance(vector, list):
        return item
    try:
        if vector and isinstance(vector[0], list):
            vector = mean_pool(vector)
        packed = array.array("f" if as_base64 else "d", vector)  # in C: every element a number, or TypeError
    except (TypeError, ValueError, OverflowError):
        raise GatewayError(502, f"{name} answered an embedding that is not a list of numbers (nor of equally "
                                "long lists of numbers)", type="upstream_error") from None
    if as_base64:  # OpenAI's base64 format: little-endian float32
        return {**item, "embedding": base64.b64encode(packed.tobytes()).decode("ascii")}
    return {**item, "embedding": vector}


def mean_pool(vectors: list[list[float]]) -> list[float]:
    """The element-wise mean of per-token vectors: one vector for the whole input."""
    count = len(vectors)
    return [sum(column) / count for column in zip(*vectors, strict=True)]
