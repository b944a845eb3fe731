"""Loading: proxy.yaml and tenants/*.yaml (yaml.safe_load), CLI overrides, validated into one Config."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from proxy.config.errors import ConfigError, validate
from proxy.config.process import Config, ProxyFile
from proxy.config.tenant import TenantConfig

# The tenant `agent-state-proxy serve` runs with when there are no tenant files (config/tenants/default.yaml).
DEFAULT_TENANT: dict[str, Any] = {
    "name": "default",
    "allow_unauthenticated": True,
    "models": {
        "*": {
            "model": "openai/{model}",
            "api_base": "${ASP_UPSTREAM_BASE:-https://api.openai.com/v1}",
            "api_key_env": "OPENAI_API_KEY",
        }
    },
}
# Sections a tenant file merges key by key over tenant_defaults (any other key replaces the default).
_MERGED = ("sessions", "quotas", "context", "memory", "limits")


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate configuration.

    ``path`` is proxy.yaml; its tenants live in ``tenants/`` beside it. Without a path, the
    embedded defaults are used (one open tenant on localhost). ``overrides`` come from CLI flags.
    """
    doc: dict[str, Any] = {}
    tenant_docs: list[tuple[str, dict[str, Any]]] = []
    source = "embedded defaults"
    tenants_dir: Path | None = None
    if path is not None:
        file = Path(path)
        source = str(file)
        doc = _read_yaml(file)
        tenants_dir = file.parent / str(doc.get("tenants_dir", "tenants"))
        if tenants_dir.is_dir():
            for tenant_file in sorted(tenants_dir.glob("*.yaml")) + sorted(tenants_dir.glob("*.yml")):
                tenant_docs.append((str(tenant_file), {"name": tenant_file.stem} | _read_yaml(tenant_file)))
    if not tenant_docs:
        tenant_docs.append(("embedded default tenant", copy.deepcopy(DEFAULT_TENANT)))
    doc, tenant_docs = _apply_overrides(doc, tenant_docs, dict(overrides or {}))
    settings = validate(ProxyFile, doc, source)
    tenants: dict[str, TenantConfig] = {}
    files: dict[str, str] = {}
    for file_name, tenant_doc in tenant_docs:
        tenant = validate(TenantConfig, _merge(settings.tenant_defaults, tenant_doc), file_name)
        if tenant.name in tenants:
            raise ConfigError(f"{file_name}: name: tenant {tenant.name!r} is defined twice")
        tenants[tenant.name], files[tenant.name] = tenant, file_name
    for tenant in tenants.values():
        if settings.server.operator_key_sha256 & tenant.api_key_hashes:
            raise ConfigError(f"{source}: server.operator_key_sha256: a key of tenant {tenant.name!r} cannot also be an operator key")
    return Config(server=settings.server, storage=settings.storage, tenants=tenants, tenant_files=files,
                  source=source, tenants_dir=tenants_dir)


def _apply_overrides(doc: dict[str, Any], tenant_docs: list[tuple[str, dict[str, Any]]],
                     overrides: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """CLI flags over the files: they are validated with them, and named as the file's keys."""
    doc = copy.deepcopy(doc)

    def section(name: str) -> dict[str, Any]:
        value = doc.setdefault(name, {})
        return value if isinstance(value, dict) else {}  # not a mapping: validation names it

    if overrides.get("allowed_clients") is not None:
        # $ASP_ALLOW_CLIENTS (e.g. the Docker bridge network): the default for every tenant
        # that does not list its own.
        section("tenant_defaults")["allowed_clients"] = list(overrides["allowed_clients"])
    for key in ("host", "port"):
        if overrides.get(key) is not None:
            section("server")[key] = overrides[key]
    if overrides.get("data_dir") is not None:
        section("storage")["data_dir"] = overrides["data_dir"]
    if overrides.get("model"):
        # Like `litellm --model`: every requested model name goes to this one model.
        route = {"model": overrides["model"]}
        if overrides.get("api_base"):
            route["api_base"] = overrides["api_base"]
        route["api_key_env"] = _provider_key_env(overrides["model"])
        default = next((d for _, d in tenant_docs if d.get("name") == "default"), None)
        if default is None:
            default = copy.deepcopy(DEFAULT_TENANT)
            tenant_docs = [*tenant_docs, ("--model", default)]
        default["models"] = {"*": route}
    return doc, tenant_docs


def _merge(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The tenant's file over tenant_defaults; the _MERGED sections merge key by key."""
    merged = copy.deepcopy(defaults) | own
    for key in _MERGED:
        if key in defaults and key in own:
            base, mine = defaults[key], own[key]
            if isinstance(base, dict) and isinstance(mine, dict):
                merged[key] = base | mine
            elif key != "context" and not isinstance(base, dict):
                merged[key] = base  # not a mapping: its error (context: the tenant's value replaces "off")
    return merged


def _provider_key_env(model: str) -> str:
    provider = model.split("/", 1)[0] if "/" in model else "openai"
    return {
        "anthropic": "ANTHROPIC_API_KEY",
        "gemini": "GEMINI_API_KEY",
        "mistral": "MISTRAL_API_KEY",
        "groq": "GROQ_API_KEY",
        "together_ai": "TOGETHERAI_API_KEY",
        "openrouter": "OPENROUTER_API_KEY",
        "deepseek": "DEEPSEEK_API_KEY",
        "azure": "AZURE_API_KEY",
    }.get(provider, "OPENAI_API_KEY")


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{file}: top level must be a mapping")
    return doc
