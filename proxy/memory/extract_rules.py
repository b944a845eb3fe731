"""Memories extracted by rules, without a model: the importance tagger's facts, decisions,
commitments and preferences as sentences of the user's messages, each with a subject key when
the sentence says which (so a later "my email is ..." supersedes the older one), and lessons
from tool calls that failed and then worked.

Also the one shape every extractor hands on (``Candidate``), the LLM's included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from proxy.context.importance import PRIORITY, tag_message
from proxy.memory.model import PROCEDURAL, SEMANTIC, message_text
from proxy.records import Message

KINDS = ("fact", "preference", "decision", "commitment", "lesson")
MAX_TEXT = 1000  # characters of one extracted memory
_MIN_SENTENCE, _MAX_SENTENCE = 12, 400
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
# "my <what> is ...": the subject is what the sentence is about, a newer one about it replaces it.
_MY_THING = re.compile(
    r"\bmy (name|e-?mail(?: address)?|phone(?: number)?|address|birthday|age|wife|husband|partner|boyfriend|girlfriend|"
    r"job|job title|title|role|employer|company|team|boss|manager|dog|cat|city|hometown|timezone|time zone|"
    r"fav(?:ou)?rite \w+)(?:'s name)? (?:is|are|has become)\b"  # not "was": "my job was hard" states no new value
)
_SAME_THING = {"email address": "email", "phone number": "phone", "time zone": "timezone", "job title": "title",
               "hometown": "city", "company": "employer"}
_SUBJECTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bi (?:now )?(?:live|am living|'m living|reside) in\b|\bi(?:'ve| have)? (?:just )?moved to\b|"
                r"\bi(?:'m| am) (?:now )?based in\b"), "user.home"),
    (re.compile(r"\bi (?:now )?work (?:at|for)\b|\bi(?:'m| am) (?:now )?employed (?:at|by)\b|\bi(?:'ve| have)? joined\b"), "user.employer"),
    (re.compile(r"\bi (?:now )?work as\b"), "user.occupation"),
    (re.compile(r"\bcall me\b"), "user.name"),
    (re.compile(r"\bi(?:'m| am) \d+ years old\b"), "user.age"),
)
_EMPTY_REMEMBER = re.compile(r"^[\w\s,']*\bremember (?:that|this)\W*$")  # "Yeah, I remember that!": nothing to keep
_FAILURE = re.compile(
    r"\b(?:error|errors|exception|traceback|failed|failure|fails|not found|denied|invalid|no such|cannot|can't|unable|"
    r"refused|timed out|timeout|forbidden|unauthorized)\b|\b[45]\d\d\b"
)
_FAILURE_HEAD = 400  # characters of a tool result read for a failure


@dataclass
class Candidate:
    """One memory an extractor proposes: the store decides whether it is new, a duplicate or
    replaces an older one (proxy/memory/supersede.py)."""

    text: str
    type: str  # semantic | procedural
    kind: str  # one of KINDS
    seqs: list[int] = field(default_factory=list)  # the messages it comes from
    subject: str | None = None  # what it is about: a newer memory on it supersedes the older
    replaces: str | None = None  # the extractor's word: a memory id or a subject key
    stated: float | None = None  # when its newest message was recorded (None: now)


def normal_subject(value: Any) -> str | None:
    """A subject key as stored: lowercase words joined by dots and underscores, at most 80 characters."""
    if not isinstance(value, str):
        return None
    words = re.sub(r"[^a-z0-9._]+", "_", value.strip().lower()).strip("._")
    return words[:80] or None


def subject_of(sentence: str) -> str | None:
    """The slot a sentence fills ("user.home" for "I moved to Lisbon"), or None."""
    lower = sentence.lower()
    found = _MY_THING.search(lower)
    if found:
        thing = found.group(1).replace("favourite", "favorite").replace("e-mail", "email")
        return "user." + normal_subject(_SAME_THING.get(thing, thing))  # type: ignore[operator]
    for pattern, subject in _SUBJECTS:
        if pattern.search(lower):
            return subject
    return None


def from_rules(messages: Sequence[Message], context: Sequence[Message] = ()) -> list[Candidate]:
    """Candidates from the user's sentences the importance tagger marks in ``messages``, and
    tool lessons from ``context`` (earlier messages) and ``messages`` together."""
    found: list[Candidate] = []
    for message in messages:
        if message.role != "user" or message.reverted:
            continue
        for sentence in _SENTENCES.split(message_text(message.body)):
            sentence = sentence.strip()
            if not _MIN_SENTENCE <= len(sentence) <= _MAX_SENTENCE or sentence.endswith("?"):
                continue
            tags = tag_message({"role": "user", "content": sentence})
            if not tags or (tags == ["fact"] and _EMPTY_REMEMBER.match(sentence.lower())):
                continue
            kind = max(tags, key=lambda t: PRIORITY.get(t, 0))
            found.append(Candidate(sentence, SEMANTIC, kind, [message.seq], subject_of(sentence)))
    return found + tool_lessons([*context, *messages])


def tool_lessons(messages: Sequence[Message]) -> list[Candidate]:
    """"When tool(a) failed (error), tool(b) worked": a tool whose call failed and, later in the
    same window, succeeded with other arguments."""
    calls: dict[str, tuple[int, str, str]] = {}  # tool_call_id -> (seq, name, arguments)
    failed: dict[str, tuple[list[int], str, str]] = {}  # tool name -> (seqs, arguments, error)
    lessons: list[Candidate] = []
    for message in messages:
        if message.reverted:
            continue
        body = message.body
        if message.role == "assistant":
            for call in body.get("tool_calls") or []:
                function = (call or {}).get("function") or {}
                if isinstance(call, dict) and isinstance(call.get("id"), str) and isinstance(function.get("name"), str):
                    calls[call["id"]] = (message.seq, function["name"], str(function.get("arguments") or "")[:300])
        elif message.role == "tool" and body.get("tool_call_id") in calls:
            seq, name, arguments = calls[body["tool_call_id"]]
            result = message_text(body)[:_FAILURE_HEAD]
            if _FAILURE.search(result.lower()):
                failed[name] = ([seq, message.seq], arguments, " ".join(result.split())[:160])
            elif name in failed and failed[name][1] != arguments:
                seqs, bad, error = failed.pop(name)
                text = f"When {name}({bad}) failed ({error}), {name}({arguments}) worked."
                lessons.append(Candidate(text[:MAX_TEXT], PROCEDURAL, "lesson", seqs + [seq, message.seq]))
    return lessons
