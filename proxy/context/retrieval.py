"""Bringing older turns back by relevance to the current request.

``Retriever`` is the seam: anything with an async ``rank`` method can be passed to the
ContextManager (the long-term memory service can plug in its embedding search here). The
default ``LexicalRetriever`` scores the session's own older messages with BM25 over words.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


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


def terms(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


@functools.lru_cache(maxsize=16384)
def term_hashes(text: str) -> np.ndarray:
    """The text's terms as sorted 64-bit hashes (cached per exchange text): 8 bytes a term
    instead of a str in a frozenset (~100), and a whole session's candidates compare against
    the query in a few numpy calls. Sorted, so equal term sets sum their weights in one order
    and tie exactly."""
    return np.sort(np.fromiter(map(hash, terms(text)), dtype=np.int64))


class LexicalRetriever:
    """BM25 over the candidates' words (no index to keep: candidates are the session's own turns)."""

    k1 = 1.2

    async def rank(self, tenant: str, session_id: str, query: str, candidates: Sequence[Candidate], limit: int) -> list[int]:
        return rank_lexical(query, candidates, limit, self.k1)


def rank_lexical(query: str, candidates: Sequence[Candidate], limit: int, k1: float = 1.2) -> list[int]:
    """Positions of the best ``limit`` candidates for ``query``, best first (ties: the later
    one). Binary term frequency with length normalisation: short, on-topic turns win."""
    wanted = terms(query)
    if not wanted or not candidates or limit <= 0:
        return []
    docs = [term_hashes(candidate.text) for candidate in candidates]
    sizes = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate(docs)
    query = np.sort(np.fromiter(map(hash, wanted), dtype=np.int64, count=len(wanted)))
    term = np.minimum(np.searchsorted(query, flat), len(query) - 1)  # the query term it could be
    hit = query[term] == flat
    if not hit.any():
        return []
    owner, term = np.repeat(np.arange(len(docs)), sizes)[hit], term[hit]
    total = len(candidates)
    df = np.bincount(term, minlength=len(query))
    idf = np.log1p((total - df + 0.5) / (df + 0.5))
    score = np.bincount(owner, weights=idf[term], minlength=total)
    score *= (k1 + 1) / (1 + k1 * (1 + 0.5 * sizes / 40))
    matched = np.unique(owner)
    order = np.lexsort((-matched, -score[matched]))  # score, then the later position, descending
    return matched[order[:limit]].tolist()
