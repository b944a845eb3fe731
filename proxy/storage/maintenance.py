"""Operator maintenance of the LMDB store: online backups, verification, salvage and restore.

These run in the `agent-state-proxy backup | verify | salvage | restore` commands (proxy/cli.py)
and, for scheduled backups, in the serving process. What each failure looks like and what to
run is in docs/PERSISTENCE.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb

from proxy import checkpoints, codec, transcript
from proxy.codec import CorruptRecord
from proxy.records import Message, Session
from proxy.storage.base import StorageError
from proxy.storage.kv import quarantine_entry, split_key
from proxy.storage.lmdb_store import DAMAGE_ERRORS

log = logging.getLogger("agent_state_proxy.maintenance")

BACKUP_PREFIX = "backup-"
_LOCK_FILE = "serve.lock"
_COPY_BATCH = 5_000  # records per write transaction of a salvage
_MAX_KEY = 511  # LMDB's largest key: probes are never longer


def store_path(data_dir: Path) -> Path:
    """Where the serving process keeps its LMDB environment inside the data directory."""
    return data_dir / "lmdb"


# -- one serving process per data directory --------------------------------------------------

@contextlib.contextmanager
def serving_lock(data_dir: Path) -> Iterator[None]:
    """Held by `serve` while it runs: a second server, `restore` or an in-place repair on the
    same directory is refused (the serving process caches what it wrote, so it must be the
    only writer). The kernel drops the lock when the process dies, kill -9 included."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / _LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(f"another agent-state-proxy process is serving {data_dir}") from None
        yield
    finally:
        handle.close()


def is_served(data_dir: Path) -> bool:
    try:
        with serving_lock(data_dir):
            return False
    except StorageError:
        return True


def open_env(path: Path, readonly: bool = True) -> lmdb.Environment:
    """Open an existing environment for a tool; read-only opens run beside a serving process."""
    if not (path / "data.mdb").is_file():
        raise StorageError(f"no LMDB store at {path} (expected {path / 'data.mdb'})")
    try:
        return lmdb.open(str(path), readonly=readonly, lock=True, max_dbs=0, subdir=True, readahead=False)
    except lmdb.Error as exc:
        raise StorageError(f"cannot open LMDB at {path}: {exc}") from exc


# -- backups -----------------------------------------------------------------------------------

def backup(source: Path, target: Path) -> dict[str, Any]:
    """A consistent, compacted copy of the store at ``source`` into the new directory ``target``,
    taken while a proxy may be serving and writing (one read transaction: the snapshot is the
    store as of the moment the copy began)."""
    if target.exists() and any(target.iterdir()):
        raise StorageError(f"backup target {target} is not empty")
    env = open_env(source)
    try:
        target.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            env.copy(str(target), compact=True)
        except lmdb.Error as exc:
            raise StorageError(f"backup copy failed: {exc}") from exc
        return {"path": str(target), "bytes": (target / "data.mdb").stat().st_size, "started": started,
                "seconds": round(time.time() - started, 3)}
    finally:
        env.close()


def take_backup(copy: Callable[[str], None], directory: Path, keep: int, now: float | None = None) -> Path:
    """One scheduled backup: ``copy(path)`` into ``directory/backup-<UTC time>`` (written under
    a temporary name, renamed when complete), then only the newest ``keep`` backups stay."""
    at = time.time() if now is None else now
    # Milliseconds too: two backups within one second must not collide (short test intervals).
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f"{int(at * 1000) % 1000:03d}Z"
    final = directory / f"{BACKUP_PREFIX}{stamp}"
    partial = directory / f".partial-{BACKUP_PREFIX}{stamp}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        copy(str(partial))
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for old in list_backups(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_backups(directory: Path) -> list[Path]:
    """Complete backups in ``directory``, oldest first (their names sort by time)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(BACKUP_PREFIX))


# -- reading a damaged store -------------------------------------------------------------------

@dataclass
class DamagedRange:
    """Keys that could not be read: everything after ``after`` and before ``resume``."""

    after: bytes | None  # the last key read before the damage (None: from the start)
    resume: bytes | None  # the first key read after it (None: to the end)
    error: str

    def describe(self) -> str:
        return f"after {describe_key(self.after)} up to {describe_key(self.resume)}: {self.error}"


def readable_items(env: lmdb.Environment, damaged: list[DamagedRange]) -> Iterator[tuple[bytes, bytes]]:
    """Every record LMDB can still read, in key order. A damaged page ends its read transaction
    (LMDB invalidates it); reading goes on from the first key past the damage, found by probing
    the key space (``_resume_after``), and the skipped range is appended to ``damaged``."""
    last: bytes | None = None
    probe: bytes | None = None
    while True:
        try:
            with env.begin(buffers=False) as txn:
                cursor = txn.cursor()
                found = _seek(cursor, probe) if probe is not None else cursor.first()
                while found:
                    key, value = cursor.item()
                    if last is None or key > last:
                        last = key
                        yield key, value
                    found = cursor.next()
                return
        except DAMAGE_ERRORS as exc:
            # Past the last key read; if nothing was read since the previous resume point (it
            # read in the probe but not now), past that point too, so the scan always advances.
            stuck = probe is not None and bool(damaged) and damaged[-1].after == last
            probe = _resume_after(env, probe if stuck else last)
            damaged.append(DamagedRange(last, _first_key_at(env, probe) if probe is not None else None, str(exc)))
            if probe is None:
                return


def _resume_after(env: lmdb.Environment, last: bytes | None) -> bytes | None:
    """The smallest probe key past ``last`` from which a record can be read, or None when
    nothing after the damage is readable. Keys are taken as big-endian numbers: an exponential
    search finds some readable probe, then a binary search narrows it to the damaged page's
    end, so no readable record after the damage is skipped."""
    width = min(_MAX_KEY, len(last) + 1 if last is not None else 16)
    base = int.from_bytes((last or b"").ljust(width, b"\0"), "big") + (1 if last is not None else 0)
    top = 1 << (8 * width)
    failed, step = base - 1, 1
    while True:
        candidate = base + step - 1
        if candidate >= top:
            return None  # nothing readable after the damage
        if _readable(env, candidate, width):
            break
        failed, step = candidate, step * 2
    good = candidate
    while good - failed > 1:
        middle = (good + failed) // 2
        if _readable(env, middle, width):
            good = middle
        else:
            failed = middle
    return _back_to_page_start(env, _probe(good, width), last)


def _probe(number: int, width: int) -> bytes:
    return number.to_bytes(width, "big")


def _back_to_page_start(env: lmdb.Environment, probe: bytes, last: bytes | None) -> bytes:
    """The first readable key the binary search may have stepped over: a key shorter than the
    probes (``key + b"\\0"`` is its own probe) sits just before the one found. Steps back while
    the keys before it read and are past ``last``."""
    found = probe
    try:
        with env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(probe):
                return probe
            found = cursor.key()
            while cursor.prev():
                key = cursor.key()
                cursor.value()
                if last is not None and key <= last:
                    break
                found = key
            return found
    except DAMAGE_ERRORS:  # the damaged page before it: ``found`` is the first readable key
        return found


def _seek(cursor: lmdb.Cursor, probe: bytes) -> bool:
    return cursor.set_range(probe) if probe else cursor.first()


def _readable(env: lmdb.Environment, number: int, width: int) -> bool:
    """Whether the first record at or after this probe reads (True when there is none)."""
    try:
        with env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if _seek(cursor, _probe(number, width)):
                cursor.item()
            return True
    except DAMAGE_ERRORS:
        return False


def _first_key_at(env: lmdb.Environment, probe: bytes) -> bytes | None:
    with env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        return cursor.key() if _seek(cursor, probe) else None


def describe_key(key: bytes | None) -> str:
    if key is None:
        return "(the edge of the store)"
    try:
        kind, tenant, rest = split_key(key)
    except (ValueError, UnicodeDecodeError):
        return key[:40].hex()
    if kind == "m" and len(rest) == 24:
        return f"message {int.from_bytes(rest[16:], 'big')} of session {rest[:16].hex()} (tenant {tenant})"
    if kind == "s" and len(rest) == 16:
        return f"session record {rest.hex()} (tenant {tenant})"
    if kind == "x" and len(rest) > 16:
        record_kind = rest[16:].split(b"\0")[0].decode(errors="replace")
        return f"{record_kind} record of session {rest[:16].hex()} (tenant {tenant})"
    return f"{kind} record of tenant {tenant}"


# -- verification ------------------------------------------------------------------------------

@dataclass
class _SessionFacts:
    seqs: set[int] = field(default_factory=set)
    record: Session | None = None


@dataclass
class Report:
    """What a scan found. ``damaged`` decides verify's exit status."""

    records: int = 0
    kinds: Counter = field(default_factory=Counter)
    damaged_ranges: list[DamagedRange] = field(default_factory=list)
    corrupt: list[tuple[bytes, str]] = field(default_factory=list)  # key, why (checksum, decoding)
    broken_chains: list[tuple[bytes, str]] = field(default_factory=list)  # message keys edited on disk
    bad_checkpoints: list[tuple[bytes, str]] = field(default_factory=list)
    sessions: int = 0
    messages: int = 0
    missing_messages: dict[str, int] = field(default_factory=dict)  # session → messages not stored
    missing_session_records: list[str] = field(default_factory=list)  # messages without their session
    quarantined: int = 0  # records the proxy already moved aside (known losses)

    @property
    def damaged(self) -> bool:
        return bool(self.damaged_ranges or self.corrupt or self.broken_chains or self.bad_checkpoints)

    def summary(self) -> str:
        lines = [
            f"records: {self.records} ({', '.join(f'{KIND_NAMES.get(k, k)} {n}' for k, n in sorted(self.kinds.items()))})",
            f"sessions: {self.sessions}, messages: {self.messages}",
            f"structural damage: {len(self.damaged_ranges)} unreadable range(s)",
            *(f"  unreadable: {r.describe()}" for r in self.damaged_ranges),
            f"corrupt records (checksum or decoding): {len(self.corrupt)}",
            *(f"  {describe_key(k)}: {why}" for k, why in self.corrupt[:20]),
            f"messages whose chain hash does not match (edited): {len(self.broken_chains)}",
            *(f"  {describe_key(k)}: {why}" for k, why in self.broken_chains[:20]),
            f"invalid checkpoints: {len(self.bad_checkpoints)}",
            *(f"  {describe_key(k)}: {why}" for k, why in self.bad_checkpoints[:20]),
            f"sessions with lost messages: {len(self.missing_messages)} ({sum(self.missing_messages.values())} messages)",
            *(f"  session {s}: {n} message(s) not stored" for s, n in list(self.missing_messages.items())[:20]),
            f"sessions with messages but no session record: {len(self.missing_session_records)}",
            f"quarantined records (moved aside earlier, see /admin/recovery): {self.quarantined}",
            "result: " + ("DAMAGED" if self.damaged else "ok"),
        ]
        return "\n".join(lines)


KIND_NAMES = {"s": "session", "m": "message", "x": "session-scoped", "g": "tenant-wide", "q": "quarantined"}


class _Census:
    """Checks records as they stream by in key order (a session's messages are contiguous)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.sessions: dict[tuple[str, bytes], _SessionFacts] = {}
        self._group: tuple[str, bytes] | None = None
        self._messages: list[tuple[bytes, Message]] = []

    def check(self, key: bytes, raw: bytes) -> str | None:
        """Account for one record; returns why it cannot be trusted, or None."""
        report = self.report
        report.records += 1
        try:
            kind, tenant, rest = split_key(key)
        except (ValueError, UnicodeDecodeError):
            report.corrupt.append((key, "key has no tenant"))
            return "key has no tenant"
        report.kinds[kind] += 1
        if kind == "q":
            report.quarantined += 1
            return None
        try:
            value = codec.decode(raw)
            if kind == "m":
                message = Message.from_dict(value)
            elif kind == "s":
                session = Session.from_dict(value)
        except (CorruptRecord, TypeError, KeyError) as exc:
            report.corrupt.append((key, str(exc)))
            return str(exc)
        if kind == "m" and len(rest) == 24:
            group = (tenant, rest[:16])
            if group != self._group:
                self._end_group()
                self._group = group
            self._messages.append((key, message))
        elif kind == "s" and len(rest) == 16:
            self._end_group()
            self.sessions.setdefault((tenant, rest), _SessionFacts()).record = session
        elif kind == "x" and rest[16:].startswith(checkpoints.KIND.encode() + b"\0"):
            problem = checkpoints.problem(value)
            if problem is not None:
                report.bad_checkpoints.append((key, problem))
                return problem
        return None

    def pending_broken(self) -> dict[bytes, str]:
        """The current session's messages whose chains break, by key (salvage moves them aside)."""
        broken = transcript.broken_chains([m for _, m in self._messages])
        return {key: broken[m.seq] for key, m in self._messages if m.seq in broken}

    def _end_group(self) -> None:
        if self._group is None:
            return
        for key, why in self.pending_broken().items():
            self.report.broken_chains.append((key, why))
        facts = self.sessions.setdefault(self._group, _SessionFacts())
        facts.seqs.update(m.seq for _, m in self._messages)
        self._group, self._messages = None, []

    def finish(self) -> Report:
        self._end_group()
        report = self.report
        for (tenant, digest), facts in self.sessions.items():
            if facts.record is None:
                report.missing_session_records.append(f"{digest.hex()} (tenant {tenant})")
                report.messages += len(facts.seqs)
                continue
            report.sessions += 1
            report.messages += len(facts.seqs)
            lost = sum(1 for seq in range(facts.record.next_seq) if seq not in facts.seqs)
            if lost:
                report.missing_messages[f"{facts.record.id} (tenant {tenant})"] = lost
        return report


def verify(path: Path) -> Report:
    """Scan every record of the store at ``path``: structure (every page on the way to every
    record), checksums and decoding, chain hashes, checkpoints, and what is already lost.
    Opens read-only: it runs beside a serving proxy too (on a snapshot)."""
    env = open_env(path)
    try:
        report = Report()
        census = _Census(report)
        for key, raw in readable_items(env, report.damaged_ranges):
            census.check(key, raw)
        return census.finish()
    finally:
        env.close()


# -- salvage -----------------------------------------------------------------------------------

def salvage(source: Path, target: Path) -> Report:
    """Copy every readable record of a damaged store into a fresh one at ``target``. Records that
    no longer decode, or whose chain hash broke, are kept in the new store's quarantine (as the
    proxy would have moved them); unreadable ranges are skipped. The report says what was lost."""
    if target.exists() and any(target.iterdir()):
        raise StorageError(f"salvage target {target} is not empty")
    target.mkdir(parents=True, exist_ok=True)
    source_env = open_env(source)
    size = (source / "data.mdb").stat().st_size
    target_env = lmdb.open(str(target), map_size=max(size * 2, 64 << 20), max_dbs=0, subdir=True, sync=False)
    try:
        report = Report()
        census = _Census(report)
        now, batch = time.time(), []
        held: list[tuple[bytes, bytes]] = []  # the current session's messages, until its chains are checked

        def flush_held() -> None:
            broken = census.pending_broken()
            for key, raw in held:
                if key in broken:
                    batch.append(quarantine_entry(split_key(key)[1], key, raw, broken[key], now))
                else:
                    batch.append((key, raw))
            held.clear()

        for key, raw in readable_items(source_env, report.damaged_ranges):
            if key[:1] != b"m" and held:
                flush_held()
            elif held and key[:-8] != held[-1][0][:-8]:
                flush_held()
            problem = census.check(key, raw)
            if problem is not None:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    batch.append(quarantine_entry(split_key(key)[1], key, raw, problem, now))
            elif key[:1] == b"m":
                held.append((key, raw))
            else:
                batch.append((key, raw))
            if len(batch) >= _COPY_BATCH:
                _put_all(target_env, batch)
        flush_held()
        _put_all(target_env, batch)
        target_env.sync(True)
        return census.finish()
    finally:
        target_env.close()
        source_env.close()


def _put_all(env: lmdb.Environment, batch: list[tuple[bytes, bytes]]) -> None:
    with env.begin(write=True) as txn:
        for key, value in batch:
            txn.put(key, value)
    batch.clear()


# -- restore -----------------------------------------------------------------------------------

def restore(backup_dir: Path, data_dir: Path) -> Path:
    """Put a backup (or a salvaged store) in place of the data directory's store; the current
    store is kept beside it as ``lmdb.replaced-<time>``, and the long-term memory indexes are set
    aside too (they are rebuilt from the restored store). Refused while a proxy serves."""
    if not (backup_dir / "data.mdb").is_file():
        raise StorageError(f"{backup_dir} holds no LMDB store (no data.mdb)")
    with serving_lock(data_dir):
        current = store_path(data_dir)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = data_dir / f"lmdb.replaced-{stamp}"
        staging = data_dir / f".restoring-{stamp}"
        staging.mkdir()
        shutil.copy2(backup_dir / "data.mdb", staging / "data.mdb")
        os.sync()
        if current.exists():
            current.rename(kept)
        staging.rename(current)
        index = data_dir / "index"
        if index.exists():
            index.rename(data_dir / f"index.replaced-{stamp}")
        return kept
