"""The process's configuration: proxy.yaml's server and storage sections, and the loaded whole."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from proxy.config.errors import KeyedRule
from proxy.config.fields import Bool, Digests, Env, Frozen, Int, Number, OneOf, Section, Text, interpolate
from proxy.config.tenant import TenantConfig


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class MetricsSection(Section):
    """``server.metrics``: GET /metrics (Prometheus)."""

    enabled: Bool = True


class MetricsSettings(MetricsSection):
    """Who may read GET /metrics (see README, Operating it): server.metrics plus the operator keys."""

    key_hashes: frozenset[str] = Field(frozenset(), repr=False)  # sha256 of operator keys

    def allows(self, bearer_key: str, peer: str | None) -> bool:
        """An operator key when any is configured; otherwise a loopback client."""
        if self.key_hashes:
            return bool(bearer_key) and hash_key(bearer_key) in self.key_hashes
        try:
            return peer is not None and ipaddress.ip_address(peer).is_loopback
        except ValueError:
            return False


class ServerSettings(Section):
    host: Text = "127.0.0.1"
    port: Int(0, 65535) = 8765
    max_body_bytes: Int(1024, 1 << 31) = 8 * 1024 * 1024
    janitor_interval_seconds: Int(1, 1 << 31) = 300
    # GET /metrics: readable with an operator key, or from loopback when no key is set.
    metrics: MetricsSection = MetricsSection()
    body_read_timeout_seconds: Int(1, 3600) = 30  # a request body not received within this is a 408
    operator_key_sha256: Digests = Field(frozenset(), repr=False)  # keys that see every tenant's figures


class PostgresSettings(Section):
    """storage.postgres: where the state lives when storage.backend is postgres."""

    dsn: Text = Field("${DATABASE_URL}", repr=False)  # may hold a password: never logged
    pool_size: Int(1, 1000) = 10
    statement_timeout_ms: Int(100, 3_600_000) = 30_000
    # one (a database-wide lock refuses a second replica) | many (fleet mode, README)
    replicas: OneOf("one", "many") = "one"


def _directory(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("must be a non-empty string")
    return value


class BackupSettings(Section):
    """Scheduled online backups of the LMDB store by the serving process (docs/PERSISTENCE.md)."""

    dir: Annotated[Path | None, BeforeValidator(_directory), Env] = None  # None: no scheduled backups
    every_minutes: Number(0.01, 525_600) = 60.0
    keep: Int(1, 10_000) = 24  # newest backups kept; older ones are deleted after each new one


class StorageSettings(Section):
    backend: OneOf("lmdb", "postgres") = "lmdb"
    data_dir: Text = "./data"
    map_size_mb: Int(1, 1 << 24) = 1024
    write_batch_size: Int(1, 1 << 20) = 256
    flush_interval_ms: Int(1, 3_600_000) = 50
    write_queue_max: Int(1, 1 << 30) = 10_000
    transcript_cache_messages: Int(0, 1 << 30) = 50_000
    postgres: PostgresSettings = Field(PostgresSettings(), validate_default=True)
    backup: BackupSettings = BackupSettings()

    @field_validator("postgres", mode="before")
    @classmethod
    def _dsn_from_env(cls, value: Any, info: ValidationInfo) -> Any:
        """The dsn's ${VAR} is read only when the backend is postgres (lmdb needs no DATABASE_URL)."""
        if info.data.get("backend") != "postgres":
            return value
        if isinstance(value, PostgresSettings):
            value = value.model_dump()
        if isinstance(value, dict):
            dsn = value.get("dsn", PostgresSettings.model_fields["dsn"].default)
            try:
                value = value | {"dsn": interpolate(dsn)}
            except ValueError as exc:
                raise KeyedRule("dsn", str(exc)) from None
        return value

    @model_validator(mode="after")
    def _postgres_url(self) -> StorageSettings:
        if self.backend == "postgres" and not self.postgres.dsn.startswith(("postgresql://", "postgres://")):
            raise KeyedRule("postgres.dsn", "must be a postgresql:// URL")
        return self


class ProxyFile(Section):
    """proxy.yaml. tenant_defaults is validated under each tenant, merged with the tenant's file."""

    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    tenant_defaults: dict[str, Any] = {}
    tenants_dir: Text = "tenants"

    @field_validator("tenant_defaults")
    @classmethod
    def _tenant_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = sorted(set(TenantConfig.model_fields) - {"name"})
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise KeyedRule(unknown[0], f"unknown key (allowed: {', '.join(allowed)})")
        return value


class Config(Section):
    """The whole configuration, as loaded: one frozen value, swapped whole on reload."""

    server: ServerSettings
    storage: StorageSettings
    tenants: Annotated[Mapping[str, TenantConfig], Frozen]
    tenant_files: Annotated[Mapping[str, str], Frozen]  # the file each tenant came from, for messages
    source: str  # where it came from, for logs
    tenants_dir: Path | None = None  # the directory of tenant files (watched for reloads)

    # The values the rest of the proxy reads, in its units.
    host = property(lambda self: self.server.host)
    port = property(lambda self: self.server.port)
    max_body_bytes = property(lambda self: self.server.max_body_bytes)
    janitor_interval = property(lambda self: float(self.server.janitor_interval_seconds))
    body_read_timeout = property(lambda self: float(self.server.body_read_timeout_seconds))
    operator_key_hashes = property(lambda self: self.server.operator_key_sha256)
    data_dir = property(lambda self: Path(self.storage.data_dir))
    map_size = property(lambda self: self.storage.map_size_mb * 1024 * 1024)
    write_batch_size = property(lambda self: self.storage.write_batch_size)
    flush_interval = property(lambda self: self.storage.flush_interval_ms / 1000)
    write_queue_max = property(lambda self: self.storage.write_queue_max)
    transcript_cache_messages = property(lambda self: self.storage.transcript_cache_messages)
    backup = property(lambda self: self.storage.backup)
    storage_backend = property(lambda self: self.storage.backend)

    @property
    def postgres(self) -> PostgresSettings | None:
        """Set when storage.backend is postgres."""
        return self.storage.postgres if self.storage.backend == "postgres" else None

    @property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings(enabled=self.server.metrics.enabled, key_hashes=self.operator_key_hashes)

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
        return [f"{self.tenant_files.get(name, name)}: {problem}"
                for name, t in self.tenants.items() for problem in t.unset_key_envs()]
