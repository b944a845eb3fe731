"""proxy/lexical.py: the one tokenizer, term ids and BM25 weighting that long-term memory and
the context stage share."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from proxy import lexical
from proxy.context.retrieval import Candidate, rank_lexical

_ALPHABET = st.sampled_from(list("abcxyzABC019'’_- .,\n\t!?") + ["é", "ü", "ß", "\u212a", "日本", "İ", "\ud800", "ing", "ed", "the "])


def _per_text(flat: np.ndarray, sizes: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(sizes)
    return [flat[end - size:end].tolist() for end, size in zip(ends, sizes)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_ALPHABET, max_size=60).map("".join), max_size=12))
def test_term_ids_are_each_texts_distinct_tokens_ascending(texts: list[str]) -> None:
    flat, sizes = lexical.term_ids(texts)
    assert len(sizes) == len(texts) and flat.dtype == np.int64
    for text, ids in zip(texts, _per_text(flat, sizes)):
        assert ids == sorted({hash(t) for t in lexical.tokenize(text)})
        assert ids == lexical.query_ids(text).tolist()


def test_stop_words_stems_and_possessives() -> None:
    assert lexical.tokenize("Caroline's paintings were painted in the mornings") == ["caroline", "paint", "paint", "morn"]
    assert lexical.tokenize("the and it's") == [] and lexical.term_ids(["", "the and"])[1].tolist() == [0, 0]
    assert lexical.term_ids([])[0].size == 0


def test_context_retrieval_matches_inflected_words_as_memory_does() -> None:
    """One tokenizer: the context stage finds 'painted' for 'paintings', as memory recall does."""
    candidates = [Candidate(1, 1, "We talked about the weather in Oslo."), Candidate(2, 2, "Caroline painted a lake at sunrise."),
                  Candidate(3, 3, "Lunch was pasta.")]
    assert rank_lexical("Which paintings did Caroline make?", candidates, 3) == [1]


def test_the_weighting_is_bm25s() -> None:
    # A term in every document weighs least; a term in none weighs nothing.
    rare, common, absent = lexical.term_weights([1, 10, 0], 10, 1.2)
    assert rare > common > 0 and absent == 0.0
    norm = lexical.length_norm(np.array([5.0, 10.0, 20.0], dtype=np.float32), 10.0, 1.2, 0.75)
    assert np.allclose(norm, [1.2 * (0.25 + 0.75 * 0.5), 1.2, 1.2 * (0.25 + 0.75 * 2)])  # longer documents score less
