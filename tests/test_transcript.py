"""History reconciliation against a stored transcript tree."""

from __future__ import annotations

from proxy.records import Message
from proxy.transcript import ROOT_CHAIN, active_path, chain_hash, reconcile


def store(*bodies: dict, parent_of: dict[int, int | None] | None = None) -> list[Message]:
    """Stored messages in a line (or with explicit parents), chains computed like the pipeline."""
    messages: list[Message] = []
    for seq, body in enumerate(bodies):
        parent = (parent_of or {}).get(seq, seq - 1 if seq else None)
        chain = chain_hash(messages[parent].chain if parent is not None else ROOT_CHAIN, body)
        messages.append(Message(seq=seq, parent=parent, chain=chain, role=body["role"], body=body, ts=0.0))
    return messages


SYS = {"role": "system", "content": "be brief"}
U1 = {"role": "user", "content": "hi"}
A1 = {"role": "assistant", "content": "hello"}
U2 = {"role": "user", "content": "what's 2+2?"}
A2 = {"role": "assistant", "content": "4"}
U3 = {"role": "user", "content": "and 3+3?"}


def test_full_history_appends_only_new_messages() -> None:
    stored = store(SYS, U1, A1)
    plan = reconcile(stored, 2, [SYS, U1, A1, U2], "auto")
    assert plan.new_messages == [U2]
    assert plan.parent is stored[2]
    assert plan.upstream_messages == [SYS, U1, A1, U2]
    assert not plan.branched and not plan.restored


def test_new_session_records_everything() -> None:
    plan = reconcile([], None, [SYS, U1], "auto")
    assert plan.new_messages == [SYS, U1] and plan.parent is None and not plan.branched


def test_only_new_message_restores_stored_history() -> None:
    stored = store(SYS, U1, A1)
    plan = reconcile(stored, 2, [U2], "auto")
    assert plan.upstream_messages == [SYS, U1, A1, U2]
    assert plan.new_messages == [U2] and plan.parent is stored[2] and plan.restored == 3


def test_system_prompt_plus_new_message_restores_between() -> None:
    stored = store(SYS, U1, A1)
    plan = reconcile(stored, 2, [SYS, U2], "auto")
    assert plan.upstream_messages == [SYS, U1, A1, U2]
    assert plan.new_messages == [U2]


def test_tail_of_conversation_is_aligned_not_branched() -> None:
    # After a restart the agent's own history is only what it saw since: U2, A2, then U3.
    stored = store(SYS, U1, A1, U2, A2)
    plan = reconcile(stored, 4, [SYS, U2, A2, U3], "auto")
    assert plan.upstream_messages == [SYS, U1, A1, U2, A2, U3]
    assert plan.new_messages == [U3] and plan.parent is stored[4] and not plan.branched


def test_client_mode_never_restores() -> None:
    stored = store(SYS, U1, A1)
    plan = reconcile(stored, 2, [U2], "client")
    assert plan.upstream_messages == [U2] and plan.branched and plan.parent is None


def test_edit_of_earlier_message_is_a_branch() -> None:
    stored = store(SYS, U1, A1, U2, A2)
    edited = {"role": "user", "content": "what's 5+5?"}
    plan = reconcile(stored, 4, [SYS, U1, A1, edited], "auto")
    assert plan.branched and plan.parent is stored[2] and plan.new_messages == [edited]
    assert plan.upstream_messages == [SYS, U1, A1, edited]


def test_regeneration_is_a_replay_on_a_branch() -> None:
    stored = store(SYS, U1, A1)
    plan = reconcile(stored, 2, [SYS, U1], "auto")
    assert plan.replayed and plan.parent is stored[1] and plan.branched and plan.new_messages == []


def test_different_conversation_with_assistant_turns_is_not_restored_in_auto() -> None:
    stored = store(SYS, U1, A1)
    other = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    plan = reconcile(stored, 2, other, "auto")
    assert plan.upstream_messages == other and plan.branched and not plan.restored


def test_proxy_mode_appends_to_stored_history() -> None:
    stored = store(SYS, U1, A1)
    other = [{"role": "assistant", "content": "noted"}, U2]
    plan = reconcile(stored, 2, other, "proxy")
    assert plan.upstream_messages == [SYS, U1, A1, *other] and plan.new_messages == other


def test_resent_tool_calls_match_despite_sdk_reshaping() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    stored = store(U1, {"role": "assistant", "content": None, "tool_calls": [call]})
    resent = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}, "type": "function"}]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    plan = reconcile(stored, 1, [U1, resent, tool], "auto")
    assert plan.new_messages == [tool] and plan.parent is stored[1]


def test_active_path_follows_parents() -> None:
    stored = store(U1, A1, {"role": "assistant", "content": "other"}, parent_of={2: 0})
    assert [m.seq for m in active_path(stored, 2)] == [0, 2]
    assert [m.seq for m in active_path(stored, 1)] == [0, 1]


# -- the fast paths agree with plain hashing ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from proxy.transcript import Plan, _is_system, message_hash  # noqa: E402


def _reference_reconcile(stored: list[Message], head: int | None, incoming: list[dict], mode: str) -> Plan:
    """reconcile() as first written: every incoming and stored message hashed, no shortcuts."""
    by_chain = {m.chain: m for m in stored}
    parent, chain, matched = None, ROOT_CHAIN, 0
    for body in incoming:
        candidate = by_chain.get(chain_hash(chain, body))
        if candidate is None:
            break
        parent, chain, matched = candidate, candidate.chain, matched + 1
    remainder = incoming[matched:]
    head_message = next((m for m in stored if m.seq == head), None) if head is not None else None
    if not remainder:
        return Plan(list(incoming), [], parent, replayed=True, branched=bool(parent and parent.seq != head))
    at_head = (parent is None and head_message is None) or (parent is not None and parent.seq == head)
    if at_head or head_message is None or mode == "client" or not all(_is_system(b) for b in incoming[:matched]):
        return Plan(list(incoming), list(remainder), parent, branched=bool(stored) and not at_head)
    path = active_path(stored, head)
    stored_rest = [m for m in path if not _is_system(m.body)]
    client_rest = [b for b in remainder if not _is_system(b)]
    overlap = 0
    if stored_rest and client_rest:
        hashes = [message_hash(m.body) for m in stored_rest]
        for start, digest in enumerate(hashes):
            size = len(hashes) - start
            if digest == message_hash(client_rest[0]) and size <= len(client_rest) and all(
                    hashes[start + i] == message_hash(client_rest[i]) for i in range(size)):
                overlap = size
                break
    if overlap == 0 and mode == "auto" and any(b.get("role") in ("assistant", "tool") for b in client_rest):
        return Plan(list(incoming), list(remainder), parent, branched=True)
    client_system = [b for b in incoming if _is_system(b)]
    stored_system = [m.body for m in path if _is_system(m.body)]
    upstream = (client_system or stored_system) + [m.body for m in stored_rest] + client_rest[overlap:]
    plan = Plan(upstream, client_rest[overlap:], head_message, restored=len(path) - overlap)
    if client_system and stored_system and client_system != stored_system:
        plan.notes.append("system prompt differs from the stored one; sent the client's")
    if not plan.new_messages:
        plan.replayed = True
    return plan


_BODIES = [SYS, U1, A1, U2, A2, U3, {"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}},
           {"role": "assistant", "content": ""}, {"role": "assistant", "content": None}]


@settings(max_examples=1500, deadline=None)
@given(
    bodies=st.lists(st.sampled_from(_BODIES), min_size=0, max_size=8),
    forks=st.lists(st.integers(0, 7), max_size=3),
    head_pick=st.integers(0, 20),
    start=st.integers(0, 8),
    stop=st.integers(0, 9),
    extra=st.lists(st.sampled_from(_BODIES), max_size=3),
    mode=st.sampled_from(["auto", "client", "proxy"]),
)
def test_reconcile_matches_the_plain_hashing_reference(bodies, forks, head_pick, start, stop, extra, mode) -> None:
    # A stored tree: a line, with some messages re-parented to make branches.
    parent_of = {seq: (fork % seq if seq else None) for seq, fork in zip(range(1, len(bodies)), forks)}
    stored = store(*bodies, parent_of=parent_of) if bodies else []
    if len({m.chain for m in stored}) < len(stored):
        return  # the pipeline never records a path twice (a resent one matches)
    head = stored[head_pick % len(stored)].seq if stored else None
    line = [m.body for m in active_path(stored, head)]
    incoming = line[:1] * (start % 2) + line[start:stop] + extra  # prefixes, tails, edits, cache hints
    if not incoming:
        return
    got, want = reconcile(stored, head, incoming, mode), _reference_reconcile(stored, head, incoming, mode)
    assert (got.upstream_messages, got.new_messages, got.parent, got.restored, got.branched, got.replayed, got.notes) == (
        want.upstream_messages, want.new_messages, want.parent, want.restored, want.branched, want.replayed, want.notes)
    if got.path is not None:  # the path it hands the context stage is the parent's own
        assert got.parent is not None and got.path == active_path(stored, got.parent.seq)

