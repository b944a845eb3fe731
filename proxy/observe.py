"""What the request pipeline reports as it runs: stage timings, upstream failures, recalls, tokens.

The pipeline calls these hooks, which do nothing here; the server's metrics
(proxy/server/metrics.py) override them, so the pipeline never imports a metrics library.
"""

from __future__ import annotations

from typing import Any, Mapping


class Observer:
    def stage(self, tenant: str, stage: str, seconds: float) -> None:
        """One pipeline stage (identify, load, reconcile, context, recall, upstream, record) ran."""

    def upstream_failed(self, tenant: str, model: str, status: int) -> None:
        """The provider call failed; ``model`` is the litellm model string, ``status`` what the client got."""

    def recalled(self, tenant: str, seconds: float, missed_budget: bool) -> None:
        """A memory recall (query embedding included) ended, in or over its latency budget."""

    def recorded(self, tenant: str, session: str, usage: Mapping[str, Any] | None, saved_tokens: int) -> None:
        """A request's answer was recorded: the provider's usage, and the tokens compaction saved."""
