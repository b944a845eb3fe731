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
