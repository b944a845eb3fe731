"""Importance tagging: the substring prefilter never changes what the rules tag."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.context.importance import _RULES, _TRIGGERS, tag_message

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo-dev.json"

# Fragments the rules are made of, plus filler: random sentences over them hit every
# alternative of every rule (and near misses) far more often than prose does.
_FRAGMENTS = [
    "we", "i", "i've", "we've", "have", "decided", "let's", "lets", "go with", "we'll", "will", "use", "decision:",
    "agreed on", "settled to", "the plan is", "chose", "final answer", "promise", "commit", "remind me", "deadline",
    "due by", "due on", "action item", "to-do:", "todo:", "shall", "i'm going to", "am going to", "are going to",
    "tomorrow", "tonight", "next week", "this weekend", "by friday", "on monday", "at 5", "in 3 days", "prefer",
    "really like", "love", "hate", "dislike", "enjoy", "can't stand", "cannot stand", "my favourite", "my favorite",
    "i'd rather", "i would rather", "don't like", "dont want", "please always use", "never say", "i want you to",
    "my name", "my dog", "i'm a", "i am an", "i'm from", "allergic", "30 years", "i live", "i work", "grew up",
    "was born", "moved", "studied", "remember that", "note that", "important:", "2024-05-01", "a.b@c.io", "the",
    "parser", "test", "a bit", "a little", ".", "!", "\n", "ok", "code", "team",
]


def _prefiltered(text: str) -> set[str]:
    return {tag for tag, rule in _RULES.items() if any(t in text for t in _TRIGGERS[tag]) and rule.search(text)}


def _unfiltered(text: str) -> set[str]:
    return {tag for tag, rule in _RULES.items() if rule.search(text)}


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=14))
def test_triggers_are_necessary_on_rule_vocabulary(words: list[str]) -> None:
    text = " ".join(words)
    assert _prefiltered(text) == _unfiltered(text), text


def test_triggers_are_necessary_on_real_conversations() -> None:
    if not LOCOMO.exists():
        pytest.skip("LoCoMo data not present")
    data = json.loads(LOCOMO.read_text())
    texts = [turn["text"].lower() for sample in data for key, value in sample["conversation"].items()
             if re.fullmatch(r"session_\d+", key) for turn in value]
    assert len(texts) > 1000
    tagged = 0
    for text in texts:
        assert _prefiltered(text) == _unfiltered(text), text
        tagged += bool(_unfiltered(text))
    assert tagged > 100  # the corpus exercises the rules, not only the fast path


def test_tag_message_tags_what_the_rules_match() -> None:
    assert tag_message({"role": "user", "content": "We decided to ship on Friday."}) == ["decision"]
    assert tag_message({"role": "assistant", "content": "I'll send the report by Monday."}) == ["commitment"]
    assert tag_message({"role": "user", "content": "My name is Ada and I prefer tea."}) == ["preference", "fact"]
    assert tag_message({"role": "user", "content": "the parser reads a token"}) is None
    assert tag_message({"role": "system", "content": "We decided."}) is None
