"""Bringing older turns back by relevance to the current request.

``Retriever`` is the seam: anything with an async ``rank`` method can be passed to the
ContextManager (the long-term memory service can plug in its embedding search here). The
default ``LexicalRetriever`` scores the session's own older messages with BM25 over words.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from proxy import lexical
from proxy.context.units import text_of


class Candidate:
    """An older unit of the conversation that could be sent again verbatim.

    Given ``bodies`` instead of ``text``, its text is made from them whenever it is read and
    never kept: a long session's cached view holds ~500 candidates, and their texts were ~1 KB
    each. ``key`` names the text for a retriever's own caches (it must change when the text
    does). ``terms`` are its term ids (``lexical.term_ids``), set by the lexical retriever the
    first time it ranks the candidate: the session's cached view lends its candidates to the
    next request, so a stored exchange is tokenized once while its session stays in use.
    """

    __slots__ = ("unit", "seq", "key", "terms", "_text", "_bodies")

    def __init__(self, unit: int, seq: int | None, text: str | None = None, *,
                 bodies: tuple[dict[str, Any], ...] = (), key: Hashable | None = None) -> None:
        self.unit = unit  # unit index in the request's view
        self.seq = seq  # stored seq of its first message
        self.key = key
        self.terms: np.ndarray | None = None
        self._text = text
        self._bodies = bodies

    @property
    def text(self) -> str:
        if self._text is not None:
            return self._text
        return " ".join(text_of(body) for body in self._bodies)

    def __repr__(self) -> str:
        return f"Candidate(unit={self.unit}, seq={self.seq}, key={self.key!r})"


def rank_lexical(query: str, candidates: Sequence[Candidate], limit: int, k1: float = 1.2, b: float = 0.75) -> list[int]:
    """Positions of the best ``limit`` candidates for ``query``, best first (ties: the later
    one): BM25 (``proxy.lexical``, the weighting long-term memory uses) with binary term
    frequency, a candidate's length being its number of distinct terms."""
    query = lexical.query_ids(query)
    if not query.size or not candidates or limit <= 0:
        return []
    docs = _terms(candidates)
    sizes = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate(docs)
    term = np.minimum(np.searchsorted(query, flat), len(query) - 1)  # the query term it could be
    hit = query[term] == flat
    if not hit.any():
        return []
    owner, term = np.repeat(np.arange(len(docs)), sizes)[hit], term[hit]
    total = len(candidates)
    weight = np.array(lexical.term_weights(np.bincount(term, minlength=len(query)).tolist(), total, k1), dtype=np.float32)
    lengths = sizes.astype(np.float32)
    norm = lexical.length_norm(lengths[owner], max(float(lengths.mean()), 1e-6), k1, b)
    norm += 1.0  # tf
    part = weight[term]
    part /= norm
    score = np.bincount(owner, weights=part, minlength=total)  # each candidate's terms in id order
    matched = np.flatnonzero(np.bincount(owner, minlength=total))  # np.unique(owner), without its sort
    order = np.lexsort((-matched, -score[matched]))  # score, then the later position, descending
    return matched[order[:limit]].tolist()


def _terms(candidates: Sequence[Candidate]) -> list[np.ndarray]:
    """Each candidate's term ids, made for those without them."""
    missing = [c for c in candidates if c.terms is None]
    if missing:
        flat, sizes = lexical.term_ids([c.text for c in missing])
        ends = np.cumsum(sizes).tolist()
        for candidate, start, end in zip(missing, [0, *ends], ends):  # views of one array (np.split was slower)
            candidate.terms = flat[start:end]
    return [c.terms for c in candidates]  # type: ignore[misc]
