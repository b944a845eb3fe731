"""Rollback removes what was derived from the reverted turns (summaries) in the same write."""

from __future__ import annotations

from proxy import rollback
from proxy.records import Message, Session
from proxy.storage.base import Record
from proxy.storage.memory import InMemoryStore


async def test_rollback_deletes_summaries_covering_reverted_messages_only() -> None:
    store = InMemoryStore()
    session = Session(tenant="t", id="s", created_at=1, last_active=1, head=7, next_seq=8, turns=4)
    messages = [
        Message(seq=i, parent=i - 1 if i else None, chain=f"{i:032x}", role="user" if i % 2 == 0 else "assistant",
                body={"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}, ts=1)
        for i in range(8)
    ]
    summaries = [Record("summary", "early", {"seqs": [0, 1, 2, 3], "first": 0, "last": 3}, "s"),
                 Record("summary", "late", {"seqs": [4, 5, 6, 7], "first": 4, "last": 7}, "s")]
    await store.commit(session, messages, summaries)
    report = await rollback.rollback(store, session, messages, {"turns": 1}, now=2.0)
    assert report["reverted"] == [6, 7] and report["head"] == 5 and report["derived_removed"] == 1
    assert [key for key, _ in await store.scan_records("t", "summary", "s")] == ["early"]
    stored = await store.get_messages("t", "s")
    assert [m.seq for m in stored if m.reverted] == [6, 7]
    assert (await store.get_session("t", "s")).head == 5
