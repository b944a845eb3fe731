"""Configuration: YAML files (proxy.yaml + tenants/*.yaml) validated into frozen values."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from proxy import protocol_fields
from proxy.context.settings import ContextSettings, parse as parse_context
from proxy.quotas import QuotaSettings, parse as parse_quotas
from proxy.litellm_params import is_litellm_param

HISTORY_MODES = ("auto", "client", "proxy")
CONCURRENCY_MODES = ("serialize", "reject")
HOSTED_TOOL_POLICIES = ("drop", "refuse")  # Responses API built-in tools: left out with a warning, or 400
UPSTREAM_PATHS = ("auto", "direct", "litellm")
PERSISTENCE_MODES = ("hybrid", "sync", "async", "checkpoint")
CRITICAL_KINDS = ("decision", "commitment", "preference", "fact", "tool_calls", "idempotent", "response_id", "all")
STORAGE_BACKENDS = ("lmdb", "postgres")
POSTGRES_REPLICAS = ("one", "many")  # many: fleet mode (cross-replica session locks, no caches)
IMPLICIT_MODES = ("new", "resume")
REVERTED_TURNS = ("drop", "keep")
MEMORY_SCOPES = ("user", "session", "tenant")
MEMORY_ANONYMOUS = ("session", "shared")
# The bundled all-MiniLM-L6-v2: int8 on ONNX Runtime (fast, the default) or float32 numpy (exact).
LOCAL_EMBEDDERS = ("local", "local-exact")
MEMORY_KEYS = {"enabled", "embedder", "scope", "anonymous", "episodic", "inject", "top_k", "min_score",
               "recency_half_life_days", "latency_budget_ms", "max_inject_tokens", "procedural",
               "extract", "extractor_model", "ttl"}
MEMORY_TTL_TYPES = ("episodic", "semantic", "procedural")
_TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # an upstream reply larger than this is refused (per tenant)

# The embedded defaults: what `agent-state-proxy serve` runs on when no config file is found.
# config/proxy.yaml and config/tenants/default.yaml in the repository spell out the same values.
DEFAULTS: dict[str, Any] = {
    "server": {
        "host": "127.0.0.1",
        "port": 8765,
        "max_body_bytes": 8 * 1024 * 1024,
        "janitor_interval_seconds": 300,
        # GET /metrics (Prometheus): readable with an operator key, or from loopback when no key is set.
        "metrics": {"enabled": True},
        "body_read_timeout_seconds": 30,
        "operator_key_sha256": [],
    },
    "storage": {"backend": "lmdb", "data_dir": "./data", "map_size_mb": 1024, "write_batch_size": 256, "flush_interval_ms": 50,
                "write_queue_max": 10000, "transcript_cache_messages": 50000,
                "postgres": {"dsn": "${DATABASE_URL}", "pool_size": 10, "statement_timeout_ms": 30000, "replicas": "one"},
                "backup": {"dir": None, "every_minutes": 60, "keep": 24}},
    "tenant_defaults": {
        "api_key_sha256": [],
        "allow_unauthenticated": False,
        "allowed_clients": ["127.0.0.1/32", "::1/128"],
        "ignore_client_keys": "auto",
        "session_ttl_seconds": 7 * 24 * 3600,
        "history": "auto",
        "concurrency": "serialize",
        "upstream_timeout_seconds": 600,
        "max_response_bytes": DEFAULT_MAX_RESPONSE_BYTES,
        "stateless": False,
        "hosted_tools": "drop",
        "persistence": {},
        "sessions": {},
        "quotas": {},
        "context": {},
        "memory": {},
        "limits": {},
        "passthrough_fields": [],
        "models": {},
    },
}
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


class ConfigError(ValueError):
    """A configuration value that breaks a rule; the message names file, key and rule."""


@dataclass(frozen=True)
class ModelRoute:
    """Where one model alias of a tenant goes upstream."""

    alias: str
    model: str  # litellm model string; may contain {model} for the "*" alias
    api_base: str | None
    api_key: str | None = field(repr=False)  # resolved at load, never logged
    path: str = "auto"  # auto | direct | litellm
    params: Mapping[str, Any] = field(default_factory=dict)  # extra litellm kwargs
    api_key_env: str | None = None  # the variable the key came from: named when it is unset
    passthrough: frozenset[str] = frozenset()  # the tenant's passthrough_fields

    def resolve(self, requested: str, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> ResolvedModel:
        model = self.model.replace("{model}", requested)
        direct_ok = model.startswith("openai/") and self.api_base is not None
        if self.path == "direct" and not direct_ok:
            raise ConfigError(f"model {self.alias!r}: path 'direct' needs an openai/ model and api_base")
        use_direct = self.path == "direct" or (self.path == "auto" and direct_ok and not self.params)
        return ResolvedModel(
            requested=requested,
            model=model,
            upstream_model=model.removeprefix("openai/"),
            api_base=self.api_base.rstrip("/") if self.api_base else None,
            api_key=self.api_key,
            direct=use_direct,
            params=self.params,
            max_response_bytes=max_response_bytes,
            passthrough=self.passthrough,
        )


@dataclass(frozen=True)
class ResolvedModel:
    requested: str
    model: str
    upstream_model: str
    api_base: str | None
    api_key: str | None = field(repr=False)
    direct: bool
    params: Mapping[str, Any]
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # the tenant's cap on one upstream reply (direct path)
    passthrough: frozenset[str] = frozenset()  # request fields forwarded beyond the protocol's


@dataclass(frozen=True)
class Persistence:
    """How a tenant's turns reach the disk (see README, Persistence)."""

    mode: str = "hybrid"  # hybrid | sync | async | checkpoint
    critical: frozenset[str] = frozenset({"decision", "commitment", "preference", "tool_calls", "idempotent", "response_id"})
    checkpoint_every_messages: int = 50
    checkpoint_every_seconds: float = 300.0
    keep_checkpoints: int = 5

    def durable(self, tags: set[str]) -> bool:
        """Whether a turn with these tags must be on disk before the response completes."""
        if self.mode == "sync":
            return True
        if self.mode != "hybrid":
            return False
        return "all" in self.critical or bool(tags & self.critical)


@dataclass(frozen=True)
class SessionSettings:
    """How requests map onto sessions beyond explicit ids (see README, Sessions)."""

    # new: an implicit session per conversation; resume: an agent (same key, system prompt, user,
    # tools) that restarts with no assistant turns continues its latest session within the window.
    implicit: str = "new"
    resume_within_seconds: int = 3600
    # drop: turns rolled back (or cut by a fork) that a client resends are not forwarded or
    # recorded again; keep: they are, as a new branch (the behaviour before rollbacks stuck).
    reverted_turns: str = "drop"


@dataclass(frozen=True)
class BackupSettings:
    """Scheduled online backups of the LMDB store by the serving process (docs/PERSISTENCE.md)."""

    dir: Path | None  # None: no scheduled backups
    every_minutes: float
    keep: int  # newest backups kept; older ones are deleted after each new one


@dataclass(frozen=True)
class RequestLimits:
    """How much one chat request may carry (README: Configuration); over a limit → 413."""

    max_messages: int = 4_096
    max_message_chars: int = 1_000_000  # text of one message: content, text parts, tool-call arguments
    max_total_chars: int = 4_000_000  # text of all the request's messages together


@dataclass(frozen=True)
class MemorySettings:
    """A tenant's long-term memory (see README, Memory)."""

    enabled: bool = True
    embedder: str = "local"  # local | local-exact | a model alias of the tenant routed to an embedding model
    scope: str = "user"  # user | session | tenant: whose memories a request may recall
    anonymous: str = "session"  # requests without a user id: session | shared (one anonymous user)
    episodic: bool = True  # remember recorded user and assistant messages
    inject: bool = True  # add recalled memories to the system prompt
    top_k: int = 5
    min_score: float = 0.25  # minimum cosine similarity of a recalled memory
    recency_half_life_days: float | None = None
    latency_budget_ms: int = 30  # retrieval slower than this is skipped (and counted)
    max_inject_tokens: int = 1200
    procedural: tuple[str, ...] = ()  # tenant-wide standing preferences, always injected
    # Background extraction of facts, preferences and lessons (proxy/memory/extraction.py): by
    # ``extractor_model`` (a model alias of the tenant) when set, else by rules.
    extract: bool = False
    extractor_model: str | None = None
    ttl_days: tuple[tuple[str, float], ...] = ()  # (memory type, days): older memories of the type expire

    def ttl(self, memory_type: str) -> float | None:
        """Seconds a memory of ``memory_type`` lives (None: until its session is erased)."""
        return next((days * 86400.0 for t, days in self.ttl_days if t == memory_type), None)


@dataclass(frozen=True)
class MetricsSettings:
    """Who may read GET /metrics (see README, Operating it)."""

    enabled: bool = True
    key_hashes: frozenset[str] = field(default=frozenset(), repr=False)  # sha256 of operator keys

    def allows(self, bearer_key: str, peer: str | None) -> bool:
        """An operator key when any is configured; otherwise a loopback client."""
        if self.key_hashes:
            return bool(bearer_key) and hash_key(bearer_key) in self.key_hashes
        try:
            return peer is not None and ipaddress.ip_address(peer).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class TenantConfig:
    name: str
    api_key_hashes: frozenset[str] = field(repr=False)
    allow_unauthenticated: bool
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    models: Mapping[str, ModelRoute]
    session_ttl: float
    history: str
    concurrency: str
    upstream_timeout: float
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # an upstream reply larger than this is a 502
    stateless: bool = False  # plain proxying: no session state is read or recorded
    hosted_tools: str = "drop"  # Responses API built-in tools (web_search...) the upstream cannot run: drop | refuse
    persistence: Persistence = Persistence()
    sessions: SessionSettings = SessionSettings()
    quotas: QuotaSettings = QuotaSettings()  # rate limits and stored-data quotas (proxy/quotas.py)
    context: ContextSettings = ContextSettings()  # context management (proxy/context)
    memory: MemorySettings = MemorySettings()  # long-term memory (proxy/memory)
    # Whether an open tenant admits a request carrying a key no tenant knows (the SDKs insist on
    # sending some key; agents keep their old OpenAI key): True, False, or None for auto (only
    # while no tenant has keys: once one has, an unknown key was meant for it and is 401).
    ignore_client_keys: bool | None = None
    source: str = ""  # the file it came from, for messages
    limits: RequestLimits = RequestLimits()  # per-request size limits (proxy/validate.py)
    # Provider extensions clients may send beyond the protocol's fields (proxy/protocol_fields.py).
    passthrough_fields: frozenset[str] = frozenset()

    def route(self, requested: str) -> ResolvedModel | None:
        route = self.models.get(requested) or self.models.get("*")
        return route.resolve(requested, self.max_response_bytes) if route else None

    def admits_anonymous(self, peer: str | None) -> bool:
        if not self.allow_unauthenticated or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.allowed_clients)

    def secrets(self) -> tuple[str, ...]:
        return tuple(r.api_key for r in self.models.values() if r.api_key)

    def unset_key_envs(self) -> list[str]:
        """``models.<alias>.api_key_env: NAME`` entries whose variable is not set."""
        return [f"models.{r.alias}.api_key_env: {r.api_key_env} is not set"
                for r in self.models.values() if r.api_key_env and r.api_key is None]


@dataclass(frozen=True)
class PostgresSettings:
    """storage.postgres: where the state lives when storage.backend is postgres."""

    dsn: str = field(repr=False)  # may hold a password: never logged
    pool_size: int = 10
    statement_timeout_ms: int = 30_000
    replicas: str = "one"  # one (a database-wide lock refuses a second replica) | many (fleet mode, README)


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    max_body_bytes: int
    janitor_interval: float
    body_read_timeout: float  # a request body not received within this is a 408
    operator_key_hashes: frozenset[str] = field(repr=False)  # keys that see every tenant's figures
    data_dir: Path
    map_size: int
    write_batch_size: int
    flush_interval: float
    write_queue_max: int
    transcript_cache_messages: int
    backup: BackupSettings
    tenants: Mapping[str, TenantConfig]
    source: str  # where it came from, for logs
    storage_backend: str = "lmdb"  # lmdb | postgres
    postgres: PostgresSettings | None = None  # set when storage_backend is postgres
    metrics: MetricsSettings = MetricsSettings()
    tenants_dir: Path | None = None  # the directory of tenant files (watched for reloads)

    def tenant_for_key(self, api_key: str) -> TenantConfig | None:
        digest = hash_key(api_key)
        for tenant in self.tenants.values():
            if digest in tenant.api_key_hashes:
                return tenant
        return None

    def is_operator_key(self, api_key: str) -> bool:
        return bool(api_key) and hash_key(api_key) in self.operator_key_hashes

    def ignores_unknown_key(self, tenant: TenantConfig) -> bool:
        """Whether the open ``tenant`` admits a request whose key no tenant knows."""
        if tenant.ignore_client_keys is not None:
            return tenant.ignore_client_keys
        return not any(t.api_key_hashes for t in self.tenants.values())

    def anonymous_tenant(self, peer: str | None) -> TenantConfig | None:
        for tenant in self.tenants.values():
            if tenant.admits_anonymous(peer):
                return tenant
        return None

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for t in self.tenants.values() for s in t.secrets())

    def unset_key_envs(self) -> list[str]:
        """Every model route whose key variable is unset, as ``<file>: models.<alias>...``."""
        return [f"{t.source}: {problem}" for t in self.tenants.values() for problem in t.unset_key_envs()]


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate configuration.

    ``path`` is proxy.yaml; its tenants live in ``tenants/`` beside it. Without a path, the
    embedded defaults are used (one open tenant on localhost). ``overrides`` come from CLI flags.
    """
    raw = copy.deepcopy(DEFAULTS)
    tenant_docs: list[tuple[str, dict[str, Any]]] = []
    source = "embedded defaults"
    tenants_dir: Path | None = None
    if path is not None:
        file = Path(path)
        source = str(file)
        doc = _read_yaml(file)
        _check_keys(doc, set(DEFAULTS) | {"tenants_dir"}, str(file), "")
        for section in DEFAULTS:
            if section in doc:
                value = doc[section]
                if not isinstance(value, dict):
                    raise ConfigError(f"{file}: {section}: must be a mapping")
                _check_keys(value, set(DEFAULTS[section]), str(file), section + ".")
                raw[section].update(value)
        tenants_dir = file.parent / str(doc.get("tenants_dir", "tenants"))
        if tenants_dir.is_dir():
            for tenant_file in sorted(tenants_dir.glob("*.yaml")) + sorted(tenants_dir.glob("*.yml")):
                tenant_docs.append((str(tenant_file), _read_yaml(tenant_file) | {"_stem": tenant_file.stem}))
    if not tenant_docs:
        tenant_docs.append(("embedded default tenant", copy.deepcopy(DEFAULT_TENANT)))
    overrides = dict(overrides or {})
    if overrides.get("allowed_clients") is not None:
        # $ASP_ALLOW_CLIENTS (e.g. the Docker bridge network): the default for every tenant
        # that does not list its own.
        raw["tenant_defaults"]["allowed_clients"] = list(overrides["allowed_clients"])
    for key in ("host", "port"):
        if overrides.get(key) is not None:
            raw["server"][key] = overrides[key]
    if overrides.get("data_dir") is not None:
        raw["storage"]["data_dir"] = overrides["data_dir"]
    if overrides.get("model"):
        # Like `litellm --model`: every requested model name goes to this one model.
        route = {"model": overrides["model"]}
        if overrides.get("api_base"):
            route["api_base"] = overrides["api_base"]
        route["api_key_env"] = _provider_key_env(overrides["model"])
        default = next((d for _, d in tenant_docs if d.get("name", d.get("_stem")) == "default"), None)
        if default is None:
            default = copy.deepcopy(DEFAULT_TENANT)
            tenant_docs.append(("--model", default))
        default["models"] = {"*": route}
    return _build(raw, tenant_docs, source, tenants_dir)


def _build(raw: dict[str, Any], tenant_docs: list[tuple[str, dict[str, Any]]], source: str, tenants_dir: Path | None) -> Config:
    server, storage = raw["server"], raw["storage"]
    where = source
    tenants: dict[str, TenantConfig] = {}
    for file, doc in tenant_docs:
        tenant = _build_tenant(file, doc, raw["tenant_defaults"])
        if tenant.name in tenants:
            raise ConfigError(f"{file}: name: tenant {tenant.name!r} is defined twice")
        tenants[tenant.name] = tenant
    operators = frozenset(_digests(server["operator_key_sha256"], where, "server.operator_key_sha256"))
    for tenant in tenants.values():
        if operators & tenant.api_key_hashes:
            raise ConfigError(f"{where}: server.operator_key_sha256: a key of tenant {tenant.name!r} cannot also be an operator key")
    return Config(
        host=_string(server["host"], where, "server.host"),
        port=_int(server["port"], where, "server.port", 0, 65535),
        max_body_bytes=_int(server["max_body_bytes"], where, "server.max_body_bytes", 1024, 1 << 31),
        janitor_interval=float(_int(server["janitor_interval_seconds"], where, "server.janitor_interval_seconds", 1, 1 << 31)),
        body_read_timeout=float(_int(server["body_read_timeout_seconds"], where, "server.body_read_timeout_seconds", 1, 3600)),
        operator_key_hashes=operators,
        data_dir=Path(_string(storage["data_dir"], where, "storage.data_dir")),
        map_size=_int(storage["map_size_mb"], where, "storage.map_size_mb", 1, 1 << 24) * 1024 * 1024,
        write_batch_size=_int(storage["write_batch_size"], where, "storage.write_batch_size", 1, 1 << 20),
        flush_interval=_int(storage["flush_interval_ms"], where, "storage.flush_interval_ms", 1, 3_600_000) / 1000,
        write_queue_max=_int(storage["write_queue_max"], where, "storage.write_queue_max", 1, 1 << 30),
        transcript_cache_messages=_int(storage["transcript_cache_messages"], where, "storage.transcript_cache_messages", 0, 1 << 30),
        backup=_build_backup(where, storage["backup"]),
        tenants=MappingProxyType(tenants),
        source=source,
        storage_backend=_choice(storage["backend"], STORAGE_BACKENDS, where, "storage.backend"),
        postgres=_build_postgres(storage, where) if storage["backend"] == "postgres" else None,
        metrics=_build_metrics(server["metrics"], where, operators),
        tenants_dir=tenants_dir,
    )


def _build_postgres(storage: dict[str, Any], where: str) -> PostgresSettings:
    spec = storage["postgres"]
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: storage.postgres: must be a mapping")
    _check_keys(spec, set(DEFAULTS["storage"]["postgres"]), where, "storage.postgres.")
    spec = DEFAULTS["storage"]["postgres"] | spec
    dsn = _interpolate(_string(spec["dsn"], where, "storage.postgres.dsn"), where, "storage.postgres.dsn")
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{where}: storage.postgres.dsn: must be a postgresql:// URL")
    return PostgresSettings(
        dsn=dsn,
        pool_size=_int(spec["pool_size"], where, "storage.postgres.pool_size", 1, 1000),
        statement_timeout_ms=_int(spec["statement_timeout_ms"], where, "storage.postgres.statement_timeout_ms", 100, 3_600_000),
        replicas=_choice(spec["replicas"], POSTGRES_REPLICAS, where, "storage.postgres.replicas"),
    )


def _choice(value: Any, allowed: tuple[str, ...], where: str, key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {key}: must be one of {', '.join(allowed)}")
    return value


def _build_metrics(spec: Any, where: str, operators: frozenset[str]) -> MetricsSettings:
    """Metrics are the operator's: readable with a server.operator_key_sha256 key, or from loopback when none is set."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: server.metrics: must be a mapping")
    _check_keys(spec, set(DEFAULTS["server"]["metrics"]), where, "server.metrics.")
    spec = DEFAULTS["server"]["metrics"] | spec
    return MetricsSettings(enabled=_bool(spec["enabled"], where, "server.metrics.enabled"), key_hashes=operators)


def _build_backup(where: str, spec: Any) -> BackupSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: storage.backup: must be a mapping")
    _check_keys(spec, set(DEFAULTS["storage"]["backup"]), where, "storage.backup.")
    spec = DEFAULTS["storage"]["backup"] | spec
    directory = spec["dir"]
    if directory is not None:
        directory = Path(_string(_interpolate(directory, where, "storage.backup.dir"), where, "storage.backup.dir"))
    return BackupSettings(
        dir=directory,
        every_minutes=_number(spec["every_minutes"], where, "storage.backup.every_minutes", 0.01, 525_600),
        keep=_int(spec["keep"], where, "storage.backup.keep", 1, 10_000),
    )


def _build_tenant(file: str, doc: dict[str, Any], defaults: dict[str, Any]) -> TenantConfig:
    stem = doc.pop("_stem", None)
    allowed = set(defaults) | {"name"}
    _check_keys(doc, allowed, file, "")
    merged = copy.deepcopy(defaults) | doc
    name = merged.get("name", stem)
    if not isinstance(name, str) or not _TENANT_NAME.match(name):
        raise ConfigError(f"{file}: name: must match {_TENANT_NAME.pattern} (got {name!r})")
    hashes = merged["api_key_sha256"]
    if isinstance(hashes, list):  # "${TEAM_KEY_SHA256}": the digest from the environment (Docker)
        hashes = [_interpolate(h, file, "api_key_sha256") for h in hashes]
    hashes = _digests(hashes, file, "api_key_sha256")
    _bool(merged["allow_unauthenticated"], file, "allow_unauthenticated")
    try:
        nets = tuple(ipaddress.ip_network(str(n), strict=False) for n in merged["allowed_clients"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{file}: allowed_clients: must be a list of IP networks ({exc})") from None
    if not hashes and not merged["allow_unauthenticated"]:
        raise ConfigError(f"{file}: api_key_sha256: a tenant needs a key unless allow_unauthenticated is true")
    if merged["history"] not in HISTORY_MODES:
        raise ConfigError(f"{file}: history: must be one of {', '.join(HISTORY_MODES)}")
    if merged["concurrency"] not in CONCURRENCY_MODES:
        raise ConfigError(f"{file}: concurrency: must be one of {', '.join(CONCURRENCY_MODES)}")
    if merged["hosted_tools"] not in HOSTED_TOOL_POLICIES:
        raise ConfigError(f"{file}: hosted_tools: must be one of {', '.join(HOSTED_TOOL_POLICIES)}")
    models = merged["models"]
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{file}: models: must map at least one model alias to an upstream")
    passthrough = _build_passthrough(file, merged["passthrough_fields"])
    routes = {str(alias): _build_route(file, str(alias), spec, passthrough) for alias, spec in models.items()}
    return TenantConfig(
        name=name,
        api_key_hashes=frozenset(hashes),
        allow_unauthenticated=merged["allow_unauthenticated"],
        allowed_clients=nets,
        models=MappingProxyType(routes),
        session_ttl=float(_int(merged["session_ttl_seconds"], file, "session_ttl_seconds", 1, 1 << 40)),
        history=merged["history"],
        concurrency=merged["concurrency"],
        upstream_timeout=float(_int(merged["upstream_timeout_seconds"], file, "upstream_timeout_seconds", 1, 86400)),
        max_response_bytes=_int(merged["max_response_bytes"], file, "max_response_bytes", 1024, 1 << 40),
        stateless=_bool(merged["stateless"], file, "stateless"),
        hosted_tools=merged["hosted_tools"],
        persistence=_build_persistence(file, merged["persistence"]),
        sessions=_build_sessions(file, defaults.get("sessions", {}), doc.get("sessions", {})),
        quotas=_build_quotas(file, defaults["quotas"], doc.get("quotas", {})),
        context=_build_context(file, defaults["context"], doc.get("context", {}), routes),
        memory=_build_memory(file, defaults.get("memory", {}), doc.get("memory", {}), routes),
        ignore_client_keys=_ignore_client_keys(merged["ignore_client_keys"], file),
        source=file,
        limits=_build_limits(file, defaults.get("limits", {}), doc.get("limits", {})),
        passthrough_fields=passthrough,
    )


def _ignore_client_keys(value: Any, file: str) -> bool | None:
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{file}: ignore_client_keys: must be auto, true or false")
    return value


def _build_limits(file: str, defaults: Any, own: Any) -> RequestLimits:
    """The tenant's ``limits`` over tenant_defaults.limits (mappings merge key by key)."""
    for value in (defaults, own):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: limits: must be a mapping")
        _check_keys(value, {"max_messages", "max_message_chars", "max_total_chars"}, file, "limits.")
    spec, default = defaults | own, RequestLimits()
    return RequestLimits(
        max_messages=_int(spec.get("max_messages", default.max_messages), file, "limits.max_messages", 1, 1 << 30),
        max_message_chars=_int(spec.get("max_message_chars", default.max_message_chars), file, "limits.max_message_chars", 1, 1 << 40),
        max_total_chars=_int(spec.get("max_total_chars", default.max_total_chars), file, "limits.max_total_chars", 1, 1 << 40),
    )


def _build_passthrough(file: str, names: Any) -> frozenset[str]:
    """Provider extensions a tenant lets clients send; never a protocol field or a litellm parameter."""
    if not isinstance(names, list) or len(names) > 64:
        raise ConfigError(f"{file}: passthrough_fields: must be a list of at most 64 field names")
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name):
            raise ConfigError(f"{file}: passthrough_fields: {name!r} must be a field name ([A-Za-z][A-Za-z0-9_]*, at most 64 characters)")
        if any(name in p.fields for p in (protocol_fields.CHAT_COMPLETIONS, protocol_fields.EMBEDDINGS)):
            raise ConfigError(f"{file}: passthrough_fields: {name!r} is a protocol field, already forwarded")
        if is_litellm_param(name):
            raise ConfigError(f"{file}: passthrough_fields: {name!r} is a litellm parameter (routing, credentials, "
                              "retries, mocks): clients may never set it; use models.<alias>.params")
    return frozenset(names)


def _build_context(file: str, defaults: Any, own: Any, routes: dict[str, ModelRoute]) -> ContextSettings:
    """The tenant's ``context`` over tenant_defaults.context (mappings merge key by key)."""
    raw = (defaults | own) if isinstance(defaults, dict) and isinstance(own, dict) else own
    try:
        settings = parse_context(raw)
    except ValueError as exc:
        raise ConfigError(f"{file}: context{'' if str(exc).startswith(':') else '.'}{exc}") from None
    for key in ("summarizer_model", "tagger_model"):
        alias = getattr(settings, key)
        if alias is not None and alias not in routes and "*" not in routes:
            raise ConfigError(f"{file}: context.{key}: {alias!r} is not a model alias of this tenant (models: {', '.join(routes)})")
    return settings


def _build_memory(file: str, defaults: Any, own: Any, routes: Mapping[str, ModelRoute]) -> MemorySettings:
    """The tenant's ``memory`` over tenant_defaults.memory (mappings merge key by key)."""
    for value in (defaults, own):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: memory: must be a mapping")
        _check_keys(value, MEMORY_KEYS, file, "memory.")
    spec = defaults | own
    default = MemorySettings()
    embedder = spec.get("embedder", default.embedder)
    if not isinstance(embedder, str) or not embedder:
        raise ConfigError(f"{file}: memory.embedder: must be 'local', 'local-exact' or a model alias of this tenant")
    if embedder not in LOCAL_EMBEDDERS and embedder not in routes and "*" not in routes:
        raise ConfigError(f"{file}: memory.embedder: must be 'local', 'local-exact' or a model alias of this tenant (models: {', '.join(routes)})")
    scope = spec.get("scope", default.scope)
    if scope not in MEMORY_SCOPES:
        raise ConfigError(f"{file}: memory.scope: must be one of {', '.join(MEMORY_SCOPES)}")
    anonymous = spec.get("anonymous", default.anonymous)
    if anonymous not in MEMORY_ANONYMOUS:
        raise ConfigError(f"{file}: memory.anonymous: must be one of {', '.join(MEMORY_ANONYMOUS)}")
    min_score = spec.get("min_score", default.min_score)
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not -1.0 <= min_score <= 1.0:
        raise ConfigError(f"{file}: memory.min_score: must be a number between -1 and 1 (a cosine similarity)")
    half_life = spec.get("recency_half_life_days", default.recency_half_life_days)
    if half_life is not None and (isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or half_life <= 0):
        raise ConfigError(f"{file}: memory.recency_half_life_days: must be null or a number of days above 0")
    procedural = spec.get("procedural", [])
    if not isinstance(procedural, list) or len(procedural) > 100 or not all(isinstance(p, str) and 0 < len(p) <= 4000 for p in procedural):
        raise ConfigError(f"{file}: memory.procedural: must be a list of at most 100 non-empty strings of at most 4000 characters")
    return MemorySettings(
        enabled=_bool(spec.get("enabled", default.enabled), file, "memory.enabled"),
        embedder=embedder,
        scope=scope,
        anonymous=anonymous,
        episodic=_bool(spec.get("episodic", default.episodic), file, "memory.episodic"),
        inject=_bool(spec.get("inject", default.inject), file, "memory.inject"),
        top_k=_int(spec.get("top_k", default.top_k), file, "memory.top_k", 1, 100),
        min_score=float(min_score),
        recency_half_life_days=float(half_life) if half_life is not None else None,
        latency_budget_ms=_int(spec.get("latency_budget_ms", default.latency_budget_ms), file, "memory.latency_budget_ms", 1, 60_000),
        max_inject_tokens=_int(spec.get("max_inject_tokens", default.max_inject_tokens), file, "memory.max_inject_tokens", 50, 100_000),
        procedural=tuple(procedural),
        **_memory_extraction(file, spec, routes),
    )


def _memory_extraction(file: str, spec: dict[str, Any], routes: Mapping[str, ModelRoute]) -> dict[str, Any]:
    """memory.extract, memory.extractor_model and memory.ttl (days per memory type)."""
    model = spec.get("extractor_model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"{file}: memory.extractor_model: must be null or a model alias of this tenant")
    if model is not None and model not in routes and "*" not in routes:
        raise ConfigError(f"{file}: memory.extractor_model: {model!r} is not a model alias of this tenant (models: {', '.join(routes)})")
    ttl = spec.get("ttl") or {}
    if not isinstance(ttl, dict) or set(ttl) - set(MEMORY_TTL_TYPES):
        raise ConfigError(f"{file}: memory.ttl: must be a mapping of {', '.join(MEMORY_TTL_TYPES)} to days")
    for kind, days in ttl.items():
        if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0):
            raise ConfigError(f"{file}: memory.ttl.{kind}: must be null or a number of days above 0")
    extract = _bool(spec.get("extract", model is not None), file, "memory.extract")
    return {"extract": extract, "extractor_model": model,
            "ttl_days": tuple((k, float(v)) for k, v in sorted(ttl.items()) if v is not None)}


def _build_sessions(file: str, defaults: Any, own: Any) -> SessionSettings:
    for value in (defaults, own):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: sessions: must be a mapping")
        _check_keys(value, {"implicit", "resume_within_seconds", "reverted_turns"}, file, "sessions.")
    spec, default = defaults | own, SessionSettings()
    implicit = spec.get("implicit", default.implicit)
    if implicit not in IMPLICIT_MODES:
        raise ConfigError(f"{file}: sessions.implicit: must be one of {', '.join(IMPLICIT_MODES)}")
    reverted = spec.get("reverted_turns", default.reverted_turns)
    if reverted not in REVERTED_TURNS:
        raise ConfigError(f"{file}: sessions.reverted_turns: must be one of {', '.join(REVERTED_TURNS)}")
    window = _int(spec.get("resume_within_seconds", default.resume_within_seconds), file, "sessions.resume_within_seconds", 1, 1 << 31)
    return SessionSettings(implicit=implicit, resume_within_seconds=window, reverted_turns=reverted)
def _build_quotas(file: str, defaults: Any, own: Any) -> QuotaSettings:
    """The tenant's ``quotas`` over tenant_defaults.quotas (key by key)."""
    try:
        if not isinstance(defaults, dict) or not isinstance(own, dict):
            raise ValueError("quotas: must be a mapping")
        return parse_quotas(defaults | own)
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def _build_persistence(file: str, spec: Any) -> Persistence:
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: persistence: must be a mapping")
    _check_keys(spec, {"mode", "critical", "checkpoint_every_messages", "checkpoint_every_seconds", "keep_checkpoints"}, file, "persistence.")
    default = Persistence()
    mode = spec.get("mode", default.mode)
    if mode not in PERSISTENCE_MODES:
        raise ConfigError(f"{file}: persistence.mode: must be one of {', '.join(PERSISTENCE_MODES)}")
    critical = spec.get("critical", sorted(default.critical))
    if not isinstance(critical, list) or not set(critical) <= set(CRITICAL_KINDS):
        raise ConfigError(f"{file}: persistence.critical: must be a list of {', '.join(CRITICAL_KINDS)}")
    return Persistence(
        mode=mode,
        critical=frozenset(critical),
        checkpoint_every_messages=_int(spec.get("checkpoint_every_messages", default.checkpoint_every_messages), file, "persistence.checkpoint_every_messages", 1, 1 << 30),
        checkpoint_every_seconds=float(_int(spec.get("checkpoint_every_seconds", int(default.checkpoint_every_seconds)), file, "persistence.checkpoint_every_seconds", 1, 1 << 30)),
        keep_checkpoints=_int(spec.get("keep_checkpoints", default.keep_checkpoints), file, "persistence.keep_checkpoints", 1, 1000),
    )


def _build_route(file: str, alias: str, spec: Any, passthrough: frozenset[str] = frozenset()) -> ModelRoute:
    key = f"models.{alias}"
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: {key}: must be a litellm model string or a mapping")
    _check_keys(spec, {"model", "api_base", "api_key", "api_key_env", "path", "params"}, file, key + ".")
    model = _string(_interpolate(spec.get("model"), file, key + ".model"), file, key + ".model")
    api_base = _interpolate(spec.get("api_base"), file, key + ".api_base")
    if api_base is not None and not re.match(r"^https?://", str(api_base)):
        raise ConfigError(f"{file}: {key}.api_base: must be an http(s) URL")
    api_key = _interpolate(spec.get("api_key"), file, key + ".api_key")
    key_env = spec.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)):
        raise ConfigError(f"{file}: {key}.api_key_env: must be an environment variable name")
    if api_key is None and key_env:
        api_key = os.environ.get(key_env) or None
    if model.startswith("openai/") and api_base is None:
        api_base = "https://api.openai.com/v1"
    path = spec.get("path", "auto")
    if path not in UPSTREAM_PATHS:
        raise ConfigError(f"{file}: {key}.path: must be one of {', '.join(UPSTREAM_PATHS)}")
    params = spec.get("params", {})
    if not isinstance(params, dict) or {"api_base", "base_url", "api_key"} & set(params):
        raise ConfigError(f"{file}: {key}.params: must be a mapping without api_base/base_url/api_key")
    return ModelRoute(alias, model, api_base, api_key, path, MappingProxyType(dict(params)), passthrough=passthrough,
                      api_key_env=key_env if spec.get("api_key") is None else None)


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


def _check_keys(doc: dict[str, Any], allowed: set[str], file: str, prefix: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed and k != "_stem")
    if unknown:
        raise ConfigError(f"{file}: {prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _interpolate(value: Any, file: str, key: str) -> Any:
    """Replace ${VAR} and ${VAR:-default} from the environment; secrets stay out of YAML."""
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{file}: {key}: environment variable {name} is not set")

    return _ENV_REF.sub(substitute, value)


def _digests(value: Any, file: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in value):
        raise ConfigError(f"{file}: {key}: must be a list of lowercase sha256 hex digests")
    return value


def _string(value: Any, file: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{file}: {key}: must be a non-empty string")
    return value


def _int(value: Any, file: str, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{file}: {key}: must be an integer between {low} and {high}")
    return value


def _number(value: Any, file: str, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{file}: {key}: must be a number between {low} and {high}")
    return float(value)


def _bool(value: Any, file: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{file}: {key}: must be true or false")
    return value
