"""Importance tags: which messages state a decision, commitment, preference or fact.

Rules tag every message when it is recorded (``tag_message``, called by Pipeline._record);
an optional per-tenant LLM tagger (``tagger_request`` / ``parse_tagger_reply``) adds tags in
the background. Tagged messages are *pinned*: the assembler keeps them verbatim, by
``PRIORITY``, while they fit their share of the budget.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import orjson

from proxy.context.units import text_of

TAGS = ("decision", "commitment", "preference", "fact")
# Pin priority per tag (higher is kept first); a mid-conversation system message is an instruction.
PRIORITY = {"instruction": 5, "decision": 4, "commitment": 4, "preference": 3, "fact": 2}

# Patterns are lowercase and matched against lowercased text: faster than re.I, and this runs
# on every recorded message.
_RULES: dict[str, re.Pattern[str]] = {
    "decision": re.compile(
        r"\b(we|i)(?:'ve| have)? decided\b|\blet'?s go with\b|\bwe(?:'ll| will) (?:go with|use)\b|\bdecision\s*:|"
        r"\b(?:agreed|settled) (?:on|to)\b|\bthe plan is\b|\bwe chose\b|\bi chose\b|\bfinal (?:answer|decision)\b",
    ),
    "commitment": re.compile(
        r"\bi promise\b|\bi commit\b|\bremind me\b|\bdeadline\b|\bdue (?:by|on)\b|\baction item\b|\bto-?do\s*:|"
        r"\b(?:i|we)(?:'ll| will| shall|'m going to| am going to| are going to)\b[^.!?\n]{0,80}?"
        r"\b(?:tomorrow|tonight|today|next (?:week|month|year)|this (?:week|weekend|month)|by (?:the )?\w+|"
        r"on (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)|at \d|in \d+ (?:minutes|hours|days|weeks))\b",
    ),
    "preference": re.compile(
        r"\bi (?:really )?(?:prefer|like|love|hate|dislike|enjoy|can't stand|cannot stand)\b|\bmy fav(?:ou)?rite\b|"
        r"\bi(?:'d| would) rather\b|\bi don'?t (?:like|want)\b|\b(?:please )?(?:always|never) (?:use|do|call|say|reply|answer|write)\b|"
        r"\bi want you to\b",
    ),
    "fact": re.compile(
        r"\bmy (?:name|email|phone|address|birthday|age|wife|husband|partner|son|daughter|kids?|children|mom|mother|dad|father|"
        r"sister|brother|dog|cat|job|company|team|boss|account|password|code|number|id)\b|\bi(?:'m| am) (?:an?(?! (?:bit|little|lot)\b)|from|allergic|"
        r"\d+ years)\b|\bi (?:live|work|grew up|was born|moved|studied)\b|\bremember (?:that|this)\b|\bnote that\b|"
        r"\bimportant\s*:|\b\d{4}-\d{2}-\d{2}\b|\b[\w.+-]+@[\w-]+\.[\w.]+\b",
    ),
}
# Substrings every match of a rule contains (at least one of them). A message containing none
# of a rule's triggers cannot match it, so the regex runs only when one is present: a C-speed
# substring scan instead of trying each alternation at every position (docs/BENCHMARKS.md).
# tests/test_importance.py checks the triggers stay necessary.
_TRIGGERS: dict[str, tuple[str, ...]] = {
    "decision": ("decided", "go with", "we'll", "we will", "decision", "agreed", "settled", "plan is", "chose", "final"),
    "commitment": ("promise", "commit", "remind me", "deadline", "due ", "action item", "to-do", "todo", "'ll", "will",
                   "shall", "going to"),
    "preference": ("prefer", "like", "love", "hate", "enjoy", "stand", "fav", "rather", "want", "always", "never"),
    "fact": ("my ", "i'm ", "i am ", "i live", "i work", "i grew up", "i was born", "i moved", "i studied", "remember",
             "note that", "important", "-", "@"),
}
_TAGGED_ROLES = ("user", "assistant")
_MAX_RULE_CHARS = 4000  # tag from the beginning of long messages only: rules must stay fast


def tag_message(body: dict[str, Any]) -> list[str] | None:
    """Rule-based tags of one message (user and assistant text), or None."""
    if body.get("role") not in _TAGGED_ROLES:
        return None
    text = text_of(body)[:_MAX_RULE_CHARS].lower()
    if not text:
        return None
    found = [tag for tag, rule in _RULES.items()
             if any(map(text.__contains__, _TRIGGERS[tag])) and rule.search(text)]
    return found or None


def priority(tags: Sequence[str] | None) -> int:
    return max((PRIORITY.get(t, 0) for t in tags), default=0) if tags else 0


# -- the optional LLM tagger -------------------------------------------------------------------

TAGGER_PROMPT = (
    "You label chat messages for agent-state-proxy's importance tagger. For each numbered message, "
    "list which of these labels apply: decision (something was decided or chosen), commitment (someone "
    "promised or scheduled to do something), preference (a like, dislike or standing instruction), fact "
    "(a durable personal or project fact: names, numbers, dates, places). Most messages have none. "
    'Answer with JSON only: {"labels": {"<number>": ["label", ...], ...}} listing only messages with labels.'
)


def tagger_request(model: str, messages: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The chat request asking the tagger model to label ``(seq, body)`` messages."""
    lines = [f"[{seq}] {body.get('role')}: {text_of(body)[:2000]}" for seq, body in messages]
    return {
        "model": model,
        "messages": [{"role": "system", "content": TAGGER_PROMPT}, {"role": "user", "content": "\n".join(lines)}],
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }


def parse_tagger_reply(response: dict[str, Any], seqs: Sequence[int]) -> dict[int, list[str]]:
    """seq → tags from the tagger's reply; anything malformed is ignored."""
    try:
        content = response["choices"][0]["message"]["content"] or ""
        start, end = content.find("{"), content.rfind("}")
        labels = orjson.loads(content[start:end + 1]).get("labels", {})
    except (KeyError, IndexError, TypeError, AttributeError, orjson.JSONDecodeError):
        return {}
    wanted = set(seqs)
    result: dict[int, list[str]] = {}
    if not isinstance(labels, dict):
        return {}
    for key, tags in labels.items():
        try:
            seq = int(str(key).strip("[] "))
        except ValueError:
            continue
        if seq in wanted and isinstance(tags, list):
            clean = [t for t in TAGS if t in tags]
            if clean:
                result[seq] = clean
    return result
