"""Provider prompt caching: cache hints on the forwarded request, cached-token accounting from the answer.

Providers bill the prefix a prompt shares with a recent one at 10-50 % of the input price
(OpenAI automatically, Anthropic at ``cache_control`` breakpoints). Context assembly keeps the
forwarded prompt append-mostly (``assemble.py``); this module tells the provider where that
stable prefix ends and records what the provider says it read from its cache:

- Anthropic routes (litellm model ``anthropic/...``): the client's ``cache_control``
  breakpoints are kept as sent; when it set none, one goes on the last message of the compacted
  part (system prompt, summaries, pins: it changes only at a compaction) and one on the last
  message before the newest turn's proxy blocks (recalled turns and memories change every turn,
  so a breakpoint after them would write a cache entry no later request reads). Tenant switch:
  ``context.cache_breakpoints``.
- OpenAI routes: ``prompt_cache_key`` (a hash of tenant and session, never the session name
  itself) routes the session's requests to the same cache when ``context.prompt_cache_key``.
- Accounting: ``usage.prompt_tokens_details.cached_tokens`` (OpenAI; litellm sets it for
  Anthropic too) or ``cache_read_input_tokens``, and ``cache_creation_input_tokens``; per-session
  totals in ``Session.extra["cache"]``, the tenant's as their sum (admin).
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any, Iterable

from proxy.context.assemble import RECALL_OPEN
from proxy.context.settings import ContextSettings
from proxy.memory.inject import HEADER as MEMORY_HEADER

if TYPE_CHECKING:
    from proxy.config import ResolvedModel
    from proxy.records import Session

EPHEMERAL = {"type": "ephemeral"}
# Blocks the proxy adds right before the newest user message; they change every turn.
_TAIL_MARKERS = (RECALL_OPEN, MEMORY_HEADER)
TOTAL_KEYS = ("requests", "prompt_tokens", "cached_tokens", "cache_creation_tokens")


def add_hints(body: dict[str, Any], route: ResolvedModel, tenant: str, session_id: str, settings: ContextSettings) -> dict[str, Any]:
    """``body`` with the cache hints for ``route`` (a new dict when any is added; the client's
    objects are never changed)."""
    if settings.prompt_cache_key and _is_openai(route) and not body.get("prompt_cache_key"):
        digest = hashlib.sha256(f"{tenant}\0{session_id}".encode()).hexdigest()[:32]
        body = body | {"prompt_cache_key": f"asp-{digest}"}
    if settings.cache_breakpoints and _is_anthropic(route):
        messages = body.get("messages")
        if isinstance(messages, list) and not _has_breakpoint(body):
            marked = place_breakpoints(messages)
            if marked is not messages:
                body = body | {"messages": marked}
    return body


def place_breakpoints(messages: list[Any]) -> list[Any]:
    """``messages`` with ``cache_control`` on the last message of the compacted part and on the
    last message before the newest user turn's proxy blocks (a copy; unchanged when none fits)."""
    newest = next((i for i in range(len(messages) - 1, -1, -1) if _role(messages[i]) == "user" and not _is_tail(messages[i])), None)
    if newest is None:
        return messages
    end = newest
    while end > 0 and _is_tail(messages[end - 1]):
        end -= 1
    compacted = 0  # the leading system messages and the summary message
    while compacted < end and _role(messages[compacted]) in ("system", "developer"):
        compacted += 1
    targets = {_markable_before(messages, end), _markable_before(messages, compacted)}
    targets.discard(None)
    if not targets:
        return messages
    marked = list(messages)
    for index in targets:
        marked[index] = _with_breakpoint(messages[index])
    return marked


def _markable_before(messages: list[Any], end: int) -> int | None:
    """The last message before ``end`` a breakpoint can go on (text content, not a tool turn)."""
    for index in range(end - 1, -1, -1):
        message = messages[index]
        if not isinstance(message, dict) or message.get("tool_calls") or _role(message) in ("tool", "function"):
            continue
        content = message.get("content")
        if isinstance(content, str) and content:
            return index
        if isinstance(content, list) and content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
            return index
    return None


def _with_breakpoint(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        parts = [{"type": "text", "text": content, "cache_control": dict(EPHEMERAL)}]
    else:
        parts = list(content)
        parts[-1] = copy.copy(parts[-1]) | {"cache_control": dict(EPHEMERAL)}
    return message | {"content": parts}


def _has_breakpoint(body: dict[str, Any]) -> bool:
    """Whether the client placed any cache_control (in messages, their parts, tools or system)."""
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        if "cache_control" in message:
            return True
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content):
            return True
    return any(isinstance(t, dict) and "cache_control" in t for t in body.get("tools") or ())


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def _is_tail(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, str) and content.startswith(_TAIL_MARKERS)


def _is_anthropic(route: ResolvedModel) -> bool:
    return not route.direct and route.model.startswith("anthropic/")


def _is_openai(route: ResolvedModel) -> bool:
    return route.direct or route.model.startswith("openai/") or "/" not in route.model


# -- accounting --------------------------------------------------------------------------------

def cache_usage(usage: dict[str, Any]) -> tuple[int, int]:
    """(tokens read from the provider's cache, tokens written to it) of one response's usage."""
    details = usage.get("prompt_tokens_details")
    read = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    read = max(read, _int(usage.get("cache_read_input_tokens")))
    return read, _int(usage.get("cache_creation_input_tokens"))


def account(session: Session, usage: dict[str, Any]) -> dict[str, str]:
    """Add one response's prompt and cached tokens to its session's totals; returns the response
    headers that carry them (sent when the headers are still to be sent: non-streaming answers)."""
    read, written = cache_usage(usage)
    prompt = _int(usage.get("prompt_tokens"))
    totals = session.extra.setdefault("cache", {})
    for key, value in zip(TOTAL_KEYS, (1, prompt, read, written)):
        totals[key] = int(totals.get(key, 0)) + value
    totals["last"] = {"prompt_tokens": prompt, "cached_tokens": read, "cache_creation_tokens": written}
    return {"X-Context-Cached-Tokens": str(read), "X-Context-Prompt-Tokens": str(prompt)}


def tenant_totals(sessions: Iterable[Session]) -> dict[str, int]:
    """The tenant's totals: its stored sessions' cache totals and the tokens compaction saved."""
    result = dict.fromkeys(TOTAL_KEYS, 0) | {"tokens_saved_by_compaction": 0, "sessions": 0}
    for session in sessions:
        totals = session.extra.get("cache") or {}
        for key in TOTAL_KEYS:
            result[key] += _int(totals.get(key))
        result["tokens_saved_by_compaction"] += _int((session.extra.get("context") or {}).get("tokens_saved"))
        result["sessions"] += 1
    return result


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
