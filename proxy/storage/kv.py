"""Store implemented over an ordered key-value transaction; LMDB and the in-memory backend share it.

Key layout (every key starts with a kind byte and the tenant, so no scan crosses tenants):
  s T 0 D            session record         (D = 16-byte digest of the session id)
  m T 0 D seq        message, seq as 8 bytes big-endian, so a prefix scan is in seq order
  x T 0 D kind 0 key session-scoped record, erased with the session
  g T 0 kind 0 key   tenant-wide record
  q T 0 <orig key>   quarantined bytes of a record that failed to decode
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from abc import abstractmethod
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

from proxy import codec
from proxy.codec import CorruptRecord
from proxy.records import Message, Session, share_repeated_values
from proxy.storage.base import Encoded, InvalidWrite, Quarantined, Store, Write, encode

log = logging.getLogger("agent_state_proxy.storage")
T = TypeVar("T")
MAX_RECORD_KEY = 256


class Txn(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys with ``prefix``, in order, from ``start`` (inclusive) if given."""
        ...


def _tenant(tenant: str) -> bytes:
    raw = tenant.encode()
    if not raw or b"\0" in raw or len(raw) > 64:
        raise ValueError(f"invalid tenant name {tenant!r}")
    return raw + b"\0"


def session_digest(session_id: str) -> bytes:
    return hashlib.blake2b(session_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def session_key(tenant: str, session_id: str) -> bytes:
    return b"s" + _tenant(tenant) + session_digest(session_id)


def messages_prefix(tenant: str, session_id: str) -> bytes:
    return b"m" + _tenant(tenant) + session_digest(session_id)


def record_prefix(tenant: str, kind: str, session_id: str | None) -> bytes:
    if not kind or "\0" in kind:
        raise ValueError(f"invalid record kind {kind!r}")
    if session_id is None:
        return b"g" + _tenant(tenant) + kind.encode() + b"\0"
    return b"x" + _tenant(tenant) + session_digest(session_id) + kind.encode() + b"\0"


def record_key(tenant: str, kind: str, key: str, session_id: str | None) -> bytes:
    raw = key.encode()
    if len(raw) > MAX_RECORD_KEY:
        raise ValueError(f"record key longer than {MAX_RECORD_KEY} bytes: hash it first")
    return record_prefix(tenant, kind, session_id) + raw


def quarantine_entry(tenant: str, key: bytes, raw: bytes, reason: str, now: float) -> tuple[bytes, bytes]:
    """Where and how a record moved aside is kept: its bytes, why, and when."""
    info = {"tenant": tenant, "key": key.hex(), "reason": reason, "ts": now, "size": len(raw), "raw": raw.hex()}
    return b"q" + _tenant(tenant) + key, codec.encode(info)


def split_key(key: bytes) -> tuple[str, str, bytes]:
    """A stored key's kind letter, tenant and the rest (``ValueError`` when it has no tenant)."""
    end = key.index(b"\0", 1)
    return chr(key[0]), key[1:end].decode(), key[end + 1:]


class KVStore(Store):
    """Everything but the transactions; subclasses provide ``_read`` and ``_write``."""

    @abstractmethod
    async def _read(self, fn: Callable[[Txn], T]) -> T: ...

    @abstractmethod
    async def _write(self, fn: Callable[[Txn], T]) -> T: ...

    # -- writes ------------------------------------------------------------------------------

    def check(self, writes: Sequence[Write]) -> list[Encoded]:
        encoded = super().check(writes)
        for write in writes:
            try:
                _tenant(write.tenant)
                for record in write.records:
                    record_key(write.tenant, record.kind, record.key, record.session_id)
                _check_session(write)
            except ValueError as exc:
                raise InvalidWrite(str(exc)) from None
        return encoded

    async def apply(self, writes: Sequence[Write], durable: bool = True) -> None:
        """One transaction, committed before it returns, whether ``durable`` or not."""
        try:
            encoded = [_encode_write(w) for w in writes]  # encode outside the writer thread
        except ValueError as exc:  # codec.Unstorable included
            raise InvalidWrite(str(exc)) from None

        def run(txn: Txn) -> None:
            for delete, puts in encoded:
                for prefix in delete:
                    for key, _ in list(txn.scan(prefix)):
                        txn.delete(key)
                    if prefix.startswith(b"s"):
                        txn.delete(prefix)
                for key, value in puts:
                    if value is None:
                        txn.delete(key)
                    else:
                        txn.put(key, value)

        await self._write(run)

    # -- reads -------------------------------------------------------------------------------

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        key = session_key(tenant, session_id)
        raw = await self._read(lambda txn: txn.get(key))
        if raw is None:
            return None
        try:
            return Session.from_dict(codec.decode(raw))
        except (CorruptRecord, TypeError, KeyError) as exc:
            await self._quarantine(tenant, [(key, raw, str(exc))])
            return None

    async def get_messages(self, tenant: str, session_id: str) -> list[Message]:
        prefix = messages_prefix(tenant, session_id)
        rows = await self._read(lambda txn: list(txn.scan(prefix)))
        return share_repeated_values(await self._decode_rows(tenant, rows, Message.from_dict))

    async def list_sessions(self, tenant: str) -> list[Session]:
        prefix = b"s" + _tenant(tenant)
        rows = await self._read(lambda txn: list(txn.scan(prefix)))
        return await self._decode_rows(tenant, rows, Session.from_dict)

    async def _decode_rows(self, tenant: str, rows: list[tuple[bytes, bytes]], build: Callable[[dict[str, Any]], T]) -> list[T]:
        """Decode stored rows; the undecodable ones are quarantined instead of failing the read."""
        found, corrupt = [], []
        for key, raw in rows:
            try:
                found.append(build(codec.decode(raw)))
            except (CorruptRecord, TypeError, KeyError) as exc:
                corrupt.append((key, raw, str(exc)))
        if corrupt:
            await self._quarantine(tenant, corrupt)
        return found

    async def get_record(self, tenant: str, kind: str, key: str, session_id: str | None = None) -> dict[str, Any] | None:
        full = record_key(tenant, kind, key, session_id)
        raw = await self._read(lambda txn: txn.get(full))
        if raw is None:
            return None
        try:
            return codec.decode(raw)
        except CorruptRecord as exc:
            await self._quarantine(tenant, [(full, raw, str(exc))])
            return None

    async def scan_records(self, tenant: str, kind: str, session_id: str | None = None, prefix: str = "",
                           after: str = "", limit: int = 0) -> list[tuple[str, dict[str, Any]]]:
        base = record_prefix(tenant, kind, session_id)
        start = base + after.encode() + b"\0" if after else None  # the first key past ``after``
        rows = await self._read(lambda txn: list(itertools.islice(txn.scan(base + prefix.encode(), start), limit or None)))
        result, corrupt = [], []
        for key, raw in rows:
            try:
                result.append((key[len(base):].decode(), codec.decode(raw)))
            except (CorruptRecord, UnicodeDecodeError) as exc:
                corrupt.append((key, raw, str(exc)))
        if corrupt:
            await self._quarantine(tenant, corrupt)
        return result

    async def quarantined(self, tenant: str | None = None) -> list[Quarantined]:
        prefix = b"q" + (_tenant(tenant) if tenant else b"")
        rows = await self._read(lambda txn: list(txn.scan(prefix)))
        found = []
        for key, raw in rows:
            try:
                info = codec.decode(raw)
            except CorruptRecord:
                continue
            found.append(Quarantined(info["tenant"], info["key"], info["reason"], info["ts"], info["size"]))
        return found

    async def quarantine_messages(self, tenant: str, session_id: str, reasons: dict[int, str]) -> None:
        prefix = messages_prefix(tenant, session_id)
        keys = {prefix + seq.to_bytes(8, "big"): reason for seq, reason in reasons.items()}
        rows = await self._read(lambda txn: [(key, txn.get(key)) for key in keys])
        await self._quarantine(tenant, [(key, raw, keys[key]) for key, raw in rows if raw is not None])

    async def _quarantine(self, tenant: str, rows: list[tuple[bytes, bytes, str]]) -> None:
        """Move undecodable records aside so reads go on; they stay for inspection."""

        def run(txn: Txn) -> None:
            for key, raw, reason in rows:
                if txn.get(key) != raw:
                    continue  # already moved or rewritten meanwhile
                txn.put(*quarantine_entry(tenant, key, raw, reason, time.time()))
                txn.delete(key)

        for key, _, reason in rows:
            log.error("quarantined corrupt record %s of tenant %s: %s", key.hex(), tenant, reason)
        await self._write(run)


def _encode_write(write: Write) -> tuple[list[bytes], list[tuple[bytes, bytes | None]]]:
    deletes: list[bytes] = []
    puts: list[tuple[bytes, bytes | None]] = []
    tenant = write.tenant
    _check_session(write)
    if write.delete_session is not None:
        sid = write.delete_session
        deletes += [messages_prefix(tenant, sid), b"x" + _tenant(tenant) + session_digest(sid), session_key(tenant, sid)]
    session, messages, records = encode(write)
    if write.session is not None:
        puts.append((session_key(tenant, write.session.id), session))
        prefix = messages_prefix(tenant, write.session.id)
        for message, raw in zip(write.messages, messages):
            puts.append((prefix + message.seq.to_bytes(8, "big"), raw))
    for record, raw in zip(write.records, records):
        puts.append((record_key(tenant, record.kind, record.key, record.session_id), raw))
    return deletes, puts


def _check_session(write: Write) -> None:
    if write.session is not None and write.session.tenant != write.tenant:
        raise ValueError("session belongs to another tenant than the write")
    if write.session is None and write.messages:
        raise ValueError("messages need their session in the same write")
