"""The gateway's configuration file (``netfly serve --config netfly.toml``): schema and loading.

The schema is pydantic models; every problem is reported as ``FILE: key.path[1].field: problem``
and nothing starts. Secrets are read from the environment: ``api_key_env = "VAR"``, or ``"${VAR}"``
in ``api_key``, ``headers`` values and ``keys.*.key``. Building providers and model groups from a
loaded file is :mod:`netfly.gateway.groups`'s job.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigFileError", "KeyConfig", "ModelGroupConfig", "NetflyConfig", "ProviderConfig", "ServerConfig",
    "StateConfig", "TargetConfig", "load_config", "parse_config",
]

STRATEGIES = ("ordered", "weighted", "fastest", "hedge", "least-busy")
Strategy = Literal["ordered", "weighted", "fastest", "hedge", "least-busy"]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ConfigFileError(ConfigurationError):
    """A configuration file that cannot be used; ``problems`` are its lines, one per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt "rpm" must not silently mean "no limit".
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutConfig(_Section):
    connect: PositiveFloat | None = 10.0
    idle: PositiveFloat | None = 60.0
    total: PositiveFloat | None = None


class ProviderConfig(_Section):
    """``[providers.NAME]``: one upstream."""

    kind: str = "openai-compatible"  # or "local", or a preset: "openai", "ollama", "freenetfly"
    url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = Field(default=None, repr=False)  # "${VAR}"; a literal key belongs in the environment
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    models: list[str] = Field(default_factory=list)
    default_model: str | None = None
    timeout: PositiveFloat | TimeoutConfig | None = None
    retries: PositiveInt | None = None
    retry_delay: Annotated[float, Field(ge=0)] | None = None
    proxy: str | None = Field(default=None, repr=False)  # may hold a password

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from .providers import provider_names

        known = ["openai-compatible", *sorted(n.lower() for n in provider_names())]
        if kind.lower() not in known:
            raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(known)}")
        return kind.lower()

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url

    @field_validator("api_key")
    @classmethod
    def _expand_key(cls, value: str | None) -> str | None:
        return None if value is None else expand_env(value)

    @field_validator("headers")
    @classmethod
    def _expand_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return {name: expand_env(value) for name, value in headers.items()}

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, proxy: str | None) -> str | None:
        from .transport import Proxy

        if proxy is None:
            return None
        expanded = expand_env(proxy)
        Proxy.parse(expanded)  # its ConfigurationError is a ValueError: reported at this key's path
        return expanded


class TargetConfig(_Section):
    """One upstream of a model group: a provider of the file and the model name it is asked for."""

    provider: str
    model: str | None = None  # default: the provider's default model
    weight: PositiveFloat = 1.0

    @field_validator("provider")
    @classmethod
    def _declared(cls, name: str, info: ValidationInfo) -> str:
        declared = (info.context or {}).get("providers")
        if declared is not None and name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ValueError(f"no provider {name!r} in [providers] (declared: {known})")
        return name


class ModelGroupConfig(_Section):
    """``[models.PUBLIC]``: the public model name clients ask for, served by ``targets``."""

    targets: list[TargetConfig] = Field(min_length=1)
    strategy: Strategy = "ordered"
    hedge_after: PositiveFloat | None = Field(default=None, validate_default=True)
    aliases: list[str] = Field(default_factory=list)
    failure_threshold: PositiveInt | None = 3
    cooldown: Annotated[float, Field(ge=0)] = 30.0
    retries: PositiveInt | None = None  # attempts each target gets (default: the provider's own)

    @field_validator("hedge_after")
    @classmethod
    def _hedge_needs_delay(cls, value: float | None, info: ValidationInfo) -> float | None:
        if info.data.get("strategy") == "hedge" and value is None:
            raise ValueError('strategy "hedge" needs hedge_after, the seconds to wait before asking the next target')
        return value


class KeyConfig(_Section):
    """``[keys.NAME]``: one client key, given as its SHA-256 or read from the environment."""

    sha256: str | None = None
    key_env: str | None = Field(default=None, validate_default=True)
    models: list[str] | None = None  # public models it may use; default: all
    rpm: PositiveInt | None = None  # requests per minute
    tpm: PositiveInt | None = None  # tokens per minute
    max_streams: PositiveInt | None = None  # requests in flight at once
    admin: bool = False  # may call /admin/*

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256.match(digest.lower()):
            raise ValueError("must be the 64 hex digits of the key's SHA-256 (printf %s KEY | sha256sum)")
        return None if digest is None else digest.lower()

    @field_validator("key_env", mode="after")
    @classmethod
    def _set_in_environment(cls, name: str | None, info: ValidationInfo) -> str | None:
        if "sha256" not in info.data:
            return name  # sha256 is invalid and reported already
        if name is not None and not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set")
        if name is None and info.data.get("sha256") is None:
            raise ValueError("a key needs sha256 = \"...\" or key_env = \"VARIABLE\"")
        if name is not None and info.data.get("sha256") is not None:
            raise ValueError("give sha256 or key_env, not both")
        return name

    def digest(self) -> str:
        """The SHA-256 hex digest a presented key must match."""
        if self.sha256 is not None:
            return self.sha256
        return hash_key(os.environ.get(self.key_env or "", ""))


class ServerConfig(_Section):
    """``[server]``: where and how the gateway listens."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    cors_origins: list[str] | None = None  # browser origins allowed; default: any ("*"); []: no CORS
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    timeout: PositiveFloat | None = None  # total time of one upstream call, retries included
    log_format: Literal["text", "json"] = "text"
    log_content: bool = False
    metrics: bool = True  # serve GET /metrics
    metrics_token_env: str | None = None  # /metrics then needs "Authorization: Bearer $VAR"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # serve /metrics on its own port


class StateConfig(_Section):
    """``[state]``: where the state shared by several gateway processes lives (Redis or Valkey)."""

    url: str | None = Field(default=None, repr=False)  # redis://host:port/db; may hold a password
    timeout: PositiveFloat = 0.025  # seconds per state call, then this process's memory serves
    lease_ttl: PositiveFloat = 30.0  # seconds a dead process's stream slots stay taken

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        expanded = expand_env(url)
        if not re.match(r"^(rediss?://[^/\s]*|unix://\S+)", expanded):
            raise ValueError("must be a redis://host:port/db, rediss:// or unix:// URL")
        return expanded


class NetflyConfig(_Section):
    """The whole file."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelGroupConfig] = Field(default_factory=dict)
    keys: dict[str, KeyConfig] = Field(default_factory=dict)


def hash_key(key: str) -> str:
    # surrogateescape: a header that is not UTF-8 hashes as the bytes it is (then matches nothing).
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def expand_env(value: str) -> str:
    """``${VAR}`` replaced by the variable's value; a ``ValueError`` names a variable not set."""

    def lookup(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if found is None:
            raise ValueError(f"environment variable {match.group(1)} is not set")
        return found

    return _ENV_REFERENCE.sub(lookup, value)


def load_config(path: str | os.PathLike[str]) -> NetflyConfig:
    """Read and validate a TOML file; :class:`ConfigFileError` lists every problem."""
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigFileError([f"{where}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError([f"{where}: not valid TOML: {exc}"]) from None
    return parse_config(data, where)


def parse_config(data: Mapping[str, Any], where: str = "<config>") -> NetflyConfig:
    """Validate already-parsed data (a TOML document as a dict)."""
    providers = data.get("providers")
    context = {"providers": set(providers) if isinstance(providers, dict) else set()}
    try:
        config = NetflyConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigFileError([f"{where}: {_path(e['loc'])}: {_problem(e)}" for e in exc.errors()]) from None
    problems = [f"{where}: {path}: {problem}" for path, problem in _cross_checks(config)]
    if problems:
        raise ConfigFileError(problems)
    return config


def _cross_checks(config: NetflyConfig) -> list[tuple[str, str]]:
    """What one section says about another, beyond what each section's schema can see."""
    problems: list[tuple[str, str]] = []
    public: dict[str, str] = {}
    for name, group in config.models.items():
        for index, alias in enumerate(group.aliases):
            if alias in config.models or alias in public:
                problems.append((f"models.{name}.aliases[{index}]", f"{alias!r} already names another model"))
            public[alias] = name
    for name, key in config.keys.items():
        for index, model in enumerate(key.models or ()):
            if config.models and model not in config.models and model not in public:
                problems.append((f"keys.{name}.models[{index}]", f"no model {model!r} in [models]"))
    digests: dict[str, str] = {}
    for name, key in config.keys.items():
        digest = key.digest()
        if digest in digests:
            problems.append((f"keys.{name}", f"the same key as keys.{digests[digest]}"))
        digests[digest] = name
    return problems


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(error: Any) -> str:
    message = str(error["msg"])
    if message.startswith("Value error, "):  # a validator's ValueError: its message is the problem
        message = message[len("Value error, "):]
    if error["type"] == "extra_forbidden":
        return "unknown key (misspelt?)"
    return message
