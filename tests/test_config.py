"""The configuration file: parsing, its error messages (golden), ``netfly config check``."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest

from netfly.config import ConfigFileError, load_config, parse_config
from netfly.gateway.groups import ConfigRouter

from .test_cli import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"

BROKEN = """\
[server]
port = 70000
prot = 1

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[providers.vllm]
url = "localhost:8000"

[models.fast]
strategy = "hedge"
targets = [{ provider = "openai", model = "gpt-4o-mini" }, { provider = "groq", weight = 0 }]

[models.smart]
strategy = "quickest"
targets = []

[keys.alice]
sha256 = "not-a-digest"
rpm = 0

[keys.bob]
models = ["fast"]
"""

GOLDEN = [
    "F: server.port: Input should be less than or equal to 65535",
    "F: server.prot: unknown key (misspelt?)",
    "F: providers.vllm.url: must be an http:// or https:// URL with a host, got 'localhost:8000'",
    "F: models.fast.targets[1].provider: no provider 'groq' in [providers] (declared: openai, vllm)",
    "F: models.fast.targets[1].weight: Input should be greater than 0",
    'F: models.fast.hedge_after: strategy "hedge" needs hedge_after, the seconds to wait before asking the next target',
    "F: models.smart.targets: List should have at least 1 item after validation, not 0",
    "F: models.smart.strategy: Input should be 'ordered', 'weighted', 'fastest', 'hedge' or 'least-busy'",
    "F: keys.alice.sha256: must be the 64 hex digits of the key's SHA-256 (printf %s KEY | sha256sum)",
    "F: keys.alice.rpm: Input should be greater than or equal to 1",
    'F: keys.bob.key_env: a key needs sha256 = "..." or key_env = "VARIABLE"',
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netfly.toml"
    path.write_text(text)
    return path


def readme_example() -> str:
    """The complete example file of README.md (the ```toml block after "## Run it for a team")."""
    text = README.read_text()
    found = re.search(r"## Run it for a team.*?```toml\n(.*?)```", text, re.S)
    assert found, "README.md has no toml example under 'Run it for a team'"
    return found.group(1)


def test_every_problem_is_reported_with_file_key_path_and_problem(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    with pytest.raises(ConfigFileError) as caught:
        load_config(path)
    assert sorted(caught.value.problems) == sorted(line.replace("F:", f"{path}:", 1) for line in GOLDEN)
    assert str(caught.value).splitlines() == caught.value.problems


def test_cross_section_problems(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"k").hexdigest()
    text = f"""
[providers.a]
url = "http://127.0.0.1:9"
[models.fast]
targets = [{{ provider = "a" }}]
aliases = ["quick", "fast"]
[keys.one]
sha256 = "{digest}"
models = ["fast", "slow"]
[keys.two]
sha256 = "{digest.upper()}"
"""
    with pytest.raises(ConfigFileError) as caught:
        load_config(write(tmp_path, text))
    where = str(tmp_path / "netfly.toml")
    assert caught.value.problems == [
        f"{where}: models.fast.aliases[1]: 'fast' already names another model",
        f"{where}: keys.one.models[1]: no model 'slow' in [models]",
        f"{where}: keys.two: the same key as keys.one",
    ]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"netfly\.toml: not valid TOML: .*line 1"):
        load_config(write(tmp_path, "[server\nport = 1\n"))
    with pytest.raises(ConfigFileError, match=r"nope\.toml: cannot read the file: No such file or directory"):
        load_config(tmp_path / "nope.toml")


def test_secrets_come_from_the_environment_and_stay_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-config-secret-81f")
    monkeypatch.setenv("ALICE_KEY", "nf-alice-key-55c")
    config = parse_config({
        "providers": {"a": {"url": "http://127.0.0.1:9", "api_key": "${UPSTREAM_KEY}",
                            "headers": {"x-team": "t-${UPSTREAM_KEY}"}}},
        "keys": {"alice": {"key_env": "ALICE_KEY"}},
    }, "F")
    assert config.providers["a"].api_key == "sk-config-secret-81f"
    assert config.providers["a"].headers == {"x-team": "t-sk-config-secret-81f"}
    assert config.keys["alice"].digest() == hashlib.sha256(b"nf-alice-key-55c").hexdigest()
    assert "sk-config-secret-81f" not in repr(config) and "nf-alice-key-55c" not in repr(config)
    monkeypatch.delenv("UPSTREAM_KEY")
    monkeypatch.delenv("ALICE_KEY")
    with pytest.raises(ConfigFileError) as caught:
        parse_config({"providers": {"a": {"url": "http://127.0.0.1:9", "api_key": "${UPSTREAM_KEY}"}},
                      "keys": {"alice": {"key_env": "ALICE_KEY"}}}, "F")
    assert caught.value.problems == [
        "F: providers.a.api_key: environment variable UPSTREAM_KEY is not set",
        "F: keys.alice.key_env: environment variable ALICE_KEY is not set",
    ]


def test_the_readme_example_is_valid_and_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OPENAI_API_KEY", "GROQ_API_KEY", "NETFLY_KEY_CI", "NETFLY_METRICS_TOKEN"):
        monkeypatch.setenv(variable, f"value-of-{variable}")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    config = parse_config(tomllib.loads(readme_example()), "README.md")
    router = ConfigRouter(config)
    assert set(router.groups) == set(config.models) and len(config.keys) >= 2
    for alias, name in router.aliases.items():
        assert router.resolve(alias).public_id == name


async def test_config_check_command(tmp_path: Path) -> None:
    code, out, err = await run_cli("config", "check", str(write(tmp_path, BROKEN)))
    assert code == 2 and out == ""
    assert sorted(err.splitlines()) == sorted(
        "netfly: " + line.replace("F:", f"{tmp_path / 'netfly.toml'}:", 1) for line in GOLDEN
    )
    good = write(tmp_path, '[providers.a]\nurl = "http://127.0.0.1:9"\n[models.m]\ntargets = [{provider = "a"}]\n')
    code, out, err = await run_cli("config", "check", str(good))
    assert (code, out, err) == (0, f"{good}: OK: 1 provider, 1 model, 0 keys\n", "")


async def test_serve_refuses_an_invalid_file(tmp_path: Path) -> None:
    code, out, err = await run_cli("serve", "--config", str(write(tmp_path, BROKEN)), "--port", "0")
    assert code == 2 and out == ""
    assert "server.prot: unknown key (misspelt?)" in err and "Traceback" not in err
