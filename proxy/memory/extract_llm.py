"""The extractor model's request and the validation of its reply (no I/O here).

The model sees the new turns of a session (numbered by seq) and the user's current extracted
memories (by id, so it can say which one a new fact replaces), and answers with JSON. Anything
else (not JSON, the wrong shape, a reply cut off at the token limit) raises ``BadReply``: the
caller logs it and retries; single malformed items are dropped, and so are the placeholders of
the prompt's answer format that a small model copies back ("...", "<id>", "null").
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from proxy.memory.extract_rules import KINDS, MAX_TEXT, Candidate, normal_subject
from proxy.memory.model import PROCEDURAL, SEMANTIC, Memory, message_text
from proxy.records import Message

MAX_ITEMS = 50  # memories taken from one reply
_MESSAGE_CHARS = 2000
_KNOWN = 30  # current memories shown to the model
# The reply's length limit: a real answer takes a few hundred tokens; a small model that loops
# (Gemma 3 270M repeats JSON keys until its context is full: 7,800 tokens, 5 minutes on 2 cores)
# is cut here instead (docs/MEMORY_LEARNING.md, "Tried against a real local model").
MAX_REPLY_TOKENS = 2048
_WORD = re.compile(r"\w")
_KEY = re.compile(r"[\w .:/-]+")  # a subject key or a memory id as the prompt shows them
_NO_KEY = {"null", "none", "n/a"}  # JSON null written as a string

PROMPT = (
    "You extract long-term memories from a conversation between a user and an AI assistant (with its tool "
    "calls), for agent-state-proxy. Keep only what is worth knowing in later conversations:\n"
    "- durable facts about the user, their work and projects (names, places, jobs, numbers, dates);\n"
    "- preferences and standing instructions (\"The user wants answers in French.\");\n"
    "- decisions and commitments;\n"
    "- lessons from failures and corrections (\"When X failed, Y worked.\").\n"
    "Skip small talk, questions, and what matters only right now. Write each memory as one self-contained "
    "sentence. Give facts a short \"subject\" key for what they are about (\"user.home_city\", "
    "\"project.database\"), so that a later change replaces them. When a new memory contradicts or updates one of "
    "the known memories, set \"replaces\" to that memory's id. Use type \"procedural\" for preferences and "
    "lessons, \"semantic\" otherwise.\n"
    'Answer with JSON only: {"memories": [{"type": "semantic", "kind": "fact", "text": "...", "subject": "..." or null, '
    '"replaces": "<id>" or null, "seqs": [<message numbers>]}]}; an empty list when there is nothing to keep.'
)


class BadReply(ValueError):
    """The extractor's answer is not the JSON asked for (or the call itself failed)."""


def request(model: str, window: Sequence[Message], known: Sequence[Memory]) -> dict[str, Any]:
    """The chat request asking ``model`` for the memories in ``window``."""
    lines = []
    for memory in known[:_KNOWN]:
        subject = f" ({memory.subject})" if memory.subject else ""
        lines.append(f"[{memory.id}]{subject} {' '.join(memory.text.split())[:300]}")
    conversation = [_line(m) for m in window]
    content = ("Known memories:\n" + ("\n".join(lines) if lines else "(none)") + "\n\nConversation:\n" + "\n".join(c for c in conversation if c))
    return {
        "model": model,
        "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": MAX_REPLY_TOKENS,
        "response_format": {"type": "json_object"},
    }


def _line(message: Message) -> str:
    body = message.body
    text = message_text(body)[:_MESSAGE_CHARS]
    if message.role == "tool":
        return f"[{message.seq}] tool result: {text}" if text else ""
    return f"[{message.seq}] {message.role}: {text}" if text else ""


def parse(response: Any, seqs: Sequence[int]) -> list[Candidate]:
    """The candidates in the model's reply; BadReply when it is not the JSON asked for."""
    try:
        choice = response["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise BadReply(f"no message content in the reply ({type(exc).__name__})") from None
    if not isinstance(content, str):
        raise BadReply("the reply's content is not text")
    if choice.get("finish_reason") == "length":  # a model that ran on is not trusted, even where it parses
        raise BadReply("the reply was cut off at the token limit (finish_reason 'length')")
    starts = [i for i in (content.find("{"), content.find("[")) if i != -1]
    if not starts:
        raise BadReply("the reply holds no JSON")
    try:  # one JSON document, from its first bracket: code fences before it and prose after it are not part of it
        data, _ = json.JSONDecoder().raw_decode(content, min(starts))
    except (ValueError, RecursionError) as exc:
        raise BadReply(f"the reply is not valid JSON ({str(exc)[:100]})") from None
    items = data.get("memories") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BadReply("the reply has no 'memories' list")
    wanted = set(seqs)
    return [c for c in (_candidate(item, wanted) for item in items[:MAX_ITEMS]) if c is not None]


def _candidate(item: Any, seqs: set[int]) -> Candidate | None:
    if not isinstance(item, dict):
        return None
    text = item.get("text")
    if not isinstance(text, str) or not 3 <= len(text.strip()) <= MAX_TEXT or not _WORD.search(text):
        return None  # (no word in it: the format's "..." copied back)
    kind = item.get("kind") if item.get("kind") in KINDS else "fact"
    kind_type = PROCEDURAL if kind in ("preference", "lesson") else SEMANTIC
    memory_type = item.get("type") if item.get("type") in (SEMANTIC, PROCEDURAL) else kind_type
    cited = item.get("seqs")
    found = sorted({s for s in cited if isinstance(s, int) and not isinstance(s, bool) and s in seqs}) if isinstance(cited, list) else []
    replaces = _key(item.get("replaces"))
    subject = _key(item.get("subject"))
    return Candidate(" ".join(text.split()), memory_type, kind, found or sorted(seqs), normal_subject(subject), replaces and replaces[:100])


def _key(value: Any) -> str | None:
    """A subject key or memory id as given, or None for what names none: null spelled as a
    string, or a placeholder of the answer format ("<id>" would otherwise become the subject
    "id", and every memory copying it would replace the one before)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if value.lower() not in _NO_KEY and _KEY.fullmatch(value) else None
