"""A tenant's context-management options (the ``context`` key), validated into a frozen value.

Validation raises ``ValueError("<key>: <rule>")``; proxy.config prefixes the file name. Every
option is documented in config/proxy.yaml and docs/CONTEXT.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

STRATEGIES = ("window", "summaries", "importance", "retrieval")

DEFAULTS: dict[str, Any] = {
    "strategy": list(STRATEGIES),
    "max_context_tokens": None,
    "context_window_fraction": 0.75,
    "context_window": None,
    "fallback_context_window": 8192,
    "reserve_completion_tokens": 1024,
    "window_turns": 8,
    "window_share": 0.5,
    "segment_turns": 6,
    "summary_tokens": 256,
    "summarizer_model": None,
    "summarizer_timeout_seconds": 30,
    "tagger_model": None,
    "summarize_at_fraction": 0.8,
    "pin_share": 0.25,
    "retrieval_share": 0.1,
    "high_water": 1.0,
    "low_water": 0.5,
    "tail_share_of_saved": 0.03,
    "cache_breakpoints": True,
    "prompt_cache_key": False,
}


@dataclass(frozen=True)
class ContextSettings:
    strategy: tuple[str, ...] = STRATEGIES  # empty: context management off
    max_context_tokens: int | None = None  # prompt + completion; None: fraction of the window
    max_context_tokens_by_model: Mapping[str, int | None] = field(default_factory=lambda: MappingProxyType({}))
    context_window_fraction: float = 0.75
    context_window: int | None = None  # override of the model's window (None: litellm's table)
    context_window_by_model: Mapping[str, int | None] = field(default_factory=lambda: MappingProxyType({}))
    fallback_context_window: int = 8192  # models litellm does not know
    reserve_completion_tokens: int = 1024
    window_turns: int = 8
    window_share: float = 0.5
    segment_turns: int = 6
    summary_tokens: int = 256
    summarizer_model: str | None = None
    summarizer_timeout: float = 30.0
    tagger_model: str | None = None
    summarize_at_fraction: float = 0.8
    pin_share: float = 0.25
    retrieval_share: float = 0.1
    high_water: float = 1.0  # share of the budget at which the conversation is compacted...
    low_water: float = 0.5  # ...down to this share, so following turns append to a stable prefix
    tail_share_of_saved: float | None = 0.03  # per-request blocks of a compacted request: at most this share of what it saves
    cache_breakpoints: bool = True  # Anthropic routes: a cache_control breakpoint at the end of the stable prefix
    prompt_cache_key: bool = False  # OpenAI routes: send the session as prompt_cache_key

    @property
    def enabled(self) -> bool:
        return bool(self.strategy)

    def uses(self, strategy: str) -> bool:
        return strategy in self.strategy

    def budget_override(self, alias: str) -> int | None:
        """The explicit max_context_tokens for a model alias (None: derive from the window)."""
        by_model = self.max_context_tokens_by_model
        if alias in by_model:
            return by_model[alias]
        return by_model.get("*", self.max_context_tokens)

    def window_override(self, alias: str) -> int | None:
        by_model = self.context_window_by_model
        if alias in by_model:
            return by_model[alias]
        return by_model.get("*", self.context_window)


OFF = ContextSettings(strategy=())


def parse(raw: Any) -> ContextSettings:
    """Validate a ``context`` mapping (over DEFAULTS) into ContextSettings."""
    if raw is None or raw is False or raw == "off":
        return OFF
    if not isinstance(raw, dict):
        raise ValueError(": must be a mapping, or off")
    unknown = sorted(str(k) for k in raw if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (allowed: {', '.join(sorted(DEFAULTS))})")
    value = DEFAULTS | raw
    strategy = _strategy(value["strategy"])
    budget, budget_by_model = _per_model(value["max_context_tokens"], "max_context_tokens", 16, 1 << 24)
    window, window_by_model = _per_model(value["context_window"], "context_window", 16, 1 << 24)
    settings = ContextSettings(
        strategy=strategy,
        max_context_tokens=budget,
        max_context_tokens_by_model=budget_by_model,
        context_window_fraction=_fraction(value["context_window_fraction"], "context_window_fraction"),
        context_window=window,
        context_window_by_model=window_by_model,
        fallback_context_window=_int(value["fallback_context_window"], "fallback_context_window", 256, 1 << 24),
        reserve_completion_tokens=_int(value["reserve_completion_tokens"], "reserve_completion_tokens", 0, 1 << 22),
        window_turns=_int(value["window_turns"], "window_turns", 1, 100_000),
        window_share=_fraction(value["window_share"], "window_share"),
        segment_turns=_int(value["segment_turns"], "segment_turns", 1, 1000),
        summary_tokens=_int(value["summary_tokens"], "summary_tokens", 16, 1 << 16),
        summarizer_model=_alias(value["summarizer_model"], "summarizer_model"),
        summarizer_timeout=float(_int(value["summarizer_timeout_seconds"], "summarizer_timeout_seconds", 1, 3600)),
        tagger_model=_alias(value["tagger_model"], "tagger_model"),
        summarize_at_fraction=_fraction(value["summarize_at_fraction"], "summarize_at_fraction"),
        pin_share=_fraction(value["pin_share"], "pin_share", zero_ok=True),
        retrieval_share=_fraction(value["retrieval_share"], "retrieval_share", zero_ok=True),
        high_water=_fraction(value["high_water"], "high_water"),
        low_water=_fraction(value["low_water"], "low_water"),
        tail_share_of_saved=None if value["tail_share_of_saved"] is None else _fraction(value["tail_share_of_saved"], "tail_share_of_saved", zero_ok=True),
        cache_breakpoints=_bool(value["cache_breakpoints"], "cache_breakpoints"),
        prompt_cache_key=_bool(value["prompt_cache_key"], "prompt_cache_key"),
    )
    if settings.low_water > settings.high_water:
        raise ValueError(f"low_water: must be at most high_water ({settings.low_water:g} > {settings.high_water:g})")
    explicit = [b for b in (budget, *budget_by_model.values()) if b is not None]
    for tokens in explicit:
        if tokens <= settings.reserve_completion_tokens:
            raise ValueError(
                f"max_context_tokens: must be larger than reserve_completion_tokens "
                f"({tokens} <= {settings.reserve_completion_tokens})"
            )
    return settings


def _strategy(value: Any) -> tuple[str, ...]:
    if value is None or value is False or value == "off" or value == []:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"strategy: must be a list of {', '.join(STRATEGIES)} (or off)")
    for name in value:
        if name not in STRATEGIES:
            raise ValueError(f"strategy: unknown strategy {name!r} (allowed: {', '.join(STRATEGIES)})")
    if len(set(value)) != len(value):
        raise ValueError("strategy: lists a strategy twice")
    return tuple(s for s in STRATEGIES if s in value)


def _per_model(value: Any, key: str, low: int, high: int) -> tuple[int | None, Mapping[str, int | None]]:
    """An integer, null, or a mapping of model alias ("*" for the rest) to integer-or-null."""
    if isinstance(value, dict):
        by_model = {}
        for alias, tokens in value.items():
            by_model[str(alias)] = None if tokens is None else _int(tokens, f"{key}.{alias}", low, high)
        return None, MappingProxyType(by_model)
    return (None if value is None else _int(value, key, low, high)), MappingProxyType({})


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}: must be an integer between {low} and {high}")
    return value


def _fraction(value: Any, key: str, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1) or (value == 0 and not zero_ok):
        rule = "between 0 and 1" if zero_ok else "greater than 0 and at most 1"
        raise ValueError(f"{key}: must be a number {rule}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false")
    return value


def _alias(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: must be a model alias of this tenant, or null")
    return value
