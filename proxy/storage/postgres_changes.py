"""What a fleet's replicas tell each other through PostgreSQL about long-term memory: the change
log of memory records, and the episodic indexing still owed for recorded messages.

PostgreSQL is the source of truth for memories and their vectors (``memory`` and
``memory_vector`` records, like every other record); each replica's search index is a cache of
them (proxy/memory/fleet_sync.py). Two tables, filled by triggers, so no write path has to
remember them and a delete by any path (a memory, a session, a user's erasure, a quarantine) is
logged like an add:

* ``asp_memory_changes``: (tenant, seq) → which memory record changed, ``seq`` counting per
  tenant without gaps. The trigger is a deferred constraint trigger: it numbers the change at
  commit, under the row lock of the tenant's counter (``asp_memory_heads``), so a tenant's changes
  commit in ``seq`` order and a reader that has seen ``seq`` n has seen every change before it.
  Taking that lock last in the transaction (at commit) means it can be part of no deadlock.
  Each commit also sends ``NOTIFY asp_memory, '<tenant>'`` (delivered on commit).
* ``asp_memory_pending``: (tenant, session) → the highest message seq recorded and when indexing
  last made progress. A recorded message is owed to episodic indexing until the session's mark
  passes it; a replica that dies before indexing leaves the row behind, and another replica
  claims it once it has made no progress for a grace period (``FOR UPDATE SKIP LOCKED``, the
  claim itself renewing the row's time as a lease).

Both triggers only act for connections that set ``asp.fleet = on`` (fleet mode,
``replicas: many``), and the pending trigger only for tenants registered in
``asp_memory_tenants`` (those with episodic memory on): a single proxy, or a fleet without
memory, pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, NamedTuple, Sequence, TypeVar

import asyncpg

from proxy import codec
from proxy.codec import CorruptRecord
from proxy.records import Session
from proxy.storage.base import StorageError
from proxy.storage.kv import session_digest

log = logging.getLogger("agent_state_proxy.storage")
T = TypeVar("T")

CHANNEL = "asp_memory"
FLEET_SETTING = "asp.fleet"  # set to "on" on every connection of a replica in fleet mode

MIGRATION = """
CREATE TABLE asp_memory_heads (tenant text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE asp_memory_changes (tenant text NOT NULL, seq bigint NOT NULL, sid bytea NOT NULL, key bytea NOT NULL,
                                 at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, seq));
CREATE INDEX asp_memory_changes_at ON asp_memory_changes (at);
CREATE TABLE asp_memory_tenants (tenant text PRIMARY KEY);
CREATE TABLE asp_memory_pending (tenant text NOT NULL, sid bytea NOT NULL, upto bigint NOT NULL,
                                 touched timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, sid));
CREATE INDEX asp_memory_pending_touched ON asp_memory_pending (touched);

CREATE FUNCTION asp_memory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed asp_records;
    number bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    INSERT INTO asp_memory_heads AS h (tenant, seq) VALUES (changed.tenant, 1)
        ON CONFLICT (tenant) DO UPDATE SET seq = h.seq + 1 RETURNING h.seq INTO number;
    INSERT INTO asp_memory_changes (tenant, seq, sid, key) VALUES (changed.tenant, number, changed.sid, changed.key);
    PERFORM pg_notify('asp_memory', changed.tenant);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER asp_memory_put AFTER INSERT OR UPDATE ON asp_records DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.kind = 'memory' AND current_setting('asp.fleet', true) = 'on') EXECUTE FUNCTION asp_memory_changed();
CREATE CONSTRAINT TRIGGER asp_memory_drop AFTER DELETE ON asp_records DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.kind = 'memory' AND current_setting('asp.fleet', true) = 'on') EXECUTE FUNCTION asp_memory_changed();

CREATE FUNCTION asp_message_recorded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM asp_memory_tenants WHERE tenant = NEW.tenant) THEN
        INSERT INTO asp_memory_pending AS p (tenant, sid, upto) VALUES (NEW.tenant, NEW.sid, NEW.seq)
            ON CONFLICT (tenant, sid) DO UPDATE SET upto = greatest(p.upto, EXCLUDED.upto);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER asp_message_recorded AFTER INSERT ON asp_messages
    FOR EACH ROW WHEN (current_setting('asp.fleet', true) = 'on') EXECUTE FUNCTION asp_message_recorded();
"""

_MEMORY, _VECTOR = "memory", "memory_vector"  # the record kinds (proxy/memory/model.py)
_TENANT_WIDE = b""
_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Change(NamedTuple):
    """A memory record that changed: where it is stored (its session's digest, or b"" for a
    memory of no session) and its id."""

    sid: bytes
    memory_id: str


class MemoryFeed:
    """The memory change log and the episodic indexing owed, of one fleet database.

    Every method raises StorageError (never a driver error) when PostgreSQL fails.
    """

    def __init__(self, pool: asyncpg.Pool, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._pool = pool
        self._connect = connect  # a dedicated connection (LISTEN holds one for the replica's life)

    @contextlib.asynccontextmanager
    async def _connection(self):
        try:
            async with self._pool.acquire() as connection:
                yield connection
        except _ERRORS as exc:
            raise StorageError(f"memory feed: {type(exc).__name__}") from exc

    # -- the change log ----------------------------------------------------------------------

    async def head(self, tenant: str) -> int:
        """The tenant's newest change: a cache loaded after reading it misses nothing newer."""
        async with self._connection() as connection:
            return int(await connection.fetchval("SELECT seq FROM asp_memory_heads WHERE tenant = $1", tenant) or 0)

    async def oldest(self, tenant: str) -> int | None:
        """The oldest change still kept (older ones are pruned), None when none is."""
        async with self._connection() as connection:
            return await connection.fetchval("SELECT min(seq) FROM asp_memory_changes WHERE tenant = $1", tenant)

    async def changes(self, tenant: str, after: int, limit: int = 1000) -> list[tuple[int, Change]]:
        """(seq, change) of the tenant's changes after ``after``, oldest first."""
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT seq, sid, key FROM asp_memory_changes WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                                          tenant, after, limit)
        return [(int(r["seq"]), Change(bytes(r["sid"]), _text(r["key"]))) for r in rows]

    async def memories(self, tenant: str, changed: Sequence[Change]) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
        """The current records (memory, vector or None) of these changed memories, by id; one
        without a record (erased) is absent. An undecodable record is left out (the store's
        reads quarantine it)."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT m.key, m.record, v.record AS vector FROM unnest($4::bytea[], $5::bytea[]) AS c(sid, key) "
                "JOIN asp_records m ON m.tenant = $1 AND m.sid = c.sid AND m.kind = $2 AND m.key = c.key "
                "LEFT JOIN asp_records v ON v.tenant = $1 AND v.sid = c.sid AND v.kind = $3 AND v.key = c.key",
                tenant, _MEMORY, _VECTOR, [c.sid for c in changed], [c.memory_id.encode() for c in changed])
        found = {}
        for row in rows:
            try:
                found[_text(row["key"])] = (codec.decode(row["record"]), codec.decode(row["vector"]) if row["vector"] is not None else None)
            except (CorruptRecord, UnicodeDecodeError) as exc:
                log.error("memory feed: undecodable memory record of tenant %s skipped: %s", tenant, exc)
        return found

    async def stored(self, tenant: str) -> set[Change]:
        """Every memory the tenant has (a cache that missed changes reconciles with it)."""
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT sid, key FROM asp_records WHERE tenant = $1 AND kind = $2", tenant, _MEMORY)
        return {Change(bytes(r["sid"]), _text(r["key"])) for r in rows}

    @contextlib.asynccontextmanager
    async def snapshot(self, tenant: str) -> AsyncIterator[Snapshot]:
        """One consistent, read-only view of the tenant (REPEATABLE READ) to build a cache from:
        the change-log head, sessions, marks and memories all as of one moment."""
        async with self._connection() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            yield Snapshot(connection, tenant)

    async def prune(self, older_than_s: float) -> int:
        """Drop changes older than this (every replica has read them long ago)."""
        async with self._connection() as connection:
            done = await connection.execute("DELETE FROM asp_memory_changes WHERE at < now() - make_interval(secs => $1)", older_than_s)
        return int(done.split()[-1])

    async def listen(self, on_change: Callable[[str], None]) -> asyncpg.Connection:
        """A connection of its own, listening: ``on_change(tenant)`` after each commit that changed
        a memory of the tenant. The caller closes it (and opens another when it breaks)."""
        try:
            connection = await self._connect()
        except _ERRORS as exc:
            raise StorageError(f"memory feed: cannot listen: {type(exc).__name__}") from exc
        try:
            await connection.add_listener(CHANNEL, lambda _c, _pid, _channel, payload: on_change(payload))
        except BaseException as exc:
            await close_quietly(connection)
            if isinstance(exc, _ERRORS):
                raise StorageError(f"memory feed: cannot listen: {type(exc).__name__}") from exc
            raise
        return connection

    # -- episodic indexing owed --------------------------------------------------------------

    async def register(self, tenants: Iterable[str]) -> None:
        """From now on, recorded messages of these tenants are owed to episodic indexing."""
        async with self._connection() as connection:
            await connection.executemany("INSERT INTO asp_memory_tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING",
                                         [(t,) for t in tenants])

    async def owe(self, tenant: str, sessions: Iterable[tuple[str, int]]) -> None:
        """(session id, last seq) still to index, found at start-up: owed like new messages, so
        the replica that claims them indexes them, once."""
        async with self._connection() as connection:
            await connection.executemany(
                "INSERT INTO asp_memory_pending AS p (tenant, sid, upto) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant, sid) DO UPDATE SET upto = greatest(p.upto, EXCLUDED.upto)",
                [(tenant, session_digest(sid), upto) for sid, upto in sessions])

    async def indexed(self, tenant: str, marks: dict[str, int]) -> None:
        """Sessions indexed below these seqs (their marks are committed): what is paid is no
        longer owed, and what is left gets a fresh grace period (it was just recorded)."""
        rows = [(tenant, session_digest(sid), mark) for sid, mark in marks.items()]
        async with self._connection() as connection, connection.transaction():
            await connection.executemany("DELETE FROM asp_memory_pending WHERE tenant = $1 AND sid = $2 AND upto < $3", rows)
            await connection.executemany("UPDATE asp_memory_pending SET touched = now() WHERE tenant = $1 AND sid = $2 AND upto >= $3", rows)

    async def claim(self, tenants: Sequence[str], grace_s: float, limit: int = 16) -> list[tuple[str, Session | None, bytes, int]]:
        """Owed sessions of these tenants without progress for ``grace_s``: claimed (for another
        ``grace_s``, then any replica may claim them again) as (tenant, session or None when it
        is gone, its digest, last seq owed)."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                "UPDATE asp_memory_pending p SET touched = now() FROM ("
                "  SELECT tenant, sid FROM asp_memory_pending WHERE tenant = ANY($1::text[]) "
                "  AND touched < now() - make_interval(secs => $2) ORDER BY touched LIMIT $3 FOR UPDATE SKIP LOCKED) c "
                "WHERE p.tenant = c.tenant AND p.sid = c.sid "
                "RETURNING p.tenant, p.sid, p.upto, (SELECT record FROM asp_sessions s WHERE s.tenant = p.tenant AND s.sid = p.sid) AS session",
                list(tenants), grace_s, limit)
        claimed = []
        for row in rows:
            session = None
            if row["session"] is not None:
                with contextlib.suppress(CorruptRecord, TypeError, KeyError):
                    session = Session.from_dict(codec.decode(row["session"]))
            claimed.append((row["tenant"], session, bytes(row["sid"]), int(row["upto"])))
        return claimed

    async def settle(self, tenant: str, sid: bytes, upto: int) -> None:
        """A claimed session owes nothing up to ``upto`` (gone, or nothing left to index)."""
        async with self._connection() as connection:
            await connection.execute("DELETE FROM asp_memory_pending WHERE tenant = $1 AND sid = $2 AND upto <= $3", tenant, sid, upto)

    async def owed(self, tenant: str) -> int:
        """Sessions of the tenant with messages still owed to indexing (stats, tests)."""
        async with self._connection() as connection:
            return int(await connection.fetchval("SELECT count(*) FROM asp_memory_pending WHERE tenant = $1", tenant))


class Snapshot:
    """What a replica builds its memory cache from (MemoryFeed.snapshot). Undecodable records
    are skipped here (the view is read-only); the store's own reads quarantine them."""

    def __init__(self, connection: asyncpg.Connection, tenant: str) -> None:
        self._connection, self.tenant = connection, tenant

    async def head(self) -> int:
        return int(await self._connection.fetchval("SELECT seq FROM asp_memory_heads WHERE tenant = $1", self.tenant) or 0)

    async def changed(self, after: int, head: int) -> set[str] | None:
        """The ids of the memories changed after change ``after`` up to ``head``; None when the
        log no longer holds every one of those changes (pruned, or numbered anew: ``after`` is
        past the head). The numbering has no gaps, so counting them is the check."""
        if after > head:
            return None
        if after == head:
            return set()
        rows = await self._connection.fetch("SELECT key FROM asp_memory_changes WHERE tenant = $1 AND seq > $2 AND seq <= $3",
                                            self.tenant, after, head)
        return {_text(row["key"]) for row in rows} if len(rows) == head - after else None

    async def sessions(self) -> list[Session]:
        rows = await self._connection.fetch("SELECT record FROM asp_sessions WHERE tenant = $1", self.tenant)
        return [session for row in rows if (session := _decoded(row["record"], Session.from_dict)) is not None]

    async def records(self, kind: str) -> dict[bytes, dict[str, Any]]:
        """Every record of this kind (one per session, such as marks), by session digest."""
        rows = await self._connection.fetch("SELECT sid, record FROM asp_records WHERE tenant = $1 AND kind = $2", self.tenant, kind)
        return {bytes(row["sid"]): value for row in rows if (value := _decoded(row["record"], dict)) is not None}

    async def memories(self, page: int = 1024) -> AsyncIterator[list[tuple[bytes, bytes, bytes | None]]]:
        """Every memory of the tenant with its vector record, ``page`` at a time, still encoded
        (decode them off the event loop with ``decode_memories``): one query, streamed."""
        query = ("SELECT m.sid, m.record, v.record AS vector FROM asp_records m LEFT JOIN asp_records v "
                 "ON v.tenant = m.tenant AND v.sid = m.sid AND v.kind = $3 AND v.key = m.key WHERE m.tenant = $1 AND m.kind = $2")
        rows: list[tuple[bytes, bytes, bytes | None]] = []
        async for row in self._connection.cursor(query, self.tenant, _MEMORY, _VECTOR, prefetch=page):
            rows.append((bytes(row["sid"]), row["record"], row["vector"]))
            if len(rows) >= page:
                yield rows
                rows = []
        if rows:
            yield rows


def decode_memories(rows: list[tuple[bytes, bytes, bytes | None]]) -> list[tuple[bytes, dict[str, Any], dict[str, Any] | None]]:
    """(session digest or b"", memory record, vector record or None) of ``Snapshot.memories``
    rows; an undecodable memory is left out (the store's reads quarantine it)."""
    decoded = []
    for sid, raw, vector in rows:
        value = _decoded(raw, dict)
        if value is not None:
            decoded.append((sid, value, _decoded(vector, dict) if vector is not None else None))
    return decoded


def _decoded(raw: bytes, build: Callable[[Any], T]) -> T | None:
    try:
        return build(codec.decode(raw))
    except (CorruptRecord, TypeError, KeyError, ValueError):
        return None


def _text(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "surrogatepass")


async def close_quietly(connection: asyncpg.Connection | None) -> None:
    """Close a listening connection, whatever state it is in."""
    if connection is None:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 5)
