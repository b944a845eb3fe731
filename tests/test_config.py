"""Configuration loading and validation: every error names the file, the key and the rule."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from proxy.config import ConfigError, hash_key, load_config
from tests.harness import REPO, keyed_tenant, open_tenant, write_config


def test_embedded_defaults_have_one_open_local_tenant() -> None:
    config = load_config(None)
    assert list(config.tenants) == ["default"]
    tenant = config.tenants["default"]
    assert tenant.admits_anonymous("127.0.0.1") and not tenant.admits_anonymous("10.0.0.5")
    assert config.port == 8765 and config.host == "127.0.0.1"


def test_repository_config_matches_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASP_UPSTREAM_BASE", raising=False)
    from_files, embedded = load_config(REPO / "config" / "proxy.yaml"), load_config(None)
    assert from_files.tenants["default"].route("gpt-4o") == embedded.tenants["default"].route("gpt-4o")
    assert (from_files.port, from_files.max_body_bytes, from_files.map_size) == (embedded.port, embedded.max_body_bytes, embedded.map_size)
    assert from_files.transcript_cache_messages == embedded.transcript_cache_messages == 50_000


def test_example_tenant_works_once_renamed_and_its_comment_key_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("AZURE_API_BASE", "AZURE_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret-1234")
    shutil.copytree(REPO / "config", tmp_path / "config")
    example = tmp_path / "config" / "tenants" / "example-team.yaml.example"
    example.rename(example.with_suffix(""))
    config = load_config(tmp_path / "config" / "proxy.yaml")
    team = config.tenants["example-team"]
    assert team.concurrency == "reject"
    assert not team.route("claude").direct and team.route("gpt-4o-mini").direct
    # The key its comment names is the one its digest admits.
    commented = re.search(r"hash-key '([^']+)'", example.with_suffix("").read_text()).group(1)
    assert config.tenant_for_key(commented) is team
    assert "sk-openai-secret" not in repr(config)
    # check-config names the one variable still missing; with it set, the example passes.
    assert main(["check-config", "--config", str(tmp_path / "config" / "proxy.yaml")]) == 2
    assert "example-team.yaml: models.claude.api_key_env: ANTHROPIC_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-1234")
    assert main(["check-config", "--config", str(tmp_path / "config" / "proxy.yaml")]) == 0


def test_env_interpolation_and_key_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MY_KEY", "sk-from-env-123456")
    path = write_config(tmp_path, {"t": {"allow_unauthenticated": True, "models": {"m": {"model": "openai/x", "api_base": "${UP}", "api_key_env": "MY_KEY"}}}})
    route = load_config(path).tenants["t"].route("m")
    assert route.api_base == "http://127.0.0.1:9/v1" and route.api_key == "sk-from-env-123456"
    assert "sk-from-env" not in repr(route)


def test_tenant_key_lookup(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"a": keyed_tenant("http://h/v1", "key-a"), "b": keyed_tenant("http://h/v1", "key-b")})
    config = load_config(path)
    assert config.tenant_for_key("key-b").name == "b"
    assert config.tenant_for_key("nope") is None and config.anonymous_tenant("127.0.0.1") is None


def test_cli_model_flag_routes_every_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "anthropic-secret")
    config = load_config(None, {"model": "anthropic/claude-x", "port": 9100})
    route = config.tenants["default"].route("whatever-the-agent-asks")
    assert route.model == "anthropic/claude-x" and not route.direct and route.api_key == "anthropic-secret"
    assert config.port == 9100


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ({"models": {"m": "openai/x"}}, "api_key_sha256: a tenant needs a key"),
        ({"allow_unauthenticated": True, "models": {}}, "models: must map at least one"),
        ({"allow_unauthenticated": True, "history": "sometimes", "models": {"m": "x"}}, "history: must be one of"),
        ({"allow_unauthenticated": True, "models": {"m": {"model": "x", "api_base": "ftp://x"}}}, "models.m.api_base: must be an http(s) URL"),
        ({"allow_unauthenticated": True, "models": {"m": {"model": "x", "colour": 1}}}, "models.m.colour: unknown key"),
        ({"allow_unauthenticated": "yes", "models": {"m": "x"}}, "allow_unauthenticated: must be true or false"),
        ({"allow_unauthenticated": True, "ignore_client_keys": "sometimes", "models": {"m": "x"}}, "ignore_client_keys: must be auto, true or false"),
        ({"allow_unauthenticated": True, "models": {"m": {"model": "x", "api_key_env": "not a name"}}}, "models.m.api_key_env: must be an environment variable name"),
        ({"allow_unauthenticated": True, "session_ttl_seconds": -1, "models": {"m": "x"}}, "session_ttl_seconds: must be an integer"),
        ({"api_key_sha256": ["plaintext-key"], "models": {"m": "x"}}, "api_key_sha256: must be a list of lowercase sha256"),
        ({"allow_unauthenticated": True, "models": {"m": {"model": "x", "api_base": "${NOT_SET_ANYWHERE}"}}}, "environment variable NOT_SET_ANYWHERE is not set"),
    ],
)
def test_invalid_tenant_names_file_key_and_rule(tmp_path: Path, tenant: dict, message: str) -> None:
    path = write_config(tmp_path, {"bad": tenant})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert "bad.yaml" in str(error.value)


def test_invalid_proxy_yaml(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"t": open_tenant("http://h/v1")}, server={"port": "eighty"})
    with pytest.raises(ConfigError, match=r"proxy.yaml: server.port: must be an integer"):
        load_config(path)
    path = write_config(tmp_path, {"t": open_tenant("http://h/v1")}, storage={"data_dir": str(tmp_path), "transcript_cache_messages": -1})
    with pytest.raises(ConfigError, match=r"storage.transcript_cache_messages"):
        load_config(path)
    path = write_config(tmp_path, {"t": open_tenant("http://h/v1")}, storage={"data_dir": str(tmp_path), "transcript_cache_messages": 0})
    assert load_config(path).transcript_cache_messages == 0  # 0: every request decodes its transcript
    fleet = {"data_dir": str(tmp_path), "backend": "postgres", "postgres": {"dsn": "postgresql://db/state", "replicas": "all"}}
    path = write_config(tmp_path, {"t": open_tenant("http://h/v1")}, storage=fleet)
    with pytest.raises(ConfigError, match=r"proxy.yaml: storage.postgres.replicas: .*one.*many"):
        load_config(path)
    fleet["postgres"]["replicas"] = "many"
    assert load_config(write_config(tmp_path, {"t": open_tenant("http://h/v1")}, storage=fleet)).postgres.replicas == "many"
    del fleet["postgres"]["replicas"]
    assert load_config(write_config(tmp_path, {"t": open_tenant("http://h/v1")}, storage=fleet)).postgres.replicas == "one"
    path.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    path.write_text("server: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path / "good", {"t": open_tenant("http://h/v1")})
    assert main(["check-config", "--config", str(good)]) == 0
    assert "1 tenant(s): t" in capsys.readouterr().out
    bad = write_config(tmp_path / "bad", {"t": {"models": {"m": "x"}}})
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "t.yaml: api_key_sha256" in capsys.readouterr().err


def test_hash_key_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "secret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("secret")
    assert yaml.safe_load(f"- {hash_key('secret')}") == [hash_key("secret")]


def _stated(model: type, doc: dict, where: str) -> None:
    """Every key of ``model`` is stated in ``doc``, and each stated value is the model's default."""
    from pydantic import BaseModel

    assert set(doc) == set(model.model_fields), f"{where}: proxy.yaml must show every option"
    defaults = model.model_validate({k: v for k, v in doc.items() if not isinstance(v, dict)})
    for key, value in doc.items():
        field = model.model_fields[key]
        nested = next((t for t in getattr(field.annotation, "__args__", (field.annotation,))
                       if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if isinstance(value, dict) and nested is not None:
            _stated(nested, value, f"{where}.{key}")
        else:
            assert getattr(defaults, key) == field.get_default(call_default_factory=True), f"{where}.{key}"


def test_shipped_proxy_yaml_shows_every_option_with_the_models_default() -> None:
    """config/proxy.yaml documents the defaults; the models are their one source. A value changed
    in one but not the other, or an option missing from the file, fails here."""
    from proxy.config import ContextSettings, MemorySettings, Persistence, QuotaSettings, RequestLimits, SessionSettings
    from proxy.config.process import ProxyFile, ServerSettings, StorageSettings
    from proxy.config.tenant import TenantConfig

    doc = yaml.safe_load((REPO / "config" / "proxy.yaml").read_text())
    assert set(doc) == set(ProxyFile.model_fields)
    assert doc["tenants_dir"] == ProxyFile.model_fields["tenants_dir"].default
    _stated(ServerSettings, doc["server"], "server")
    _stated(StorageSettings, doc["storage"], "storage")
    tenant = dict(doc["tenant_defaults"])
    assert set(tenant) == set(TenantConfig.model_fields) - {"name"}
    assert tenant.pop("models") == {}  # every tenant names its own
    sections = {"persistence": Persistence, "sessions": SessionSettings, "quotas": QuotaSettings,
                "context": ContextSettings, "memory": MemorySettings, "limits": RequestLimits}
    for key, model in sections.items():
        _stated(model, tenant.pop(key), f"tenant_defaults.{key}")
    assert tenant.pop("allow_unauthenticated") is TenantConfig.model_fields["allow_unauthenticated"].default
    shown = TenantConfig.model_validate(tenant | {"name": "t", "models": {"m": "x"}, "allow_unauthenticated": True})
    for key in tenant:
        assert getattr(shown, key) == TenantConfig.model_fields[key].default, f"tenant_defaults.{key}"


def test_errors_never_show_a_key(tmp_path: Path) -> None:
    tenant = {"allow_unauthenticated": True, "models": {"m": {"model": "anthropic/x", "api_key": "sk-secret-987", "path": "direct"}}}
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, {"t": tenant}))
    assert "models.m.path: 'direct' needs an openai/ model" in str(error.value)
    assert "sk-secret-987" not in str(error.value) and error.value.__cause__ is None and error.value.__context__ is None
