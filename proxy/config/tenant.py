"""A tenant's configuration (tenants/<name>.yaml over proxy.yaml's tenant_defaults) and its sections."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, Field, model_validator

from proxy import protocol_fields
from proxy.config.context import ContextSettings, off_or_mapping
from proxy.config.errors import KeyedRule, Rule
from proxy.config.fields import HEX_DIGEST, Bool, Env, Frozen, Int, Number, OneOf, Section
from proxy.config.routes import DEFAULT_MAX_RESPONSE_BYTES, ModelRoute, ResolvedModel
from proxy.litellm_params import is_litellm_param

CRITICAL_KINDS = ("decision", "commitment", "preference", "fact", "tool_calls", "idempotent", "response_id", "all")
# The bundled all-MiniLM-L6-v2: int8 on ONNX Runtime (fast, the default) or float32 numpy (exact).
LOCAL_EMBEDDERS = ("local", "local-exact")
_TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_QUOTA = Annotated[Int(1, 1 << 50) | None, Rule(f"must be null (unlimited) or an integer between 1 and {1 << 50}")]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Persistence(Section):
    """How a tenant's turns reach the disk (see README, Persistence)."""

    mode: OneOf("hybrid", "sync", "async", "checkpoint") = "hybrid"
    critical: Annotated[frozenset[OneOf(*CRITICAL_KINDS)], Rule(f"must be a list of {', '.join(CRITICAL_KINDS)}")] = \
        frozenset({"decision", "commitment", "preference", "tool_calls", "idempotent", "response_id"})
    checkpoint_every_messages: Int(1, 1 << 30) = 50
    checkpoint_every_seconds: Int(1, 1 << 30) = 300
    keep_checkpoints: Int(1, 1000) = 5

    def durable(self, tags: set[str]) -> bool:
        """Whether a turn with these tags must be on disk before the response completes."""
        if self.mode == "sync":
            return True
        if self.mode != "hybrid":
            return False
        return "all" in self.critical or bool(tags & self.critical)


class SessionSettings(Section):
    """How requests map onto sessions beyond explicit ids (see README, Sessions)."""

    # new: an implicit session per conversation; resume: an agent (same key, system prompt, user,
    # tools) that restarts with no assistant turns continues its latest session within the window.
    implicit: OneOf("new", "resume") = "new"
    resume_within_seconds: Int(1, 1 << 31) = 3600
    # drop: turns rolled back (or cut by a fork) that a client resends are not forwarded or
    # recorded again; keep: they are, as a new branch (the behaviour before rollbacks stuck).
    reverted_turns: OneOf("drop", "keep") = "drop"


class RequestLimits(Section):
    """How much one chat request may carry (README: Configuration); over a limit → 413."""

    max_messages: Int(1, 1 << 30) = 4_096
    max_message_chars: Int(1, 1 << 40) = 1_000_000  # text of one message: content, text parts, tool-call arguments
    max_total_chars: Int(1, 1 << 40) = 4_000_000  # text of all the request's messages together


class QuotaSettings(Section):
    """A tenant's limits (proxy/quotas.py); None is unlimited (the default for every limit)."""

    requests_per_minute: _QUOTA = None
    concurrent_requests: _QUOTA = None
    tokens_per_day: _QUOTA = None  # prompt + completion tokens the provider reported, per UTC day
    sessions: _QUOTA = None  # sessions stored at once
    memories: _QUOTA = None  # long-term memories stored at once (checked when one is added by the API)


_EMBEDDER_RULE = "must be 'local', 'local-exact' or a model alias of this tenant"
_DAYS = Annotated[Annotated[float, Field(strict=True, gt=0)] | None, Rule("must be null or a number of days above 0")]


class MemoryTTL(Section):
    """Days a memory of each type lives; null: until its session or user is erased."""

    episodic: _DAYS = None
    semantic: _DAYS = None
    procedural: _DAYS = None

    def configured(self) -> list[tuple[str, float]]:
        """(memory type, days) of the types that expire."""
        return [(kind, days) for kind, days in self.model_dump().items() if days is not None]


class MemorySettings(Section):
    """A tenant's long-term memory (see README, Memory)."""

    enabled: Bool = True
    embedder: Annotated[str, Field(strict=True, min_length=1), Rule(_EMBEDDER_RULE)] = "local"  # or a model alias
    scope: OneOf("user", "session", "tenant") = "user"  # whose memories a request may recall
    anonymous: OneOf("session", "shared") = "session"  # requests without a user id: session | one anonymous user
    episodic: Bool = True  # remember recorded user and assistant messages
    inject: Bool = True  # add recalled memories to the system prompt
    top_k: Int(1, 100) = 10
    min_score: Annotated[Number(-1.0, 1.0), Rule("must be a number between -1 and 1 (a cosine similarity)")] = 0.25
    recency_half_life_days: Annotated[Annotated[float, Field(strict=True, gt=0)] | None,
                                      Rule("must be null or a number of days above 0")] = None
    latency_budget_ms: Int(1, 60_000) = 30  # retrieval slower than this is skipped (and counted)
    max_inject_tokens: Int(50, 100_000) = 600
    procedural: Annotated[tuple[Annotated[str, Field(strict=True, min_length=1, max_length=4000)], ...], Field(max_length=100),
                          Rule("must be a list of at most 100 non-empty strings of at most 4000 characters")] = ()
    # Background extraction of facts, preferences and lessons (proxy/memory/extraction.py): by
    # ``extractor_model`` (a model alias of the tenant) when set, else by rules. Unset, ``extract``
    # follows ``extractor_model``.
    extract: Bool = False
    extractor_model: Annotated[Annotated[str, Field(strict=True, min_length=1)] | None,
                               Rule("must be null or a model alias of this tenant")] = None
    # Sessions recorded before extraction was on are extracted too (proxy/memory/backfill.py), at
    # most this many runs (extractor calls: they cost) per minute; 0: no backfill.
    backfill_per_minute: Int(0, 6000) = 10
    ttl: Annotated[MemoryTTL, Rule("must be a mapping of episodic, semantic, procedural to days")] = MemoryTTL()

    @model_validator(mode="before")
    @classmethod
    def _extract_follows_the_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "extract" not in data and data.get("extractor_model") is not None:
            return data | {"extract": True}
        return data

    def ttl_seconds(self, memory_type: str) -> float | None:
        """Seconds a memory of ``memory_type`` lives (None: until its session is erased)."""
        days = getattr(self.ttl, memory_type, None)
        return None if days is None else days * 86400.0


def _name(value: Any) -> Any:
    if not isinstance(value, str) or not _TENANT_NAME.match(value):
        raise ValueError(f"must match {_TENANT_NAME.pattern} (got {value!r})")
    return value


def _networks(value: Any) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(str(n), strict=False) for n in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be a list of IP networks ({exc})") from None


def _auto(value: Any) -> bool | None:
    if value == "auto" and isinstance(value, str):
        return None
    if not isinstance(value, bool):
        raise ValueError("must be auto, true or false")
    return value


def _models(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise ValueError("must map at least one model alias to an upstream")
    return {str(alias): spec for alias, spec in value.items()}


def _passthrough(names: Any) -> Any:
    """Provider extensions a tenant lets clients send; never a protocol field or a litellm parameter."""
    if not isinstance(names, list) or len(names) > 64:
        raise ValueError("must be a list of at most 64 field names")
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name):
            raise ValueError(f"{name!r} must be a field name ([A-Za-z][A-Za-z0-9_]*, at most 64 characters)")
        if any(name in p.fields for p in (protocol_fields.CHAT_COMPLETIONS, protocol_fields.EMBEDDINGS)):
            raise ValueError(f"{name!r} is a protocol field, already forwarded")
        if is_litellm_param(name):
            raise ValueError(f"{name!r} is a litellm parameter (routing, credentials, retries, mocks): clients may "
                             "never set it; use models.<alias>.params")
    return frozenset(names)


class TenantConfig(Section):
    """One tenant: who may call, where its models go, and how its state is kept."""

    name: Annotated[str, BeforeValidator(_name)]
    # "${TEAM_KEY_SHA256}": the digest from the environment (Docker).
    api_key_sha256: Annotated[frozenset[Annotated[str, Field(strict=True, pattern=HEX_DIGEST), Env]],
                              Rule("must be a list of lowercase sha256 hex digests")] = Field(frozenset(), repr=False)
    allow_unauthenticated: Bool = False
    allowed_clients: Annotated[tuple[Network, ...], BeforeValidator(_networks)] = \
        (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    # Whether an open tenant admits a request carrying a key no tenant knows (the SDKs insist on
    # sending some key; agents keep their old OpenAI key): True, False, or None for auto (only
    # while no tenant has keys: once one has, an unknown key was meant for it and is 401).
    ignore_client_keys: Annotated[bool | None, BeforeValidator(_auto)] = None
    session_ttl_seconds: Int(1, 1 << 40) = 7 * 24 * 3600
    history: OneOf("auto", "client", "proxy") = "auto"
    concurrency: OneOf("serialize", "reject") = "serialize"
    upstream_timeout_seconds: Int(1, 86400) = 600
    max_response_bytes: Int(1024, 1 << 40) = DEFAULT_MAX_RESPONSE_BYTES  # an upstream reply larger than this is a 502
    stateless: Bool = False  # plain proxying: no session state is read or recorded
    # Responses API built-in tools (web_search...) the upstream cannot run: left out with a warning, or 400.
    hosted_tools: OneOf("drop", "refuse") = "drop"
    persistence: Persistence = Persistence()
    sessions: SessionSettings = SessionSettings()
    quotas: QuotaSettings = QuotaSettings()  # rate limits and stored-data quotas (proxy/quotas.py)
    context: Annotated[ContextSettings, BeforeValidator(off_or_mapping)] = ContextSettings()  # proxy/context
    memory: MemorySettings = MemorySettings()  # long-term memory (proxy/memory)
    limits: RequestLimits = RequestLimits()  # per-request size limits (proxy/validate.py)
    # Provider extensions clients may send beyond the protocol's fields (proxy/protocol_fields.py).
    passthrough_fields: Annotated[frozenset[str], BeforeValidator(_passthrough)] = frozenset()
    models: Annotated[Mapping[str, ModelRoute], BeforeValidator(_models), Frozen,
                      Rule("must map at least one model alias to an upstream")]

    @model_validator(mode="after")
    def _consistent(self) -> TenantConfig:
        if not self.api_key_sha256 and not self.allow_unauthenticated:
            raise KeyedRule("api_key_sha256", "a tenant needs a key unless allow_unauthenticated is true")
        aliases = ", ".join(self.models)
        for key in ("summarizer_model", "tagger_model"):
            alias = getattr(self.context, key)
            if alias is not None and not self._has_alias(alias):
                raise KeyedRule(f"context.{key}", f"{alias!r} is not a model alias of this tenant (models: {aliases})")
        extractor = self.memory.extractor_model
        if extractor is not None and not self._has_alias(extractor):
            raise KeyedRule("memory.extractor_model", f"{extractor!r} is not a model alias of this tenant (models: {aliases})")
        if self.memory.embedder not in LOCAL_EMBEDDERS and not self._has_alias(self.memory.embedder):
            raise KeyedRule("memory.embedder", f"{_EMBEDDER_RULE} (models: {aliases})")
        return self

    def _has_alias(self, alias: str) -> bool:
        return alias in self.models or "*" in self.models

    @property
    def api_key_hashes(self) -> frozenset[str]:
        return self.api_key_sha256

    @property
    def session_ttl(self) -> float:
        return float(self.session_ttl_seconds)

    @property
    def upstream_timeout(self) -> float:
        return float(self.upstream_timeout_seconds)

    def route(self, requested: str) -> ResolvedModel | None:
        route = self.models.get(requested) or self.models.get("*")
        return route.resolve(requested, self.max_response_bytes, self.passthrough_fields) if route else None

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
        return [f"models.{alias}.api_key_env: {r.api_key_env} is not set"
                for alias, r in self.models.items() if r.api_key_env and r.api_key is None]
