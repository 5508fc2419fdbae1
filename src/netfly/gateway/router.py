"""Which provider and model a request's ``model`` field means.

``"provider/model"`` picks a provider by name (case-insensitive); anything else is a model of the
default provider. Only the providers the operator gave are reachable: never a built-in preset that
was not named (it would spend the operator's keys, or reach their machine's ports). A model whose
own name starts with a provider name and a slash (say ``openai/gpt-oss-20b`` on a vLLM server) is
reached through the default provider's prefix: ``OpenAICompatible/openai/gpt-oss-20b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigurationError, ModelNotSupportedError, NetflyError
from ..provider import Provider
from .errors import GatewayError


@dataclass(frozen=True)
class Route:
    provider: type[Provider]
    model: str  # the name sent upstream
    public_id: str  # the name the client sees in responses and in /v1/models


class ModelRouter:
    def __init__(self, default: type[Provider], providers: Mapping[str, type[Provider]] | None = None) -> None:
        self.default = default
        self.providers: dict[str, type[Provider]] = {name.lower(): p for name, p in (providers or {}).items()}
        self.providers[default.name().lower()] = default  # the configured one wins over a registry namesake

    def resolve(self, model: str | None, *, param: str = "model") -> Route:
        """The route for ``model``; :class:`GatewayError` (400, naming ``param``) when there is none."""
        prefix, slash, rest = (model or "").partition("/")
        provider = self.providers.get(prefix.lower()) if slash else None
        try:
            if provider is not None:
                resolved = provider.get_model(rest or None)
                return Route(provider, resolved, f"{provider.name()}/{resolved}")
            resolved = self.default.get_model(model or None)
            return Route(self.default, resolved, resolved)
        except ModelNotSupportedError as exc:
            message = str(exc)
            if slash and provider is None:
                message += f"; nor is {prefix!r} a provider (known: {', '.join(self.names())})"
            raise GatewayError(400, message, param=param, code="model_not_found") from None
        except ConfigurationError as exc:
            raise GatewayError(400, str(exc), param=param) from None

    def names(self) -> list[str]:
        return sorted(p.name() for p in self.providers.values())

    async def model_ids(self) -> list[tuple[str, str]]:
        """``(id, owner)`` of every model: the default provider's bare, then every provider's prefixed."""
        listed = {p: await _models_of(p) for p in self.providers.values()}
        ids = [(model, self.default.name()) for model in listed[self.default]]
        for provider in sorted(listed, key=lambda p: p.name().lower()):
            ids.extend((f"{provider.name()}/{model}", provider.name()) for model in listed[provider])
        return ids


async def _models_of(provider: type[Provider]) -> list[str]:
    """The declared models, else the upstream's own ``GET /v1/models`` list, else the default model."""
    try:
        return await provider.list_models()
    except NetflyError:
        pass  # an upstream without a model list (or down): its default model stands for "any name"
    try:
        return [provider.get_model(None)]  # get_model: Local knows its model's name from its configuration
    except ConfigurationError:  # no default model, or a provider that cannot run here
        return []
