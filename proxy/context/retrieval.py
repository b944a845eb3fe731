"""Bringing older turns back by relevance to the current request.

``Retriever`` is the seam: anything with an async ``rank`` method can be passed to the
ContextManager (the long-term memory service can plug in its embedding search here). The
default ``LexicalRetriever`` scores the session's own older messages with BM25 over words.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class Candidate:
    """An older unit of the conversation that could be sent again verbatim."""

    unit: int  # unit index in the request's view
    seq: int | None  # stored seq of its first message
    text: str


class Retriever(Protocol):
    async def rank(self, tenant: str, session_id: str, query: str, candidates: Sequence[Candidate], limit: int) -> list[int]:
        """Positions in ``candidates`` of the most relevant ones, best first, at most ``limit``."""
        ...


_WORD = re.compile(r"[a-z0-9][a-z0-9'_-]{2,}")
_STOP = frozenset(
    "the and for are but not you your yours with this that have has had was were will would can could "
    "should what when where which who whom why how all any both each few more most other some such than "
    "too very just don't i'm it's its our ours they them their there here been being into from about "
    "also then once only own same out off over under again further yes okay well really like get got "
    "let's she her him his hers said say says".split()
)


@functools.lru_cache(maxsize=65536)
def terms(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


class LexicalRetriever:
    """BM25 over the candidates' words (no index to keep: candidates are the session's own turns)."""

    k1 = 1.2

    async def rank(self, tenant: str, session_id: str, query: str, candidates: Sequence[Candidate], limit: int) -> list[int]:
        return rank_lexical(query, candidates, limit, self.k1)


def rank_lexical(query: str, candidates: Sequence[Candidate], limit: int, k1: float = 1.2) -> list[int]:
    wanted = terms(query)
    if not wanted or not candidates or limit <= 0:
        return []
    matches: list[tuple[int, frozenset[str], int]] = []  # (position, query terms it holds, its size)
    df: dict[str, int] = {}
    for position, candidate in enumerate(candidates):
        doc = terms(candidate.text)
        common = doc & wanted
        if common:
            matches.append((position, common, len(doc)))
            for term in common:
                df[term] = df.get(term, 0) + 1
    total = len(candidates)
    idf = {t: math.log(1 + (total - n + 0.5) / (n + 0.5)) for t, n in df.items()}
    scored = []
    for position, common, size in matches:
        # Binary term frequency with length normalisation: short, on-topic turns win.
        norm = 1 + 0.5 * size / 40
        scored.append((sum(idf[t] for t in common) * (k1 + 1) / (1 + k1 * norm), position))
    scored.sort(key=lambda s: (-s[0], -s[1]))
    return [position for _, position in scored[:limit]]
