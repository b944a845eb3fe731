"""The memory configuration: validated at load, errors naming the file, the key and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, MemorySettings, load_config
from tests.harness import open_tenant, write_config

BASE = "http://127.0.0.1:9/v1"


def _load(tmp_path: Path, memory: dict, defaults: dict | None = None):
    sections = {"tenant_defaults": {"memory": defaults}} if defaults is not None else {}
    return load_config(write_config(tmp_path, {"t": open_tenant(BASE, memory=memory)}, **sections)).tenants["t"].memory


def test_defaults_and_key_by_key_merge(tmp_path: Path) -> None:
    assert _load(tmp_path, {}) == MemorySettings()
    merged = _load(tmp_path, {"top_k": 8}, defaults={"scope": "tenant", "top_k": 3, "procedural": ["Be brief."]})
    assert (merged.scope, merged.top_k, merged.procedural) == ("tenant", 8, ("Be brief.",))


@pytest.mark.parametrize(("memory", "message"), [
    ({"scope": "everyone"}, r"t\.yaml: memory\.scope: must be one of user, session, tenant"),
    ({"anonymous": "guest"}, r"memory\.anonymous: must be one of session, shared"),
    ({"top_k": 0}, r"memory\.top_k: must be an integer between 1 and 100"),
    ({"min_score": "high"}, r"memory\.min_score: must be a number between -1 and 1"),
    ({"recency_half_life_days": 0}, r"memory\.recency_half_life_days: must be null or a number of days above 0"),
    ({"latency_budget_ms": 0}, r"memory\.latency_budget_ms: must be an integer between 1 and 60000"),
    ({"enabled": "yes"}, r"memory\.enabled: must be true or false"),
    ({"procedural": "Be brief."}, r"memory\.procedural: must be a list"),
    ({"colour": "blue"}, r"memory\.colour: unknown key"),
])
def test_invalid_values_name_file_key_and_rule(tmp_path: Path, memory: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, memory)


def test_embedder_must_be_local_or_a_model_alias(tmp_path: Path) -> None:
    tenant = open_tenant(BASE, memory={"embedder": "embed"})
    tenant["models"] = {"chat": {"model": "openai/gpt-4o-mini", "api_base": BASE}}
    with pytest.raises(ConfigError, match=r"t\.yaml: memory\.embedder: must be 'local', 'local-exact' or a model alias of this tenant"):
        load_config(write_config(tmp_path, {"t": tenant}))
    tenant["models"]["embed"] = {"model": "openai/text-embedding-3-small", "api_base": BASE}
    assert load_config(write_config(tmp_path, {"t": tenant})).tenants["t"].memory.embedder == "embed"
    for local in ("local", "local-exact"):
        tenant["memory"] = {"embedder": local}
        assert load_config(write_config(tmp_path, {"t": tenant})).tenants["t"].memory.embedder == local


def test_extraction_and_ttl_keys(tmp_path: Path) -> None:
    assert (MemorySettings().extract, MemorySettings().extractor_model, MemorySettings().ttl_seconds("semantic")) == (False, None, None)
    ruled = _load(tmp_path, {"extract": True, "ttl": {"semantic": 30, "procedural": None}})
    assert (ruled.extract, ruled.extractor_model, ruled.ttl_seconds("semantic"), ruled.ttl_seconds("procedural")) == (True, None, 30 * 86400.0, None)
    modelled = _load(tmp_path, {"extractor_model": "small"})  # a model implies extraction
    assert (modelled.extract, modelled.extractor_model) == (True, "small")
    assert _load(tmp_path, {"extractor_model": "small", "extract": False}).extract is False
    assert MemorySettings().backfill_per_minute == 10 and _load(tmp_path, {"backfill_per_minute": 0}).backfill_per_minute == 0
    tenant = open_tenant(BASE, memory={"extractor_model": "small"})
    tenant["models"] = {"chat": {"model": "openai/gpt-4o-mini", "api_base": BASE}}
    with pytest.raises(ConfigError, match=r"t\.yaml: memory\.extractor_model: 'small' is not a model alias of this tenant"):
        load_config(write_config(tmp_path, {"t": tenant}))


@pytest.mark.parametrize(("memory", "message"), [
    ({"ttl": {"facts": 3}}, r"memory\.ttl\.facts: unknown key \(allowed: episodic, procedural, semantic\)"),
    ({"ttl": [3]}, r"memory\.ttl: must be a mapping"),
    ({"ttl": {"semantic": 0}}, r"memory\.ttl\.semantic: must be null or a number of days above 0"),
    ({"ttl": {"semantic": True}}, r"memory\.ttl\.semantic: must be null or a number of days above 0"),
    ({"extractor_model": ""}, r"memory\.extractor_model: must be null or a model alias"),
    ({"extract": "yes"}, r"memory\.extract: must be true or false"),
    ({"backfill_per_minute": -1}, r"memory\.backfill_per_minute: must be an integer between 0 and 6000"),
    ({"backfill_per_minute": 6001}, r"memory\.backfill_per_minute: must be an integer between 0 and 6000"),
    ({"backfill_per_minute": 2.5}, r"memory\.backfill_per_minute: must be an integer between 0 and 6000"),
])
def test_invalid_extraction_values(tmp_path: Path, memory: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, memory)
