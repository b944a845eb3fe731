"""Token counting: exact cl100k counts from the bundled tables, without their Python copy."""

from __future__ import annotations

from proxy import tokens


def test_counts_are_exact_and_the_python_rank_table_is_let_go() -> None:
    tokens.warm(tokens.DEFAULT_ENCODING)
    encoding = tokens._encodings[tokens.DEFAULT_ENCODING]
    assert encoding is not None, "the encodings litellm bundles load without network"
    # The 14 MB Python dict of BPE ranks serves only pickling; the Rust core keeps its own.
    assert not encoding._mergeable_ranks
    # Known cl100k_base counts (OpenAI's tokenizer), so the Rust core still encodes correctly.
    assert tokens.count_text("hello world") == 2
    assert tokens.count_text("antidisestablishmentarianism") == 6
    assert tokens.count_text("Le café coûte 3,50 € 🙂") == len(encoding.encode("Le café coûte 3,50 € 🙂"))
    assert encoding.decode(encoding.encode("round trip ✓")) == "round trip ✓"
