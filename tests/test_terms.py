"""Term hashing for lexical retrieval: the numpy pass finds exactly the words ``terms`` defines."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from proxy.context.terms import hash_terms, query_hashes, term_hash, terms

# Word bytes, the characters around them, and text that lowercases into ASCII (the Kelvin sign).
_ALPHABET = st.sampled_from(list("abcxyzABC019'_- .,\n\t!?") + ["é", "ü", "ß", "\u212a", "日本", "İ", "\ud800"])


def _per_text(flat: np.ndarray, sizes: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(sizes)
    return [flat[end - size:end].tolist() for end, size in zip(ends, sizes)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_ALPHABET, max_size=60).map("".join), max_size=12))
def test_hash_terms_finds_the_terms_of_every_text(texts: list[str]) -> None:
    flat, sizes = hash_terms(texts)
    assert len(sizes) == len(texts)
    for text, hashes in zip(texts, _per_text(flat, sizes)):
        assert hashes == sorted(term_hash(t) for t in terms(text))  # distinct, ascending


@settings(max_examples=200, deadline=None)
@given(st.lists(_ALPHABET, max_size=80).map("".join))
def test_a_query_hashes_as_its_text_would(text: str) -> None:
    assert query_hashes(text).tolist() == hash_terms([text])[0].tolist()
    assert query_hashes(text).tolist() == hash_terms([text])[0].tolist()  # from remembered terms


def test_stop_words_short_words_and_leading_punctuation() -> None:
    flat, sizes = hash_terms(["The deploy is on Friday, it's -final- and __x9 ok", "", "and the"])
    # "it's" is a stop word, "ok" too short, "__x9" starts at "x9": too short as well.
    assert sizes.tolist() == [3, 0, 0]
    assert flat.tolist() == sorted(term_hash(t) for t in ("deploy", "friday", "final-"))


def test_distinct_words_get_distinct_hashes_and_long_words_work() -> None:
    # Words of every length up to past the hashed prefix, and two that differ only in length.
    words = [f"w{i:04d}" * (1 + i % 70) for i in range(5000)] + ["a" * 5000, "a" * 5001]
    flat, sizes = hash_terms([" ".join(words)])
    assert int(sizes[0]) == len(set(words)) == flat.size
