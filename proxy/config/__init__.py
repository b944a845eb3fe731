"""Configuration: YAML files (proxy.yaml + tenants/*.yaml) validated into frozen pydantic models.

The models are the schema and the one source of defaults (config/proxy.yaml shows the same values;
tests/test_config.py holds them equal). Modules: ``fields`` (base model, value types), ``errors``
("file: key: rule" messages), ``routes``, ``context``, ``tenant``, ``process`` (server, storage,
the loaded Config) and ``loader``.
"""

from proxy.config.context import ContextSettings
from proxy.config.errors import ConfigError
from proxy.config.loader import DEFAULT_TENANT, load_config
from proxy.config.process import (BackupSettings, Config, MetricsSettings, PostgresSettings, ServerSettings,
                                  StorageSettings, hash_key)
from proxy.config.routes import DEFAULT_MAX_RESPONSE_BYTES, ModelRoute, ResolvedModel
from proxy.config.tenant import (LOCAL_EMBEDDERS, MemorySettings, Persistence, QuotaSettings, RequestLimits,
                                 SessionSettings, TenantConfig)

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES", "DEFAULT_TENANT", "LOCAL_EMBEDDERS", "BackupSettings", "Config", "ConfigError",
    "ContextSettings", "MemorySettings", "MetricsSettings", "ModelRoute", "Persistence", "PostgresSettings",
    "QuotaSettings", "RequestLimits", "ResolvedModel", "ServerSettings", "SessionSettings", "StorageSettings",
    "TenantConfig", "hash_key", "load_config",
]
