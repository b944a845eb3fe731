"""Model routes: where a tenant's model alias goes upstream, and the route resolved for one request."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from proxy.config.errors import KeyedRule, Rule
from proxy.config.fields import Env, Frozen, OneOf, Section, Text

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # an upstream reply larger than this is refused (per tenant)
OPENAI_BASE = "https://api.openai.com/v1"


def _params(value: Any) -> Any:
    if not isinstance(value, dict) or {"api_base", "base_url", "api_key"} & set(value):
        raise ValueError("must be a mapping without api_base/base_url/api_key")
    return value


def _http_url(value: Any) -> Any:
    if value is not None and not re.match(r"^https?://", str(value)):
        raise ValueError("must be an http(s) URL")
    return value


class ModelRoute(Section):
    """``models.<alias>``: a litellm model string, or a mapping of these keys."""

    model: Annotated[Text, Env]  # litellm model string; may contain {model} for the "*" alias
    # Declared before api_base and api_key: their validators read `model` and `api_key_env`.
    api_key_env: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
                           Rule("must be an environment variable name")] | None = None
    # Before-validators run last-listed first: Env, then the URL check.
    api_base: Annotated[str | None, BeforeValidator(_http_url), Env] = Field(None, validate_default=True)
    # Resolved at load, from the file or from api_key_env; never logged.
    api_key: Annotated[str | None, Env] = Field(None, repr=False, validate_default=True)
    path: OneOf("auto", "direct", "litellm") = "auto"
    params: Annotated[Mapping[str, Any], BeforeValidator(_params), Frozen] = Field(default_factory=lambda: MappingProxyType({}))

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, spec: Any) -> Any:
        if isinstance(spec, str):
            return {"model": spec}
        if not isinstance(spec, dict):
            raise ValueError("must be a litellm model string or a mapping")
        return spec

    @field_validator("api_base")
    @classmethod
    def _openai_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and str(info.data.get("model", "")).startswith("openai/"):
            return OPENAI_BASE
        return value

    @field_validator("api_key")
    @classmethod
    def _key_from_env(cls, value: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("api_key_env")
        return os.environ.get(name) or None if value is None and name else value

    @model_validator(mode="after")
    def _direct_needs_openai(self) -> ModelRoute:
        if self.path == "direct" and not self.model.startswith("openai/"):
            raise KeyedRule("path", "'direct' needs an openai/ model and api_base")
        return self

    def resolve(self, requested: str, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                passthrough: frozenset[str] = frozenset()) -> ResolvedModel:
        """The route for a request naming ``requested`` (the tenant's cap and passthrough fields)."""
        model = self.model.replace("{model}", requested)
        direct_ok = model.startswith("openai/") and self.api_base is not None
        return ResolvedModel(
            requested=requested,
            model=model,
            upstream_model=model.removeprefix("openai/"),
            api_base=self.api_base.rstrip("/") if self.api_base else None,
            api_key=self.api_key,
            direct=self.path == "direct" or (self.path == "auto" and direct_ok and not self.params),
            params=self.params,
            max_response_bytes=max_response_bytes,
            passthrough=passthrough,
        )


@dataclass(frozen=True)
class ResolvedModel:
    """One request's upstream: the route with the requested name filled in."""

    requested: str
    model: str
    upstream_model: str
    api_base: str | None
    api_key: str | None = field(repr=False)
    direct: bool
    params: Mapping[str, Any]
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # the tenant's cap on one upstream reply (direct path)
    passthrough: frozenset[str] = frozenset()  # request fields forwarded beyond the protocol's
