"""Context assembly: the integrity rules hold for any conversation and any budget."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens
from proxy.context import summaries
from proxy.context.assemble import ContextTooLarge, Policy, assemble
from proxy.context.importance import PRIORITY, tag_message
from proxy.context.units import Item, View, build_view

ENC = tokens.DEFAULT_ENCODING
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
FULL = Policy(window_turns=4, window_share=0.5, summaries=True, pin_share=0.25, retrieval_share=0.1, summary_estimate=40)


def conversation(turns: int, *, tool_every: int = 0, pin_at: tuple[int, ...] = (), words: int = 12) -> list[dict[str, Any]]:
    messages = [SYSTEM]
    for t in range(turns):
        filler = " ".join(f"word{t}x{i}" for i in range(words))
        text = f"My name is Ada and my locker code is {4400 + t}." if t in pin_at else f"Turn {t} question: {filler}"
        messages.append({"role": "user", "content": text})
        if tool_every and t % tool_every == tool_every - 1:
            calls = [{"id": f"call_{t}_{k}", "type": "function", "function": {"name": "lookup", "arguments": f'{{"q": {t}, "k": {k}}}'}} for k in range(2)]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call in calls:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"result of {call['id']}: {filler}"})
        messages.append({"role": "assistant", "content": f"Answer {t}: {filler}"})
    return messages


def view_of(messages: list[dict[str, Any]], segment_turns: int = 3) -> View:
    items = [
        Item(m, tokens.count_message(m, ENC), seq, tuple(tag_message(m) or ()), len(m.get("content") or ""))
        for seq, m in enumerate(messages)
    ]
    return build_view(items, segment_turns, PRIORITY)


def segment_summaries(view: View, every: int = 1) -> dict[str, summaries.Summary]:
    found = {}
    for segment in view.segments[::every]:
        text = f"Segment {segment.index}: the user asked questions {segment.seqs[0]}–{segment.seqs[-1]}."
        found[segment.key] = summaries.make(segment.key, "segment", text, ENC, segment.seqs, "llm")
    return found


def sent_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(tokens.count_message(m, ENC) for m in messages)


def check_integrity(original: list[dict[str, Any]], result: list[dict[str, Any]]) -> None:
    """System first, newest user verbatim, order kept, tool calls with all their results."""
    assert result[0] is original[0]
    newest_user = next(m for m in reversed(original) if m["role"] == "user")
    assert any(m is newest_user for m in result)
    assert result[-1] is original[-1]
    positions = {id(m): i for i, m in enumerate(original)}
    kept = [positions[id(m)] for m in result if id(m) in positions]
    assert kept == sorted(kept), "messages reordered"
    added = [m for m in result if id(m) not in positions]
    # At most the summary (or omission note) message, right after the system prompt, and the
    # block of retrieved turns, right before the newest user message (or the final message).
    notes = [m for m in added if m["role"] == "system"]
    assert len(notes) <= 1 and all(m["content"].startswith("<context-") for m in notes)
    assert not notes or result[1] is notes[0]
    quoted = [m for m in added if m["role"] != "system"]
    assert len(quoted) <= 1 and all(m["role"] == "user" and m["content"].startswith("<context-recalled") for m in quoted)
    if quoted:
        following = result[result.index(quoted[0]) + 1]
        assert following is newest_user or following is original[-1]
    for i, message in enumerate(result):
        if message.get("tool_calls"):
            ids = [c["id"] for c in message["tool_calls"]]
            following = [m.get("tool_call_id") for m in result[i + 1:i + 1 + len(ids)]]
            assert following == ids, "a tool call lost its results"
        if message["role"] == "tool":
            j = i - 1
            while result[j]["role"] == "tool":
                j -= 1
            assert message["tool_call_id"] in [c["id"] for c in result[j].get("tool_calls") or ()], "orphan tool result"


def test_a_conversation_that_fits_is_sent_unchanged() -> None:
    messages = conversation(5)
    view = view_of(messages)
    result = assemble(view, {}, 10_000, FULL)
    assert result.messages == messages and not result.changed
    assert result.tokens == result.full_tokens == sent_tokens(messages)


def test_over_budget_uses_summaries_and_keeps_the_window_verbatim() -> None:
    messages = conversation(60)
    view = view_of(messages)
    available = segment_summaries(view)
    result = assemble(view, available, 1500, FULL)
    check_integrity(messages, result.messages)
    assert sent_tokens(result.messages) <= result.tokens <= 1500
    assert result.used and set(result.used) <= set(available)
    block = result.messages[1]["content"]
    assert block.startswith('<context-summary source="agent-state-proxy">') and block.endswith("</context-summary>")
    assert "## Segment of messages 1–" in block
    assert result.messages[-8:] == messages[-8:]  # the last four turns, verbatim


def test_summaries_are_reused_and_the_frontier_is_sticky() -> None:
    messages = conversation(60)
    view = view_of(messages)
    available = segment_summaries(view)
    first = assemble(view, available, 1500, FULL)
    grown = messages + [{"role": "user", "content": "one more question"}]
    second = assemble(view_of(grown), available, 1500, FULL, hint_seq=first.frontier_seq)
    assert second.used == first.used  # same summaries, same prefix: the previous frontier still fits
    assert second.messages[:len(first.messages) - 1] == first.messages[:-1]
    assert not second.missing


def test_missing_summaries_are_reported_not_invented() -> None:
    messages = conversation(60)
    view = view_of(messages)
    result = assemble(view, {}, 1500, FULL)
    assert result.missing  # the manager makes these (LLM or extractive) and assembles again
    assert sent_tokens(result.messages) <= 1500
    check_integrity(messages, result.messages)


def test_pinned_messages_stay_verbatim_while_they_fit() -> None:
    messages = conversation(60, pin_at=(2, 7))
    view = view_of(messages)
    result = assemble(view, segment_summaries(view), 1500, FULL)
    pinned = [m for m in messages if "locker code" in str(m.get("content"))]
    assert len(pinned) == 2 and all(any(m is p for m in result.messages) for p in pinned)
    assert result.pinned == 2
    no_pins = assemble(view, segment_summaries(view), 1500, FULL.__class__(**{**FULL.__dict__, "pin_share": 0.0}))
    assert not any("locker code" in str(m.get("content")) for m in no_pins.messages)


def test_tool_calls_and_results_are_kept_or_dropped_together() -> None:
    messages = conversation(40, tool_every=3)
    view = view_of(messages)
    for budget in (700, 900, 1300, 2000):
        result = assemble(view, segment_summaries(view), budget, FULL)
        check_integrity(messages, result.messages)
        assert sent_tokens(result.messages) <= budget


def test_window_only_drops_the_oldest_turns_with_a_note() -> None:
    window_only = Policy(window_turns=4, window_share=0.5, summaries=False, pin_share=0.0, retrieval_share=0.0, summary_estimate=40)
    messages = conversation(40)
    result = assemble(view_of(messages), {}, 1200, window_only)
    check_integrity(messages, result.messages)
    assert sent_tokens(result.messages) <= 1200
    note = result.messages[1]["content"]
    assert note.startswith('<context-note source="agent-state-proxy">') and "earlier messages" in note
    assert result.omitted > 0 and result.messages[-8:] == messages[-8:]


def test_retrieved_units_come_back_in_order() -> None:
    messages = conversation(60)
    view = view_of(messages)
    wanted = [u for u in range(view.head, len(view.units)) if view.items[view.units[u].start].body["content"].startswith("Turn 5 ")]
    result = assemble(view, segment_summaries(view), 2000, FULL, ranked=wanted)
    question = view.units[wanted[0]].start
    assert result.retrieved == 2  # the question and the answer that followed it
    assert result.recalled == messages[question:question + 2]
    # Quoted, in order, in one block right before the newest user message: after everything
    # that stays the same from one request to the next (provider prompt caches).
    block = result.messages[-3]
    assert result.messages[-2] is messages[-2] and block["role"] == "user"
    assert block["content"].index(messages[question]["content"]) < block["content"].index(messages[question + 1]["content"])
    assert f"[message {question} · user]" in block["content"]
    assert not any(m is messages[question] for m in result.messages)
    check_integrity(messages, result.messages)


def test_a_newest_message_larger_than_the_budget_is_refused_not_truncated() -> None:
    messages = conversation(3) + [{"role": "user", "content": "big " * 2000}]
    with pytest.raises(ContextTooLarge) as error:
        assemble(view_of(messages), {}, 500, FULL)
    assert error.value.needed > 500 and error.value.budget == 500


def test_session_summaries_replace_the_segments_they_fold() -> None:
    messages = conversation(60)
    view = view_of(messages)
    available = segment_summaries(view)
    folded_upto = view.segments[5]
    seqs = [s for segment in view.segments[:6] for s in segment.seqs]
    available[folded_upto.session_key] = summaries.make(folded_upto.session_key, "session", "Everything until turn 18.", ENC, seqs, "llm")
    result = assemble(view, available, 1500, FULL)
    assert result.used[0] == folded_upto.session_key
    assert not set(result.used) & {s.key for s in view.segments[:6]}
    assert "## Summary of messages 1–" in result.messages[1]["content"]


@settings(max_examples=60, deadline=None)
@given(
    turns=st.integers(3, 45),
    tool_every=st.integers(0, 4),
    pins=st.lists(st.integers(0, 44), max_size=4),
    every=st.integers(1, 3),
    slack=st.floats(0.0, 1.2),
    hint=st.booleans(),
    policy=st.sampled_from([
        FULL,
        Policy(window_turns=4, window_share=0.5, summaries=False, pin_share=0.0, retrieval_share=0.0, summary_estimate=40),
        Policy(window_turns=None, window_share=0.5, summaries=True, pin_share=0.0, retrieval_share=0.0, summary_estimate=40),
        Policy(window_turns=2, window_share=0.3, summaries=False, pin_share=0.4, retrieval_share=0.2, summary_estimate=40),
    ]),
)
def test_any_conversation_any_budget_integrity_holds(turns: int, tool_every: int, pins: list[int], every: int, slack: float, hint: bool, policy: Policy) -> None:
    messages = conversation(turns, tool_every=tool_every, pin_at=tuple(pins), words=6)
    view = view_of(messages)
    available = segment_summaries(view, every)
    mandatory = sent_tokens([messages[0]]) + sum(view.units[u].tokens for u in {view.last_user, len(view.units) - 1})
    budget = int(mandatory + slack * (view.tokens - mandatory))
    hint_seq = view.items[view.units[len(view.units) // 2].start].seq if hint else None
    ranked = list(range(len(view.units) - 1, view.head - 1, -3))
    result = assemble(view, available, budget, policy, hint_seq=hint_seq, ranked=ranked)
    if view.tokens <= budget:
        assert result.messages == messages
        return
    check_integrity(messages, result.messages)
    assert sent_tokens(result.messages) <= result.tokens <= budget


def _unit_fields(view: View) -> list[tuple[Any, ...]]:
    return [(u.start, u.end, u.tokens, u.chars, u.role, u.priority) for u in view.units]


@settings(max_examples=80, deadline=None)
@given(
    script=st.lists(st.tuples(st.integers(0, 12), st.lists(st.tuples(
        st.sampled_from(["user", "assistant", "tool", "system"]), st.integers(1, 300), st.integers(0, 5000), st.booleans(),
        st.sampled_from([(), ("decision",), ("fact", "preference")])), max_size=12)), min_size=1, max_size=6),
    segment_turns=st.integers(1, 4),
)
def test_a_view_grown_from_the_previous_one_is_the_view_built_from_scratch(script: list[Any], segment_turns: int) -> None:
    """Each step keeps all but up to ``drop`` items of the previous request (the same objects,
    as the manager reuses them) and adds new ones; reusing the previous view's units and
    segments must give exactly what building the view from nothing gives."""
    items: list[Item] = []
    previous: View | None = None
    seq = 0
    for drop, added in script:
        kept = items[:max(0, len(items) - drop)]
        fresh = []
        for role, size, chars, stored, tags in added:
            fresh.append(Item({"role": role, "content": "x"}, size, seq if stored else None, tags, chars))
            seq += 1
        items = kept + fresh
        grown = build_view(items, segment_turns, PRIORITY, previous)
        scratch = build_view(list(items), segment_turns, PRIORITY)
        assert _unit_fields(grown) == _unit_fields(scratch)
        assert grown.segments == scratch.segments
        assert (grown.head, grown.tokens, grown.last_user, grown.suffix) == (scratch.head, scratch.tokens, scratch.last_user, scratch.suffix)
        if previous is not None:  # the previous view is left as it was
            assert _unit_fields(previous) == _unit_fields(build_view(list(previous.items), segment_turns, PRIORITY))
        previous = grown


async def test_summaries_loaded_together_share_their_seqs() -> None:
    # A session summary repeats every seq of the segments it folds; loaded (and cached) as one
    # int object per seq, equal to what was saved.
    from proxy.storage.memory import InMemoryStore

    store = InMemoryStore()
    first = summaries.make("seg:a", "segment", "first part", tokens.DEFAULT_ENCODING, range(300, 312), "extractive")
    second = summaries.make("seg:b", "segment", "second part", tokens.DEFAULT_ENCODING, range(312, 324), "extractive")
    folded = summaries.make("ses:b", "session", "both parts", tokens.DEFAULT_ENCODING, range(300, 324), "extractive", parts=["seg:a", "seg:b"])
    await summaries.save(store, "t", "s", first, second, folded)
    loaded = await summaries.load(store, "t", "s")
    assert {key: s.to_value() for key, s in loaded.items()} == {s.key: s.to_value() for s in (first, second, folded)}
    assert all(a is b for a, b in zip(loaded["ses:b"].seqs, loaded["seg:a"].seqs + loaded["seg:b"].seqs))


def test_a_growing_conversation_is_compacted_in_rare_large_steps_and_otherwise_appended_to() -> None:
    """Requests of one conversation, each with the previous one's frontier and summaries as
    hints (what the manager passes): between compactions each request repeats the previous one
    up to its newest user message and the block of retrieved turns before it."""
    policy = Policy(window_turns=4, window_share=0.5, summaries=True, pin_share=0.25, retrieval_share=0.1,
                    summary_estimate=40, high_water=1.0, low_water=0.5, tail_share_of_saved=0.05)
    messages = conversation(150, pin_at=(1,))
    hint, parts, previous, compactions, blocks = None, [], None, [], 0
    for end in range(2, len(messages) + 1, 2):  # each request ends with a user message
        view = view_of(messages[:end])
        available = segment_summaries(view)
        for segment in view.segments[7::8]:  # folds, as the background pass makes them
            seqs = [s for done in view.segments[:segment.index + 1] for s in done.seqs]
            available[segment.session_key] = summaries.make(segment.session_key, "session", f"All until {seqs[-1]}.", ENC, seqs, "llm")
        ranked = [u for u in range(view.head, len(view.units), 7)]
        result = assemble(view, available, 1500, policy, hint_seq=hint, hint_parts=parts, ranked=ranked)
        assert sent_tokens(result.messages) <= result.tokens <= 1500
        quoted = [m for m in result.messages if str(m.get("content")).startswith("<context-recalled")]
        if quoted:  # billed uncached every request: at most 5 % of what this request saves
            blocks += 1
            cost = tokens.count_message(quoted[0], ENC)
            assert cost <= 0.05 * (result.full_tokens - (result.tokens - cost))
        if previous is not None and result.changed:
            if previous.changed and result.frontier_seq == hint and result.used == parts:
                stable = [m for m in previous.messages[:-1] if not str(m.get("content")).startswith("<context-recalled")]
                assert result.messages[:len(stable)] == stable
            else:
                compactions.append(end)
                assert result.tokens <= 0.6 * 1500  # down to about the low-water mark
        hint, parts, previous = (result.frontier_seq if result.changed else None), result.used, result
    assert previous is not None and previous.changed
    assert {"role": "user", "content": messages[3]["content"]} in previous.messages  # the pinned message, verbatim
    # (high − low) × budget = 750 tokens between compactions: 8 turns of ~95 tokens.
    assert blocks > 20
    assert len(compactions) >= 10 and min(b - a for a, b in zip(compactions, compactions[1:])) >= 14
