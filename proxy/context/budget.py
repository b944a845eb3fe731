"""The token budget of one request: the model's context window, the tenant's limit, the reserve.

The window comes from litellm's bundled ``model_prices_and_context_window_backup.json``, read
as plain JSON from the installed package (importing litellm takes seconds). A model it does
not know gets the tenant's ``fallback_context_window``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy import tokens
from proxy.context.settings import ContextSettings
from proxy.errors import BadRequest

log = logging.getLogger("agent_state_proxy.context")

_TABLE_FILE = "model_prices_and_context_window_backup.json"
# Request fields that cost prompt tokens besides the messages.
_OVERHEAD_FIELDS = ("tools", "functions", "response_format", "tool_choice")


@dataclass(frozen=True)
class Budget:
    """How many tokens the messages of one request may take."""

    model: str  # the litellm model string
    window: int  # the model's context window
    window_known: bool  # False: the fallback was assumed
    total: int  # max_context_tokens: prompt + completion
    reserve: int  # kept free for the completion
    prompt: int  # what the prompt (messages + tools) may take
    encoding: str  # tiktoken encoding used to count
    kept_free: int = 0  # of the asked reserve, kept out of ``prompt`` for content added later


@functools.cache
def _context_table() -> dict[str, int]:
    """Model name → context window (input tokens) from litellm's bundled table; {} if absent."""
    spec = importlib.util.find_spec("litellm")
    if not spec or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / _TABLE_FILE
    try:
        raw = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s): every model uses fallback_context_window", path, exc)
        return {}
    table: dict[str, int] = {}
    for name, info in raw.items():
        if not isinstance(info, dict):
            continue
        window = info.get("max_input_tokens") or info.get("max_tokens")
        if isinstance(window, int) and window > 0:
            table[name.lower()] = window
    return table


def context_window(model: str) -> int | None:
    """The context window litellm knows for ``model`` ("provider/name" or "name"), else None."""
    table = _context_table()
    name = model.lower()
    for candidate in (name, name.split("/", 1)[1] if "/" in name else None, name.rsplit("/", 1)[-1]):
        if candidate and candidate in table:
            return table[candidate]
    return None


def budget_for(settings: ContextSettings, alias: str, model: str, body: dict[str, Any], keep_free: int = 0) -> Budget:
    """The budget of a request for model alias ``alias`` routed to litellm model ``model``.

    Prompt budget = min(max_context_tokens − reserve_completion_tokens, window − the
    request's own max_tokens), where max_context_tokens defaults to
    context_window_fraction × the window; less ``keep_free`` tokens for content added after
    assembly (the long-term memory block), at most a quarter of it: the conversation itself
    keeps most of the budget.
    """
    window = settings.window_override(alias)
    known = window is not None
    if window is None:
        window = context_window(model)
        known = window is not None
    if window is None:
        window = settings.fallback_context_window
    total = settings.budget_override(alias)
    if total is None:
        total = int(window * settings.context_window_fraction)
    total = min(total, window)
    reserve = settings.reserve_completion_tokens
    prompt = total - reserve
    requested = _requested_completion(body)
    if requested is not None:
        prompt = min(prompt, window - requested)
    if prompt <= 0:
        raise BadRequest(
            f"no room for the prompt: the context budget of model '{alias}' is {total} tokens "
            f"(window {window}{'' if known else ', assumed: unknown to litellm'}) and "
            f"{max(reserve, requested or 0)} are reserved for the completion; lower max_tokens "
            "or raise context.max_context_tokens / context.context_window",
            code="context_length_exceeded",
        )
    kept_free = min(max(keep_free, 0), prompt // 4)
    return Budget(model, window, known, total, reserve, prompt - kept_free, tokens.encoding_for(model), kept_free)


def _requested_completion(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def request_overhead(body: dict[str, Any], encoding: str) -> int:
    """Prompt tokens a request costs besides its messages (tool definitions, schemas)."""
    extra = {k: body[k] for k in _OVERHEAD_FIELDS if body.get(k)}
    if not extra:
        return 0
    return tokens.count_text(orjson.dumps(extra).decode(), encoding)

