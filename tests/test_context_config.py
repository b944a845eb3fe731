"""The ``context`` tenant key, budgets from litellm's model table, token accounting, tagging, summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens
from proxy.config import ConfigError, load_config
from proxy.context import summarizer
from proxy.context.budget import budget_for, context_window
from proxy.context.importance import tag_message
from proxy.context.retrieval import Candidate, rank_lexical
from proxy.context.settings import OFF, ContextSettings, parse
from proxy.context.units import text_of
from proxy.errors import BadRequest
from tests.harness import REPO, open_tenant, write_config


def load_context(tmp_path: Path, context: Any, **defaults: Any) -> ContextSettings:
    tenant = open_tenant("http://127.0.0.1:9/v1")
    tenant["models"]["cheap"] = {"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1"}
    if context is not None:
        tenant["context"] = context
    sections = {"tenant_defaults": {"context": defaults}} if defaults else {}
    return load_config(write_config(tmp_path, {"t": tenant}, **sections)).tenants["t"].context


def test_defaults_turn_every_strategy_on(tmp_path: Path) -> None:
    settings = load_context(tmp_path, None)
    assert settings == ContextSettings() and settings.enabled
    assert settings.strategy == ("window", "summaries", "importance", "retrieval")
    assert load_config(None).tenants["default"].context == ContextSettings()


def test_repository_proxy_yaml_documents_the_defaults() -> None:
    assert load_config(REPO / "config" / "proxy.yaml").tenants["default"].context == ContextSettings()


def test_context_can_be_turned_off(tmp_path: Path) -> None:
    assert load_context(tmp_path, "off") == OFF and not OFF.enabled
    assert load_context(tmp_path, {"strategy": []}).strategy == ()
    assert parse(False) == OFF


def test_tenant_context_merges_over_tenant_defaults(tmp_path: Path) -> None:
    settings = load_context(tmp_path, {"window_turns": 3}, summarizer_model="cheap", strategy=["window", "summaries"])
    assert settings.window_turns == 3 and settings.summarizer_model == "cheap" and settings.strategy == ("window", "summaries")


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"stratgy": ["window"]}, "context.stratgy: unknown key"),
        ({"strategy": ["window", "magic"]}, "context.strategy: unknown strategy 'magic'"),
        ({"context_window_fraction": 1.5}, "context.context_window_fraction: must be a number greater than 0 and at most 1"),
        ({"max_context_tokens": 500, "reserve_completion_tokens": 600}, "context.max_context_tokens: must be larger than reserve_completion_tokens"),
        ({"max_context_tokens": {"cheap": "lots"}}, "context.max_context_tokens.cheap: must be an integer"),
        ({"window_turns": 0}, "context.window_turns: must be an integer between 1 and 100000"),
        ({"summarizer_model": "nope"}, "context.summarizer_model: 'nope' is not a model alias of this tenant"),
        ("sometimes", "context: must be a mapping, or off"),
        ({"low_water": 0.9, "high_water": 0.8}, "context.low_water: must be at most high_water (0.9 > 0.8)"),
        ({"high_water": 0}, "context.high_water: must be a number greater than 0 and at most 1"),
        ({"tail_share_of_saved": 2}, "context.tail_share_of_saved: must be a number between 0 and 1"),
        ({"cache_breakpoints": "yes"}, "context.cache_breakpoints: must be true or false"),
        ({"prompt_cache_key": 1}, "context.prompt_cache_key: must be true or false"),
    ],
)
def test_bad_context_options_name_file_key_and_rule(tmp_path: Path, context: Any, message: str) -> None:
    tenant = open_tenant("http://127.0.0.1:9/v1")
    tenant["models"] = {"m": {"model": "openai/m", "api_base": "http://127.0.0.1:9/v1"}}  # no "*": aliases are checked
    tenant["context"] = context
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, {"t": tenant}))
    assert str(tmp_path / "tenants" / "t.yaml") in str(error.value) and message in str(error.value)


def test_windows_come_from_litellms_table_and_unknown_models_use_the_fallback() -> None:
    assert context_window("openai/gpt-4o-mini") == 128000
    assert context_window("gpt-4o-mini") == 128000
    assert context_window("anthropic/claude-sonnet-4-5") == 200000
    assert context_window("openai/fake-model") is None
    settings = ContextSettings()
    known = budget_for(settings, "gpt-4o-mini", "openai/gpt-4o-mini", {})
    assert (known.window, known.window_known, known.total, known.prompt) == (128000, True, 96000, 96000 - 1024)
    assert known.encoding == "o200k_base"
    unknown = budget_for(settings, "fake-model", "openai/fake-model", {})
    assert (unknown.window, unknown.window_known, unknown.total) == (8192, False, 6144)
    assert unknown.encoding == tokens.DEFAULT_ENCODING


def test_budget_per_model_and_the_requests_own_max_tokens() -> None:
    settings = parse({"max_context_tokens": {"small": 2000, "*": None}, "context_window": {"local": 4096}})
    assert budget_for(settings, "small", "openai/gpt-4o", {}).prompt == 2000 - 1024
    assert budget_for(settings, "big", "openai/gpt-4o", {}).total == 96000
    assert budget_for(settings, "local", "ollama/whatever", {}).window == 4096
    assert budget_for(settings, "big", "openai/gpt-4o", {"max_tokens": 100_000}).prompt == 128000 - 100_000
    with pytest.raises(BadRequest) as error:
        budget_for(settings, "local", "ollama/whatever", {"max_tokens": 5000})
    assert error.value.code == "context_length_exceeded"


def test_rule_tags() -> None:
    def tags(text: str, role: str = "user") -> list[str] | None:
        return tag_message({"role": role, "content": text})

    assert tags("We decided to use Postgres for the ledger.") == ["decision"]
    assert tags("I will send the report by Friday.") == ["commitment"]
    assert tags("I prefer short answers, please.") == ["preference"]
    assert tags("My name is Ada and my email is ada@example.com") == ["fact"]
    assert tags("hello, how are you?") is None and tags("I'll check") is None
    assert tags("we decided on X", role="tool") is None


def test_extractive_summary_keeps_names_numbers_and_fits() -> None:
    messages = [
        (1, {"role": "user", "content": "Hi there. My flight to Lisbon leaves on 2024-05-03 at 7:40, booking ABC123."}),
        (2, {"role": "assistant", "content": "Noted. Anything else? It was nice to chat."}),
        (3, {"role": "user", "content": "We decided to meet Maria at the Alfama café. Okay."}),
    ]
    text = summarizer.extractive_segment(messages, 60, tokens.DEFAULT_ENCODING)
    assert "2024-05-03" in text and "Maria" in text and "Hi there" not in text and "nice to chat" not in text
    assert tokens.count_text(text) <= 60
    assert summarizer.fit("word " * 500, 20, tokens.DEFAULT_ENCODING).count("word") <= 20


def test_lexical_retrieval_ranks_the_relevant_turn_first() -> None:
    candidates = [
        Candidate(1, 1, "We talked about the weather in Oslo."),
        Candidate(2, 2, "The database password rotation happens every 90 days."),
        Candidate(3, 3, "Lunch was pasta."),
    ]
    assert rank_lexical("when does the password rotation happen?", candidates, 2) == [1]


def test_a_candidate_made_from_message_bodies_reads_and_ranks_as_its_text() -> None:
    """A long session's cached view keeps ~500 candidates: they hold the bodies they were made
    from, not their text, and their term hashes once ranked (the next request reuses both)."""
    bodies = (
        {"role": "user", "content": "When does the password rotation happen?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "rotation"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Every 90 days, on the first Monday."},
    )
    lazy = Candidate(2, 7, bodies=bodies, key=("tenant", "session", 1.0, 7, 9))
    assert lazy.text == " ".join(text_of(b) for b in bodies) and "lookup(" in lazy.text
    assert lazy._text is None  # made when read, never kept
    others = [Candidate(1, 1, "We talked about the weather in Oslo."), Candidate(3, 10, "Lunch was pasta.")]
    eager = Candidate(2, 7, lazy.text)
    query = "how often is the password rotated, every 90 days?"
    assert rank_lexical(query, [others[0], lazy, others[1]], 3) == rank_lexical(query, [others[0], eager, others[1]], 3) == [1]
    hashed = lazy.terms
    assert hashed is not None and sorted(hashed.tolist()) == sorted(eager.terms.tolist())
    assert rank_lexical(query, [others[0], lazy, others[1]], 3) == [1] and lazy.terms is hashed  # not hashed again


_VOCABULARY = ["password", "rotation", "database", "oslo", "weather", "pasta", "lunch", "deploy", "friday", "budget", "the", "and"]


def _rank_model(query: str, candidates: list[Candidate], limit: int, k1: float = 1.2, b: float = 0.75) -> list[int]:
    """BM25 with binary tf, one candidate at a time in plain Python: what rank_lexical computes.

    Each term's part is computed in float32 as rank_lexical's are, and summed in term-id order:
    equal scores must tie exactly for the later-candidate-first rule to be checked."""
    import numpy as np

    from proxy.lexical import query_ids, term_weights

    wanted = query_ids(query).tolist()
    docs = [set(query_ids(c.text).tolist()) for c in candidates]
    weights = dict(zip(wanted, term_weights([sum(t in d for d in docs) for t in wanted], len(docs), k1)))
    avg = np.float32(max(float(np.array([len(d) for d in docs], dtype=np.float32).mean()), 1e-6)) if docs else np.float32(1)
    scored = []
    for position, doc in enumerate(docs):
        common = sorted(doc & set(wanted))
        if common:
            norm = np.float32(len(doc)) * np.float32(b) / avg + np.float32(1.0 - b)
            norm = norm * np.float32(k1) + np.float32(1.0)
            total = 0.0
            for t in common:
                total += float(np.float32(weights[t]) / norm)
            scored.append((total, position))
    scored.sort(key=lambda s: (-s[0], -s[1]))
    return [position for _, position in scored[:limit]]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(_VOCABULARY), max_size=12), max_size=40),
    st.lists(st.sampled_from(_VOCABULARY), max_size=8),
    st.integers(min_value=0, max_value=10),
)
def test_lexical_ranking_matches_the_per_candidate_model(texts: list[list[str]], query: list[str], limit: int) -> None:
    # A small vocabulary: many candidates share terms and tie, so ties must break the same way
    # (the later candidate first).
    candidates = [Candidate(i, i, " ".join(words)) for i, words in enumerate(texts)]
    text = " ".join(query)
    assert rank_lexical(text, candidates, limit) == _rank_model(text, candidates, limit)


def test_room_kept_free_for_the_memory_block_is_at_most_a_quarter_of_the_prompt() -> None:
    settings = parse({"max_context_tokens": {"small": 2000, "*": None}})
    prompt = 2000 - 1024
    kept = budget_for(settings, "small", "openai/gpt-4o", {}, keep_free=100)
    assert (kept.prompt, kept.kept_free) == (prompt - 100, 100)
    capped = budget_for(settings, "small", "openai/gpt-4o", {}, keep_free=1200)  # memory's default max_inject_tokens
    assert (capped.prompt, capped.kept_free) == (prompt - prompt // 4, prompt // 4)
    assert budget_for(settings, "small", "openai/gpt-4o", {}).kept_free == 0
