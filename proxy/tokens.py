"""Token counting with tiktoken, using the encodings litellm ships so no download is needed."""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

from proxy.message_text import message_text

# Per-message framing overhead in OpenAI's chat format (role markers, separators).
_MESSAGE_OVERHEAD = 4
MESSAGE_OVERHEAD = _MESSAGE_OVERHEAD  # what an empty message costs
# The encoding used when a model has no tiktoken encoding of its own (any non-OpenAI model):
# an approximation of the provider's tokenizer, documented as such.
DEFAULT_ENCODING = "cl100k_base"
# Encodings litellm bundles, so they load without network access.
_BUNDLED = ("cl100k_base", "o200k_base", "p50k_base")


def encoding_for(model: str | None) -> str:
    """Name of the tiktoken encoding of ``model`` (a litellm model string or a bare name).

    OpenAI models get their own encoding; every other model gets ``DEFAULT_ENCODING``, an
    approximation (no other tokenizer ships offline with litellm).
    """
    if not model:
        return DEFAULT_ENCODING
    return _encoding_name(model.removeprefix("openai/").removeprefix("azure/"))


@functools.lru_cache(maxsize=1024)
def _encoding_name(name: str) -> str:
    try:
        from tiktoken.model import encoding_name_for_model

        found = encoding_name_for_model(name)
    except Exception:  # unknown model, or tiktoken missing
        return DEFAULT_ENCODING
    return found if found in _BUNDLED else DEFAULT_ENCODING


_encodings: dict[str, Any] = {}  # loaded encodings (None: unavailable)
_warming: set[str] = set()  # encodings being loaded in the background
_lock = threading.Lock()


def begin_warming(name: str = DEFAULT_ENCODING) -> None:
    """Mark an encoding as loading: until ``warm`` finishes, counts are estimates, not waits."""
    with _lock:
        if name not in _encodings:
            _warming.add(name)


def warm(name: str = DEFAULT_ENCODING) -> None:
    """Load an encoding now (start-up calls this in a thread: it takes ~0.3 s)."""
    with _lock:
        if name in _encodings:
            return
    encoding = _load(name)
    with _lock:
        _encodings[name] = encoding
        _warming.discard(name)


def _encoding(name: str = DEFAULT_ENCODING) -> Any:
    if name in _encodings:
        return _encodings[name]
    if name in _warming:
        return _ESTIMATE  # the first requests after start do not wait for the tables
    warm(name)
    return _encodings[name]


_ESTIMATE = object()


def _load(name: str) -> Any:
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        spec = importlib.util.find_spec("litellm")
        if spec and spec.submodule_search_locations:
            bundled = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
            if bundled.is_dir():
                os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
    try:
        import tiktoken

        encoding = tiktoken.get_encoding(name)
    except Exception:  # no bundled encoding and no network: fall back to an estimate
        return None
    # The Python copy of the BPE ranks only serves pickling; the Rust core that encodes holds
    # its own. Dropped, it leaves the process's own memory (RssAnon) for good: measured in
    # docs/BENCHMARKS.md (Interpreter tuning), where this is the one private attribute we touch.
    if isinstance(getattr(encoding, "_mergeable_ranks", None), dict):
        encoding._mergeable_ranks = {}
    return encoding


def count_text(text: str, encoding_name: str = DEFAULT_ENCODING) -> int:
    encoding = _encoding(encoding_name)
    if encoding is None or encoding is _ESTIMATE:
        # Without the tokenizer (or while it loads): half the UTF-8 bytes, which over-counts
        # English and CJK alike, so budgets err on the safe side (docs/CONTEXT.md).
        return len(text.encode("utf-8", "replace")) // 2 + 1 if text else 0
    return len(encoding.encode(text, disallowed_special=()))


def prefix_within(text: str, max_tokens: int, encoding_name: str = DEFAULT_ENCODING, after: str = "") -> str:
    """The longest prefix of ``text`` that, followed by ``after`` (an ellipsis, say), counts at
    most ``max_tokens`` tokens ("" when none does)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count_text(text[:middle] + after, encoding_name) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def count_recurring(text: str, encoding_name: str = DEFAULT_ENCODING) -> int:
    """``count_text`` for texts that come back request after request (a recalled memory's line,
    a fixed header): cached once the tokenizer is loaded, never the estimate."""
    encoding = _encoding(encoding_name)
    if encoding is None or encoding is _ESTIMATE:
        return count_text(text, encoding_name)
    return _count_cached(text, encoding_name)


@functools.lru_cache(maxsize=8192)
def _count_cached(text: str, encoding_name: str) -> int:
    return count_text(text, encoding_name)


def count_message(body: dict[str, Any], encoding_name: str = DEFAULT_ENCODING) -> int:
    """Tokens one chat message costs in a prompt (content, tool calls and framing)."""
    text = message_text(body, billed=True)
    return count_text(text, encoding_name) + _MESSAGE_OVERHEAD
