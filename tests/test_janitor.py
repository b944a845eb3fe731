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


async def test_a_session_in_use_or_renewed_meanwhile_is_kept(tmp_path: Path) -> None:
    """With the sessions' locks (Pipeline.hold) the janitor never deletes a session under a
    request in progress (on any replica, in a fleet), nor one a request renewed since the listing."""
    import contextlib
    import dataclasses

    from proxy.sessions import SessionLocks

    config = load_config(write_config(tmp_path, {"short": open_tenant("http://h/v1", session_ttl_seconds=60)}))
    store, locks = InMemoryStore(), SessionLocks()
    for sid in ("idle", "busy", "renewed"):
        await store.commit(Session(tenant="short", id=sid, created_at=0, last_active=1000.0, head=None, next_seq=0), [])

    @contextlib.asynccontextmanager
    async def hold(tenant: str, session_id: str, refuse: bool):
        if session_id == "renewed":  # a request ended (and renewed it) just before the janitor got to it
            session = await store.get_session(tenant, session_id)
            await store.commit(dataclasses.replace(session, last_active=1990.0), [])
        async with locks.hold(tenant, session_id, refuse):
            yield

    async with locks.hold("short", "busy", False):  # a request of "busy" is in progress
        assert await janitor.sweep(store, config.tenants.values(), now=2000.0, hold=hold) == 1
    assert {s.id for s in await store.list_sessions("short")} == {"busy", "renewed"}
    assert await janitor.sweep(store, config.tenants.values(), now=2000.0, hold=hold) == 1  # its request ended
    assert {s.id for s in await store.list_sessions("short")} == {"renewed"}
