"""Token counting with tiktoken, using the encodings litellm ships so no download is needed."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import orjson

# Per-message framing overhead in OpenAI's chat format (role markers, separators).
_MESSAGE_OVERHEAD = 4


@functools.cache
def _encoding():
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        spec = importlib.util.find_spec("litellm")
        if spec and spec.submodule_search_locations:
            bundled = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
            if bundled.is_dir():
                os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base")
    except Exception:  # no bundled encoding and no network: fall back to an estimate
        return None


def count_text(text: str) -> int:
    encoding = _encoding()
    if encoding is None:
        return max(1, len(text) // 4) if text else 0
    return len(encoding.encode(text, disallowed_special=()))


def count_message(body: dict[str, Any]) -> int:
    """Tokens one chat message costs in a prompt (content, tool calls and framing)."""
    content = body.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    else:
        text = ""
    if body.get("tool_calls"):
        text += orjson.dumps(body["tool_calls"]).decode()
    if body.get("name"):
        text += " " + str(body["name"])
    return count_text(text) + _MESSAGE_OVERHEAD
