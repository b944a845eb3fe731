"""Session expiry: the janitor erases sessions idle longer than their tenant's TTL."""

from __future__ import annotations

from pathlib import Path

from proxy import janitor
from proxy.config import load_config
from proxy.records import Message, Session
from proxy.storage.base import Record
from proxy.storage.memory import InMemoryStore
from tests.harness import open_tenant, write_config


async def test_sweep_deletes_only_expired_sessions_and_their_data(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"short": open_tenant("http://h/v1", session_ttl_seconds=60), "long": open_tenant("http://h/v1", session_ttl_seconds=3600)}))
    store = InMemoryStore()
    for tenant in ("short", "long"):
        for sid, last_active in (("old", 1000.0), ("fresh", 1990.0)):
            session = Session(tenant=tenant, id=sid, created_at=0, last_active=last_active, head=0, next_seq=1)
            message = Message(seq=0, parent=None, chain="c", role="user", body={"role": "user", "content": "x"}, ts=0)
            await store.commit(session, [message], [Record("checkpoint", "k", {"v": 1}, sid)])
    deleted = await janitor.sweep(store, config.tenants.values(), now=2000.0)
    assert deleted == 1
    assert {s.id for s in await store.list_sessions("short")} == {"fresh"}
    assert {s.id for s in await store.list_sessions("long")} == {"old", "fresh"}
    assert await store.get_messages("short", "old") == [] and await store.scan_records("short", "checkpoint", "old") == []
