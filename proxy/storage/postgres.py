"""The PostgreSQL backend: the state in a database the operations team already runs and backs up.

Records are the same bytes as in LMDB (proxy/codec.py, stored as BYTEA): one codec, one set of
integrity checks, and the database never parses them. Every row is keyed by tenant; session ids
are stored as their 16-byte digest (like LMDB's keys: any id, NUL bytes included, fits), and
record keys as bytes, so a scan is in the same order on every backend.

By default one replica at a time: the store holds a database-wide advisory lock while open, and a
second replica refuses to start (proxy/storage/pg_replica.py, which also watches the lock). With ``replicas="many"`` (fleet mode) there is no such lock;
instead a request holds a session-level advisory lock keyed by (tenant, session) on a connection
of a second small pool for its duration (``session_lock``), so one session has one writer across
the fleet. The caller must then cache nothing across requests (proxy/server/app.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Sequence, TypeVar

import asyncpg

from proxy import codec
from proxy.codec import CorruptRecord
from proxy.records import Message, Session, share_repeated_values
from proxy.storage import pg_replica, postgres_changes
from proxy.storage.base import Encoded, InvalidWrite, Quarantined, SessionBusy, Store, StorageError, Write, encode
from proxy.storage.kv import MAX_RECORD_KEY, session_digest
from proxy.storage.pg_claims import FAILURES, ClaimsConnection, job_lock_key

log = logging.getLogger("agent_state_proxy.storage")
T = TypeVar("T")

# Versioned migrations, applied in order under a transaction-scoped advisory lock, so replicas
# starting at once never race. Append; never edit one that shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE asp_sessions (tenant text NOT NULL, sid bytea NOT NULL, record bytea NOT NULL,
                               PRIMARY KEY (tenant, sid));
    CREATE TABLE asp_messages (tenant text NOT NULL, sid bytea NOT NULL, seq bigint NOT NULL, record bytea NOT NULL,
                               PRIMARY KEY (tenant, sid, seq));
    CREATE TABLE asp_records (tenant text NOT NULL, sid bytea NOT NULL, kind text NOT NULL, key bytea NOT NULL,
                              record bytea NOT NULL, PRIMARY KEY (tenant, sid, kind, key));
    CREATE TABLE asp_quarantine (id bigserial PRIMARY KEY, tenant text NOT NULL, key text NOT NULL,
                                 reason text NOT NULL, ts double precision NOT NULL, size integer NOT NULL, raw bytea NOT NULL);
    CREATE INDEX asp_quarantine_tenant ON asp_quarantine (tenant);
    """,
    postgres_changes.MIGRATION,  # 2: the memory change log and the episodic indexing owed (fleet mode)
    pg_replica.MIGRATION,  # 3: the token of the replica holding the replica lock (replicas: one)
)
_MIGRATION_LOCK = 0x6173_7001  # pg_advisory_xact_lock key: "asp" + 1
_TENANT_WIDE = b""  # the sid of records that belong to no session


async def migrate(connection: asyncpg.Connection) -> int:
    """Bring the schema to the current version; returns how many migrations ran."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await connection.execute("CREATE TABLE IF NOT EXISTS asp_schema (version integer NOT NULL)")
        version = await connection.fetchval("SELECT max(version) FROM asp_schema") or 0
        if version > len(MIGRATIONS):
            raise StorageError(f"the database schema (version {version}) is newer than this proxy ({len(MIGRATIONS)}): upgrade the proxy")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            await connection.execute(MIGRATIONS[number - 1])
            await connection.execute("INSERT INTO asp_schema (version) VALUES ($1)", number)
            log.info("database schema migrated to version %d", number)
        return len(MIGRATIONS) - version


async def migrate_database(dsn: str) -> int:
    """``agent-state-proxy migrate``: connect, migrate, disconnect (safe while replicas run)."""
    try:
        connection = await asyncpg.connect(dsn, timeout=10)
    except FAILURES as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {_safe(exc, dsn)}") from None
    try:
        return await migrate(connection)
    finally:
        await connection.close()


class PostgresStore(Store):
    def __init__(self, pool: asyncpg.Pool, replica: pg_replica.ReplicaLock | None, lock_pool: asyncpg.Pool | None = None,
                 lock_wait: float = 30.0) -> None:
        self._pool = pool
        self._replica = replica  # the replica lock (replicas: one)
        self._lock_pool = lock_pool  # connections holding session locks (replicas: many)
        self.shared = lock_pool is not None
        # How long a request waits for a lock connection (like the lock itself, bounded by the
        # statement timeout): a 503 rather than a hang when every one is held.
        self._lock_wait = lock_wait
        self._closed = False
        self._claims: ClaimsConnection | None = None  # job claims and readiness probes

    @classmethod
    async def open(cls, dsn: str, *, pool_size: int = 10, statement_timeout_ms: int = 30_000, replicas: str = "one") -> PostgresStore:
        """Connect, migrate, and (replicas: one) take the replica lock; StorageError (never the DSN) on failure."""
        settings = {"statement_timeout": str(statement_timeout_ms), "application_name": "agent-state-proxy"}
        logging.getLogger("asyncpg.pool").addFilter(_TERSE)
        if replicas == "many":  # the memory triggers log for fleet replicas only (proxy/storage/postgres_changes.py)
            settings[postgres_changes.FLEET_SETTING] = "on"
        # TCP keepalives: a peer whose host vanished (no FIN, no RST) is noticed, and its locks
        # freed, in ~25 s instead of the kernel's default two hours.
        keepalive = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
        replica = None
        try:
            if replicas == "one":
                replica = pg_replica.ReplicaLock(lambda: asyncpg.connect(dsn, server_settings=settings | keepalive, timeout=10))
                await replica.take()
                holder = replica.connection
            else:  # migrations only
                holder = await asyncpg.connect(dsn, server_settings=settings, timeout=10)
        except FAILURES as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {_safe(exc, dsn)}") from None
        lock_pool = None
        try:
            await migrate(holder)
            if replica is not None:
                await replica.stamp()
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size, server_settings=settings, timeout=10)
            if replicas == "many":
                # A session lock holds its connection for the whole request (upstream call
                # included): a pool of its own, so waiting requests never starve the reads and
                # writes of the requests that hold theirs. A wait is bounded by statement_timeout.
                lock_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size, server_settings=settings | keepalive, timeout=10)
        except BaseException:
            await (replica.close() if replica is not None else holder.close())
            raise
        if replica is None:
            await holder.close()  # it held nothing: a replica of a fleet excludes no other
            store = cls(pool, None, lock_pool, lock_wait=statement_timeout_ms / 1000)
            store._claims = ClaimsConnection(lambda: asyncpg.connect(dsn, server_settings=settings | keepalive, timeout=10))
            store._connect_listener = lambda: asyncpg.connect(dsn, server_settings=settings, timeout=10)
            return store
        store = cls(pool, replica)
        store._claims = ClaimsConnection(lambda: asyncpg.connect(dsn, server_settings=settings, timeout=10))
        return store

    @contextlib.asynccontextmanager
    async def session_lock(self, tenant: str, session_id: str, refuse: bool) -> AsyncIterator[None]:
        """A session-level advisory lock on (tenant, session) for the block. PostgreSQL lets it go
        when the connection ends, so a replica that dies (even SIGKILL) frees its sessions. With
        one replica (not ``shared``) there is no other process to hold anything against."""
        if self._closed:
            raise StorageError("store is closed")
        if self._lock_pool is None:
            if self._replica is not None:
                self._replica.check()  # refused before the provider is called, not after
            yield
            return
        key = session_lock_key(tenant, session_id)
        try:
            connection = await self._lock_pool.acquire(timeout=self._lock_wait)
        except FAILURES as exc:
            raise StorageError(f"cannot take the session lock: {type(exc).__name__}") from exc
        held = cut_off = False
        try:
            cut_off = True  # until the lock query answers, whether the lock is held is unknown
            try:
                if refuse:
                    held = await connection.fetchval("SELECT pg_try_advisory_lock($1)", key)
                else:
                    await connection.execute("SELECT pg_advisory_lock($1)", key)
                    held = True
            except FAILURES as exc:
                raise StorageError(f"cannot take the session lock: {type(exc).__name__}") from exc
            cut_off = False
            if not held:
                raise SessionBusy("another request of this session is in progress on another replica")
            hold = _Hold(connection)
            _HELD.set(_HELD.get() + (hold,))
            try:
                yield
            finally:
                hold.active = False
                _HELD.set(tuple(h for h in _HELD.get() if h is not hold))
        finally:
            await self._let_go(connection, key, held, cut_off)

    async def _let_go(self, connection: asyncpg.Connection, key: int, held: bool, cut_off: bool) -> None:
        """Unlock and return the connection; one whose state is unknown (a lock query cut off by a
        cancel or a broken connection, a failed unlock) is ended instead, which frees its locks."""
        try:
            if cut_off:
                _end(connection)
            elif held:
                await connection.execute("SELECT pg_advisory_unlock($1)", key)
        except Exception as exc:  # the block's outcome stands; ending the connection frees the lock
            log.warning("could not unlock a session lock (%s); its connection is closed instead", type(exc).__name__)
            _end(connection)
        except BaseException:
            _end(connection)
            raise
        finally:
            try:
                await self._lock_pool.release(connection)
            except Exception as exc:  # broken meanwhile (PostgreSQL went away): the block's outcome stands
                log.warning("could not return a session lock's connection (%s); it is closed instead", type(exc).__name__)
                _end(connection)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise StorageError("store is closed")
        try:
            async with self._pool.acquire() as connection:
                yield connection
        except FAILURES as exc:
            log.critical("PostgreSQL operation failed: %s", exc)
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from exc

    # -- writes ------------------------------------------------------------------------------

    def check(self, writes: Sequence[Write]) -> list[Encoded]:
        _check_shape(writes)
        return super().check(writes)

    async def apply(self, writes: Sequence[Write], durable: bool = True) -> None:
        """One transaction, committed before it returns, whether ``durable`` or not."""
        _check_shape(writes)
        if any(hold.lost() for hold in _HELD.get()):
            raise StorageError("the session lock was lost with its connection (PostgreSQL restarted?); nothing was written")
        if self._replica is not None:
            self._replica.check()
        encoded = [_encode(w) for w in writes]  # InvalidWrite, before anything is sent
        async with self._connection() as connection, connection.transaction():
            for tenant, deleted, session, messages, puts, removals in encoded:
                if deleted is not None:
                    for table in ("asp_messages", "asp_records", "asp_sessions"):
                        await connection.execute(f"DELETE FROM {table} WHERE tenant = $1 AND sid = $2", tenant, deleted)
                if session is not None:
                    await connection.execute(
                        "INSERT INTO asp_sessions (tenant, sid, record) VALUES ($1, $2, $3) "
                        "ON CONFLICT (tenant, sid) DO UPDATE SET record = EXCLUDED.record", tenant, *session)
                if messages:
                    await connection.executemany(
                        "INSERT INTO asp_messages (tenant, sid, seq, record) VALUES ($1, $2, $3, $4) "
                        "ON CONFLICT (tenant, sid, seq) DO UPDATE SET record = EXCLUDED.record", messages)
                if puts:
                    await connection.executemany(
                        "INSERT INTO asp_records (tenant, sid, kind, key, record) VALUES ($1, $2, $3, $4, $5) "
                        "ON CONFLICT (tenant, sid, kind, key) DO UPDATE SET record = EXCLUDED.record", puts)
                if removals:
                    await connection.executemany(
                        "DELETE FROM asp_records WHERE tenant = $1 AND sid = $2 AND kind = $3 AND key = $4", removals)

    # -- reads -------------------------------------------------------------------------------

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        sid = session_digest(session_id)
        async with self._connection() as connection:
            raw = await connection.fetchval("SELECT record FROM asp_sessions WHERE tenant = $1 AND sid = $2", tenant, sid)
        if raw is None:
            return None
        found = await self._decode(tenant, [(("asp_sessions", sid, None), raw)], Session.from_dict)
        return found[0] if found else None

    async def get_messages(self, tenant: str, session_id: str) -> list[Message]:
        sid = session_digest(session_id)
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT seq, record FROM asp_messages WHERE tenant = $1 AND sid = $2 ORDER BY seq", tenant, sid)
        return share_repeated_values(await self._decode(tenant, [(("asp_messages", sid, r["seq"]), r["record"]) for r in rows], Message.from_dict))

    async def list_sessions(self, tenant: str) -> list[Session]:
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT sid, record FROM asp_sessions WHERE tenant = $1 ORDER BY sid", tenant)
        return await self._decode(tenant, [(("asp_sessions", r["sid"], None), r["record"]) for r in rows], Session.from_dict)

    async def get_record(self, tenant: str, kind: str, key: str, session_id: str | None = None) -> dict[str, Any] | None:
        sid = session_digest(session_id) if session_id is not None else _TENANT_WIDE
        async with self._connection() as connection:
            raw = await connection.fetchval("SELECT record FROM asp_records WHERE tenant = $1 AND sid = $2 AND kind = $3 AND key = $4",
                                            tenant, sid, kind, key.encode())
        if raw is None:
            return None
        found = await self._decode(tenant, [(("asp_records", sid, (kind, key.encode())), raw)], lambda value: value)
        return found[0] if found else None

    async def scan_records(self, tenant: str, kind: str, session_id: str | None = None, prefix: str = "",
                           after: str = "", limit: int = 0) -> list[tuple[str, dict[str, Any]]]:
        sid = session_digest(session_id) if session_id is not None else _TENANT_WIDE
        raw_prefix, raw_after = prefix.encode(), after.encode()
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT key, record FROM asp_records WHERE tenant = $1 AND sid = $2 AND kind = $3 AND key >= $4 "
                "AND substring(key FROM 1 FOR $5) = $4 AND (length($6::bytea) = 0 OR key > $6::bytea) ORDER BY key LIMIT $7",
                tenant, sid, kind, raw_prefix, len(raw_prefix), raw_after, limit or None)
        result, corrupt = [], []
        for row in rows:
            try:
                result.append((bytes(row["key"]).decode(), codec.decode(row["record"])))
            except (CorruptRecord, UnicodeDecodeError) as exc:
                corrupt.append(((("asp_records", sid, (kind, bytes(row["key"]))), row["record"]), str(exc)))
        if corrupt:
            await self._quarantine(tenant, corrupt)
        return result

    async def quarantined(self, tenant: str | None = None) -> list[Quarantined]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT tenant, key, reason, ts, size FROM asp_quarantine WHERE $1::text IS NULL OR tenant = $1 ORDER BY id", tenant)
        return [Quarantined(r["tenant"], r["key"], r["reason"], r["ts"], r["size"]) for r in rows]

    async def quarantine_messages(self, tenant: str, session_id: str, reasons: dict[int, str]) -> None:
        sid = session_digest(session_id)
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT seq, record FROM asp_messages WHERE tenant = $1 AND sid = $2 AND seq = ANY($3::bigint[])",
                                          tenant, sid, list(reasons))
        await self._quarantine(tenant, [((("asp_messages", sid, r["seq"]), r["record"]), reasons[r["seq"]]) for r in rows])

    async def _decode(self, tenant: str, rows: list[tuple[tuple[str, bytes, Any], bytes]], build: Callable[[dict[str, Any]], T]) -> list[T]:
        """Decode stored rows; the undecodable ones are quarantined instead of failing the read."""
        found, corrupt = [], []
        for where, raw in rows:
            try:
                found.append(build(codec.decode(raw)))
            except (CorruptRecord, TypeError, KeyError) as exc:
                corrupt.append(((where, raw), str(exc)))
        if corrupt:
            await self._quarantine(tenant, corrupt)
        return found

    async def _quarantine(self, tenant: str, rows: list[tuple[tuple[tuple[str, bytes, Any], bytes], str]]) -> None:
        """Move undecodable rows aside (if still unchanged) so reads go on; kept for inspection."""
        async with self._connection() as connection, connection.transaction():
            for ((table, sid, extra), raw), reason in rows:
                if table == "asp_messages":
                    where, args = "seq = $4", [extra]
                elif table == "asp_records":
                    where, args = "kind = $4 AND key = $5", list(extra)
                else:
                    where, args = "TRUE", []
                moved = await connection.execute(f"DELETE FROM {table} WHERE tenant = $1 AND sid = $2 AND record = $3 AND {where}",
                                                 tenant, sid, raw, *args)
                if moved.endswith(" 0"):
                    continue  # already moved or rewritten meanwhile
                key = f"{table}:{bytes(sid).hex()}:{extra!r}"
                log.error("quarantined corrupt record %s of tenant %s: %s", key, tenant, reason)
                await connection.execute("INSERT INTO asp_quarantine (tenant, key, reason, ts, size, raw) VALUES ($1, $2, $3, $4, $5, $6)",
                                         tenant, key, reason, time.time(), len(raw), raw)

    # -- shared counters (fleet mode) ----------------------------------------------------------

    async def add_to_record(self, tenant: str, kind: str, key: str, field: str, amount: int) -> int:
        """Add ``amount`` to the integer ``field`` of a tenant-wide record, atomically across
        replicas (a transaction-scoped advisory lock on the record, which also covers its first
        insert); returns the new value. The record keeps the codec format every store reads."""
        raw_key = key.encode()
        async with self._connection() as connection, connection.transaction():
            # A count, not a turn: its commit need not wait for the WAL flush (a server crash may
            # lose the last fraction of a second of counting, as a batched write would).
            await connection.execute("SET LOCAL synchronous_commit = off")
            await connection.execute("SELECT pg_advisory_xact_lock($1)", job_lock_key(f"counter:{tenant}\0{kind}\0{key}"))
            raw = await connection.fetchval("SELECT record FROM asp_records WHERE tenant = $1 AND sid = $2 AND kind = $3 AND key = $4",
                                            tenant, _TENANT_WIDE, kind, raw_key)
            value: dict[str, Any] = {}
            if raw is not None:
                try:
                    value = codec.decode(raw)
                except CorruptRecord as exc:  # a count cannot be salvaged: start it again, say so
                    log.error("counter %s/%s of tenant %s was unreadable (%s); counting again from 0", kind, key, tenant, exc)
            current = value.get(field) if isinstance(value, dict) else None
            total = (current if isinstance(current, int) and not isinstance(current, bool) else 0) + amount
            await connection.execute(
                "INSERT INTO asp_records (tenant, sid, kind, key, record) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (tenant, sid, kind, key) DO UPDATE SET record = EXCLUDED.record",
                tenant, _TENANT_WIDE, kind, raw_key, codec.encode((value if isinstance(value, dict) else {}) | {field: total}))
        return total

    # -- background jobs and readiness (fleet mode): proxy/storage/pg_claims.py ----------------

    def job_claim(self, job: str) -> AsyncContextManager[bool]:
        """Claim a background job for the fleet for the block (proxy/jobs.py); False: skip it."""
        if self._claims is None:
            raise StorageError("job claims need a store opened with PostgresStore.open")
        return self._claims.claim(job)

    async def readiness(self) -> str | None:
        """Why this replica must not take traffic now (PostgreSQL unreachable, schema not current,
        the replica lock not held)."""
        if self._replica is not None and (problem := self._replica.problem()) is not None:
            return problem
        return await self._claims.readiness(len(MIGRATIONS)) if self._claims is not None else None

    def memory_feed(self) -> postgres_changes.MemoryFeed | None:
        """The fleet's memory change log (replicas: many), or None: one replica needs none."""
        connect = getattr(self, "_connect_listener", None)
        return postgres_changes.MemoryFeed(self._pool, connect) if connect is not None and not self._closed else None

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._claims is not None:
            self._claims.close()  # lets every job claim go
        await self._pool.close()
        if self._lock_pool is not None:
            await self._lock_pool.close()
        if self._replica is not None:
            await self._replica.close()  # lets the replica lock go

    def stats(self) -> dict[str, Any]:
        stats = {"backend": "postgres", "replicas": "many" if self.shared else "one",
                 "pool_size": self._pool.get_size(), "pool_idle": self._pool.get_idle_size()}
        if self._lock_pool is not None:
            stats |= {"session_locks_held": self._lock_pool.get_size() - self._lock_pool.get_idle_size()}
        return stats


def session_lock_key(tenant: str, session_id: str) -> int:
    """The advisory lock key of a session: 64 bits of a hash of (tenant, session), signed as
    bigint. Two sessions that collide only wait for each other; they never share state."""
    digest = hashlib.blake2b(tenant.encode("utf-8", "surrogatepass") + b"\0" + session_id.encode("utf-8", "surrogatepass"),
                             digest_size=8, person=b"asp-session").digest()
    return int.from_bytes(digest, "big", signed=True)


def _check_shape(writes: Sequence[Write]) -> None:
    """InvalidWrite for a write whose shape no transaction can take (checked before encoding)."""
    for write in writes:
        if write.session is not None and write.session.tenant != write.tenant:
            raise InvalidWrite("session belongs to another tenant than the write")
        if write.session is None and write.messages:
            raise InvalidWrite("messages need their session in the same write")
        for record in write.records:
            if len(record.key.encode()) > MAX_RECORD_KEY or not record.kind or "\0" in record.kind:
                raise InvalidWrite(f"invalid record {record.kind!r}/{record.key[:40]!r}: keys are at most {MAX_RECORD_KEY} bytes")


class _Hold:
    """A session lock held by the current task (``_HELD``): lost when its connection ended (the
    server restarted or dropped it), since another replica may hold the session since then."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection, self.active = connection, True

    def lost(self) -> bool:
        try:
            return self.active and self.connection.is_closed()
        except asyncpg.InterfaceError:  # the pool took the connection back: it was dropped
            return True


# The session locks the running task holds, so that apply refuses a write made after one was lost.
_HELD: contextvars.ContextVar[tuple[_Hold, ...]] = contextvars.ContextVar("asp_session_locks", default=())


class _Terse(logging.Filter):
    """While PostgreSQL is down asyncpg's pool logs a traceback at every reconnection attempt:
    one line each is enough (readiness and the requests' 503s say the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and isinstance(record.exc_info[1], FAILURES):
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__})"
            record.exc_info = None
        return True


_TERSE = _Terse()


def _end(connection: asyncpg.Connection) -> None:
    """End a connection whose state is unknown (one the pool already took back after the server
    dropped it is ended already)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        connection.terminate()


def _encode(write: Write) -> tuple[str, bytes | None, tuple[bytes, bytes] | None, list[tuple], list[tuple], list[tuple]]:
    tenant = write.tenant
    deleted = session_digest(write.delete_session) if write.delete_session is not None else None
    session_raw, messages_raw, records_raw = encode(write)
    session, messages = None, []
    if write.session is not None:
        sid = session_digest(write.session.id)
        session = (sid, session_raw)
        messages = [(tenant, sid, m.seq, raw) for m, raw in zip(write.messages, messages_raw)]
    puts, removals = [], []
    for record, raw in zip(write.records, records_raw):
        sid = session_digest(record.session_id) if record.session_id is not None else _TENANT_WIDE
        if raw is None:
            removals.append((tenant, sid, record.kind, record.key.encode()))
        else:
            puts.append((tenant, sid, record.kind, record.key.encode(), raw))
    return tenant, deleted, session, messages, puts, removals


def _safe(exc: BaseException, dsn: str) -> str:
    """An error message without the DSN (it may hold a password)."""
    return str(exc).replace(dsn, "[dsn]")
