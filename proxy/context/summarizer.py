"""Summaries of conversation spans: an LLM summarizer prompt, and an extractive fallback.

``segment_request``/``fold_request`` build the chat request for the tenant's summarizer
model; ``extractive`` needs no model at all (it keeps the sentences that carry names,
numbers, dates, decisions and questions), so compression never waits on a failing provider.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from proxy import tokens
from proxy.context import importance
from proxy.context.units import text_of

# The first words of every summarizer prompt; tests and logs recognise summarizer calls by it.
PROMPT_MARKER = "You are agent-state-proxy's conversation summarizer."

SEGMENT_PROMPT = (
    PROMPT_MARKER + " Summarize the conversation excerpt below so the assistant can continue the "
    "conversation without it. Keep every name, number, date, amount, identifier and file or tool name "
    "exactly as written; keep decisions made, commitments and preferences stated, facts learned, tool "
    "results that matter, and questions still open. Drop greetings and filler. Write terse bullet points "
    "in the conversation's language, past tense, at most {words} words. Output only the summary."
)
FOLD_PROMPT = (
    PROMPT_MARKER + " Merge the summaries below (oldest first) into one summary of the whole "
    "conversation so far. Keep every name, number, date, amount and identifier exactly as written; keep "
    "decisions, commitments, preferences, facts and questions still open; when a later summary "
    "contradicts an earlier one, keep the later. Terse bullet points, at most {words} words. Output only "
    "the summary."
)

_MIN_SCORE = 1.0  # below: filler with no number, name, signal word or question
_MESSAGE_CHARS = 3000  # per message in a summarizer prompt: head and tail of longer ones
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_NUMBER = re.compile(r"\d")
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+")
_SIGNAL = re.compile(
    r"\b(decid|agree|plan|will|promise|deadline|prefer|like|love|hate|remember|important|must|need|name|"
    r"because|result|error|fail|fixed|chose|choose|bought|moved|started|finished|birthday|meet)",
    re.I,
)


def render(messages: Sequence[tuple[int | None, dict[str, Any]]]) -> str:
    """A transcript for the summarizer: one ``[seq] role: text`` line per message."""
    lines = []
    for seq, body in messages:
        text = text_of(body).strip()
        if len(text) > _MESSAGE_CHARS:
            half = _MESSAGE_CHARS // 2
            text = text[:half] + " […] " + text[-half:]
        role = body.get("role")
        if role == "tool":
            role = "tool result"
        lines.append(f"[{seq if seq is not None else '-'}] {role}: {text}")
    return "\n".join(lines)


def segment_request(model: str, transcript: str, summary_tokens: int) -> dict[str, Any]:
    return _request(model, SEGMENT_PROMPT.format(words=_words(summary_tokens)), transcript, summary_tokens)


def fold_request(model: str, parts: Sequence[str], summary_tokens: int) -> dict[str, Any]:
    text = "\n\n".join(f"Summary {i + 1}:\n{p}" for i, p in enumerate(parts))
    return _request(model, FOLD_PROMPT.format(words=_words(summary_tokens)), text, summary_tokens)


def _request(model: str, system: str, user: str, summary_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": summary_tokens + summary_tokens // 2,
    }


def _words(summary_tokens: int) -> int:
    return max(20, int(summary_tokens * 0.7))


def reply_text(response: dict[str, Any]) -> str | None:
    """The summary text of a summarizer response, or None when it has none."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content.strip() if isinstance(content, str) and content.strip() else None


def fit(text: str, max_tokens: int, encoding: str) -> str:
    """``text`` cut at a line or sentence boundary to at most ``max_tokens`` tokens."""
    if tokens.count_text(text, encoding) <= max_tokens:
        return text
    lines = text.splitlines()
    kept: list[str] = []
    used = 0
    for line in lines:
        cost = tokens.count_text(line, encoding) + 1
        if used + cost > max_tokens:
            break
        kept.append(line)
        used += cost
    if kept:
        return "\n".join(kept)
    cut = tokens.prefix_within(text, max_tokens, encoding, after="…")
    return cut + "…" if cut else ""


def extractive(lines: Sequence[tuple[str, str]], max_tokens: int, encoding: str) -> str:
    """Keep the most informative sentences of ``(speaker, text)`` lines within ``max_tokens``.

    Sentences score by importance (the tagging rules), numbers, capitalised names, signal
    words and questions; the best are kept in their original order, one bullet per sentence.
    """
    candidates: list[tuple[float, int, str]] = []
    order = 0
    for speaker, text in lines:
        for match in _SENTENCE.finditer(text):
            sentence = " ".join(match.group().split())
            if len(sentence) < 12:
                continue
            if len(sentence) > 300:
                sentence = sentence[:297] + "…"
            score = (
                3.0 * bool(importance.tag_message({"role": "user", "content": sentence}))
                + 2.0 * bool(_NUMBER.search(sentence))
                + 1.0 * min(3, len(_NAME.findall(sentence)))
                + 1.5 * len(_SIGNAL.findall(sentence))
                + 1.0 * sentence.endswith("?")
                + min(1.0, len(sentence) / 200)
            )
            if score >= _MIN_SCORE:
                candidates.append((score, order, f"- {speaker}: {sentence}" if speaker else f"- {sentence}"))
            order += 1
    if not candidates:
        return ""
    chosen: list[tuple[int, str]] = []
    used = 0
    for score, position, line in sorted(candidates, key=lambda c: (-c[0], c[1])):
        cost = tokens.count_text(line, encoding) + 1
        if used + cost > max_tokens:
            continue
        chosen.append((position, line))
        used += cost
    return "\n".join(line for _, line in sorted(chosen))


def extractive_segment(messages: Sequence[tuple[int | None, dict[str, Any]]], max_tokens: int, encoding: str) -> str:
    lines = []
    for _, body in messages:
        role = str(body.get("role"))
        lines.append(("tool result" if role == "tool" else role, text_of(body)))
    return extractive(lines, max_tokens, encoding)


def extractive_fold(parts: Sequence[str], max_tokens: int, encoding: str) -> str:
    lines = []
    for part in parts:
        for line in part.splitlines():
            line = line.strip().lstrip("-•* ").strip()
            if line:
                lines.append(("", line))
    return extractive(lines, max_tokens, encoding)
