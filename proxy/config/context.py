"""A tenant's context-management options (the ``context`` key); documented in config/proxy.yaml and docs/CONTEXT.md."""

from __future__ import annotations

from types import MappingProxyType
from typing import Annotated, Any, Mapping

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from proxy.config.errors import ConfigError, KeyedRule, Rule, validate
from proxy.config.fields import Bool, Fraction, Int, Section, Share

STRATEGIES = ("window", "summaries", "importance", "retrieval")
_TOKENS = (16, 1 << 24)  # bounds of an explicit budget or window


def _strategy(value: Any) -> tuple[str, ...]:
    if value is None or value is False or value == "off" or value == []:
        return ()
    if isinstance(value, (str, tuple)):
        value = [value] if isinstance(value, str) else list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of {', '.join(STRATEGIES)} (or off)")
    for name in value:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r} (allowed: {', '.join(STRATEGIES)})")
    if len(set(value)) != len(value):
        raise ValueError("lists a strategy twice")
    return tuple(s for s in STRATEGIES if s in value)


def _per_model(value: Any) -> Any:
    """An integer, null, or a mapping of model alias ("*" for the rest) to integer-or-null."""
    low, high = _TOKENS
    rule = f"must be an integer between {low} and {high}"
    for alias, tokens in (value.items() if isinstance(value, dict) else [("", value)]):
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not low <= tokens <= high):
            raise KeyedRule(str(alias), rule)
    return {str(a): t for a, t in value.items()} if isinstance(value, dict) else value


def _frozen(value: Any) -> Any:
    return MappingProxyType(value) if isinstance(value, dict) else value


# max_context_tokens, context_window: one value for every model, or {alias: value, "*": the rest}.
PerModel = Annotated[int | Mapping[str, int | None] | None, BeforeValidator(_per_model), AfterValidator(_frozen)]
Alias = Annotated[str, Field(strict=True, min_length=1), Rule("must be a model alias of this tenant, or null")]


class ContextSettings(Section):
    """``context``: keep what goes upstream within a token budget (README: Context)."""

    strategy: Annotated[tuple[str, ...], BeforeValidator(_strategy)] = STRATEGIES  # empty: context management off
    max_context_tokens: PerModel = None  # prompt + completion; None: fraction of the window
    context_window_fraction: Fraction = 0.75
    context_window: PerModel = None  # override of the model's window (None: litellm's table)
    fallback_context_window: Int(256, 1 << 24) = 8192  # models litellm does not know
    reserve_completion_tokens: Int(0, 1 << 22) = 1024
    window_turns: Int(1, 100_000) = 8
    window_share: Fraction = 0.5
    segment_turns: Int(1, 1000) = 6
    summary_tokens: Int(16, 1 << 16) = 256
    summarizer_model: Alias | None = None
    summarizer_timeout_seconds: Int(1, 3600) = 30
    tagger_model: Alias | None = None
    summarize_at_fraction: Fraction = 0.8
    pin_share: Share = 0.25
    retrieval_share: Share = 0.1
    high_water: Fraction = 1.0  # share of the budget at which the conversation is compacted...
    low_water: Fraction = 0.5  # ...down to this share, so following turns append to a stable prefix
    tail_share_of_saved: Share | None = 0.03  # per-request blocks of a compacted request: at most this share of what it saves
    cache_breakpoints: Bool = True  # Anthropic routes: a cache_control breakpoint at the end of the stable prefix
    prompt_cache_key: Bool = False  # OpenAI routes: send the session as prompt_cache_key

    @model_validator(mode="after")
    def _consistent(self) -> ContextSettings:
        if self.low_water > self.high_water:
            raise KeyedRule("low_water", f"must be at most high_water ({self.low_water:g} > {self.high_water:g})")
        budgets = self.max_context_tokens.values() if isinstance(self.max_context_tokens, Mapping) else [self.max_context_tokens]
        for tokens in budgets:
            if tokens is not None and tokens <= self.reserve_completion_tokens:
                raise KeyedRule("max_context_tokens", f"must be larger than reserve_completion_tokens "
                                                      f"({tokens} <= {self.reserve_completion_tokens})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.strategy)

    @property
    def summarizer_timeout(self) -> float:
        return float(self.summarizer_timeout_seconds)

    def uses(self, strategy: str) -> bool:
        return strategy in self.strategy

    def budget_override(self, alias: str) -> int | None:
        """The explicit max_context_tokens for a model alias (None: derive from the window)."""
        return _for_model(self.max_context_tokens, alias)

    def window_override(self, alias: str) -> int | None:
        return _for_model(self.context_window, alias)


def _for_model(value: int | Mapping[str, int | None] | None, alias: str) -> int | None:
    if isinstance(value, Mapping):
        return value[alias] if alias in value else value.get("*")
    return value


OFF = ContextSettings(strategy=())


def off_or_mapping(value: Any) -> Any:
    """A ``context`` value: off (None, false, "off") or a mapping over the defaults."""
    if value is None or value is False or value == "off":
        return OFF
    if not isinstance(value, (dict, ContextSettings)):
        raise ValueError("must be a mapping, or off")
    return value


def parse(raw: Any) -> ContextSettings:
    """Validate a ``context`` value outside a tenant file (errors say ``context.<key>: <rule>``)."""
    try:
        value = off_or_mapping(raw)
    except ValueError as exc:
        raise ConfigError(f"context: {exc}") from None
    return value if isinstance(value, ContextSettings) else validate(ContextSettings, value, prefix="context.")
