"""A long memory cut to a token allowance: the sentences that share the most words with the query,
in their original order, with "…" where text was left out (what a search engine's result snippet
does). Lets a block of ten memories hold all ten when one of them is a pasted page."""

from __future__ import annotations

import re

from proxy import lexical, tokens

ELLIPSIS = " … "
# After . ! ? and a space, after the CJK full stops (which take no space), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\s*\n+\s*")


def cut(text: str, query: str, max_tokens: int) -> str:
    """``text`` itself if it fits ``max_tokens``, else its best sentences for ``query`` that fit."""
    if max_tokens <= 0:
        return ""
    if tokens.count_text(text) <= max_tokens:
        return text
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    wanted = set(lexical.tokenize(query))
    # Most query words first; among equals, the earlier sentence (a message opens with its point).
    order = sorted(range(len(sentences)), key=lambda i: (-len(wanted.intersection(lexical.tokenize(sentences[i]))), i))
    joiner = tokens.count_text(ELLIPSIS)
    room = max_tokens - joiner  # a leading or trailing "…" when the first or last sentence is left out
    chosen: set[int] = set()
    for i in order:
        cost = tokens.count_text(sentences[i]) + joiner
        if cost <= room:
            chosen.add(i)
            room -= cost
    if not chosen:  # even the best sentence is too long: its opening words
        return _opening(sentences[order[0]], max_tokens)
    parts: list[str] = []
    for i in range(len(sentences)):
        if i in chosen:
            parts.append(sentences[i])
        elif not parts or parts[-1] != "…":
            parts.append("…")
    return " ".join(parts)


def _opening(text: str, max_tokens: int) -> str:
    """The opening words of ``text`` that fit, with " …"; by characters when not even one word
    does (a script written without spaces)."""
    cut = tokens.prefix_within(text, max_tokens, after=ELLIPSIS.rstrip())
    if len(cut) < len(text) and not text[len(cut)].isspace() and " " in cut.strip():
        cut = cut.rstrip().rsplit(" ", 1)[0]  # not in the middle of a word
    return cut.rstrip() + ELLIPSIS.rstrip()
