"""``POST /v1/responses/compact``: shrink a conversation into the items a client continues from.

Codex CLI calls it when a conversation nears the context window. The proxy answers from its
own compaction (the context stage's extractive summarizer: no model call, deterministic):
the instructions (system/developer messages) and the newest user messages stay verbatim, and
everything else becomes one ``compaction`` item. Its ``encrypted_content`` is opaque to the
client but not encrypted: ``asp1.`` + base64 of the summary. When the client sends the item
back, the parser turns it into an assistant message holding the summary, so the transcript
records the compacted conversation as a branch that starts with that summary, while the full
history before it stays on the old branch.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

from proxy import tokens
from proxy.context import summarizer
from proxy.context.units import text_of

PREFIX = "asp1."
KEPT_USER_TOKENS = 8000  # newest user messages kept verbatim, like Codex's own local compaction
SUMMARY_TOKENS = 1500


def encode(summary: str) -> str:
    return PREFIX + base64.urlsafe_b64encode(zlib.compress(summary.encode())).decode()


def decode(content: Any) -> str | None:
    """The summary inside a compaction item the proxy made; None for anyone else's (OpenAI's are encrypted)."""
    if not isinstance(content, str) or not content.startswith(PREFIX):
        return None
    try:
        return zlib.decompress(base64.urlsafe_b64decode(content[len(PREFIX):].encode())).decode()
    except (ValueError, zlib.error, UnicodeDecodeError):
        return None


def summary_message(summary: str) -> dict[str, Any]:
    return {"role": "assistant", "content": "Summary of the conversation so far (compacted by agent-state-proxy):\n" + summary}


def compact(messages: list[dict[str, Any]], model: str, compaction_id: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The output items of a compaction of chat ``messages``, and (input, output) token counts."""
    encoding = tokens.encoding_for(model)
    instructions = [m for m in messages if m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    kept: list[dict[str, Any]] = []
    used = 0
    for message in reversed(rest):
        if message.get("role") != "user":
            continue
        cost = tokens.count_text(text_of(message), encoding)
        if used + cost > KEPT_USER_TOKENS:
            break
        kept.insert(0, message)
        used += cost
    kept_ids = {id(m) for m in kept}
    older = [(None, m) for m in rest if id(m) not in kept_ids]
    summary = summarizer.extractive_segment(older, SUMMARY_TOKENS, encoding) or "(nothing to summarize yet)"
    items = [_message_item(m) for m in instructions + kept]
    items.append({"id": compaction_id, "type": "compaction", "encrypted_content": encode(summary), "created_by": "agent-state-proxy"})
    counted = {"input": sum(tokens.count_text(text_of(m), encoding) for m in messages), "output": tokens.count_text(summary, encoding)}
    return items, counted


def _message_item(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        parts = [{"type": "input_text", "text": content}]
    else:
        parts = []
        for part in content or ():
            if part.get("type") == "text":
                parts.append({"type": "input_text", "text": part.get("text", "")})
            elif part.get("type") == "image_url":
                parts.append({"type": "input_image", "image_url": (part.get("image_url") or {}).get("url"), "detail": "auto"})
    return {"type": "message", "role": message["role"], "content": parts}
