"""Bringing older turns back by relevance to the current request.

``Retriever`` is the seam: anything with an async ``rank`` method can be passed to the
ContextManager (the long-term memory service can plug in its embedding search here). The
default ``LexicalRetriever`` scores the session's own older messages with BM25 over words.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Protocol, Sequence

import numpy as np

from proxy.context.terms import hash_terms, query_hashes
from proxy.context.units import text_of


class Candidate:
    """An older unit of the conversation that could be sent again verbatim.

    Given ``bodies`` instead of ``text``, its text is made from them whenever it is read and
    never kept: a long session's cached view holds ~500 candidates, and their texts were ~1 KB
    each. ``key`` names the text for the retrieval caches (it must change when the text does);
    without one the text itself is the key.
    """

    __slots__ = ("unit", "seq", "key", "_text", "_bodies")

    def __init__(self, unit: int, seq: int | None, text: str | None = None, *,
                 bodies: tuple[dict[str, Any], ...] = (), key: Hashable | None = None) -> None:
        self.unit = unit  # unit index in the request's view
        self.seq = seq  # stored seq of its first message
        self.key = key
        self._text = text
        self._bodies = bodies

    @property
    def text(self) -> str:
        if self._text is not None:
            return self._text
        return " ".join(text_of(body) for body in self._bodies)

    def __repr__(self) -> str:
        return f"Candidate(unit={self.unit}, seq={self.seq}, key={self.key!r})"


class Retriever(Protocol):
    async def rank(self, tenant: str, session_id: str, query: str, candidates: Sequence[Candidate], limit: int) -> list[int]:
        """Positions in ``candidates`` of the most relevant ones, best first, at most ``limit``."""
        ...


class _TermCache:
    """Each candidate's term hashes (see ``terms.hash_terms``) by its key, least recently used out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._arrays: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def arrays(self, candidates: Sequence[Candidate]) -> list[np.ndarray]:
        keys = [c.text if c.key is None else c.key for c in candidates]
        found: list[np.ndarray | None] = [self._arrays.get(key) for key in keys]
        missing = [i for i, array in enumerate(found) if array is None]
        if missing:  # hashed together: one numpy pass, ~2× faster than one text at a time
            # A keyless candidate's key is its text, made once already.
            flat, sizes = hash_terms([keys[i] if candidates[i].key is None else candidates[i].text for i in missing])
            ends = np.cumsum(sizes).tolist()
            for i, start, end in zip(missing, [0, *ends], ends):  # views of one array (np.split is ~10× slower)
                found[i] = self._arrays[keys[i]] = flat[start:end]
        for key in keys:
            self._arrays.move_to_end(key)
        while len(self._arrays) > self.size:
            self._arrays.popitem(last=False)
        return found  # type: ignore[return-value]


# Exchanges' terms: 8 bytes a term instead of a str in a set (~100), and a whole
# session's candidates compare against the query in a few numpy calls.
_term_cache = _TermCache(16_384)


class LexicalRetriever:
    """BM25 over the candidates' words (no index to keep: candidates are the session's own turns)."""

    k1 = 1.2

    async def rank(self, tenant: str, session_id: str, query: str, candidates: Sequence[Candidate], limit: int) -> list[int]:
        return rank_lexical(query, candidates, limit, self.k1)


def rank_lexical(query: str, candidates: Sequence[Candidate], limit: int, k1: float = 1.2) -> list[int]:
    """Positions of the best ``limit`` candidates for ``query``, best first (ties: the later
    one). Binary term frequency with length normalisation: short, on-topic turns win."""
    query = query_hashes(query)
    if not query.size or not candidates or limit <= 0:
        return []
    docs = _term_cache.arrays(candidates)
    sizes = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate(docs)
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
    matched = np.flatnonzero(np.bincount(owner, minlength=total))  # np.unique(owner), without its sort
    order = np.lexsort((-matched, -score[matched]))  # score, then the later position, descending
    return matched[order[:limit]].tolist()
