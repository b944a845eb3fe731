"""Operator commands on real stores and real processes: backup while clients write, verify,
salvage of a store whose B-tree pages were overwritten, restore, scheduled backups."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import lmdb
import openai
import pytest

from proxy import transcript
from proxy.records import Message, Session
from proxy.storage.kv import messages_prefix, session_digest, split_key
from proxy.storage.lmdb_store import LmdbStore
from proxy.storage.maintenance import list_backups
from tests.fake_upstream import FakeUpstream
from tests.harness import REPO, ProxyProcess, local_config, open_tenant, start_thread, write_config

PAGE = 4096
P_LEAF = 0x02


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _populate(path: Path, sessions: int, messages: int) -> None:
    """Sessions written through the store the proxy uses, as the proxy records them."""

    async def write() -> None:
        store = LmdbStore.open(str(path))
        try:
            for number in range(sessions):
                sid = f"session-{number:03d}"
                session = Session(tenant="local", id=sid, created_at=time.time(), last_active=time.time())
                chain, batch = transcript.ROOT_CHAIN, []
                for seq in range(messages):
                    body = {"role": "user" if seq % 2 == 0 else "assistant", "content": f"{sid} message {seq} " + "x" * 300}
                    chain = transcript.chain_hash(chain, body)
                    batch.append(Message(seq=seq, parent=seq - 1 if seq else None, chain=chain, role=body["role"], body=body, ts=time.time()))
                session.next_seq, session.head = messages, messages - 1
                await store.commit(session, batch)
        finally:
            await store.close()

    asyncio.run(write())


def _leaf_pages(data: bytes) -> dict[int, list[bytes]]:
    """The keys of each leaf page of a compacted LMDB file (every page of it is in use).
    Page header: pgno u64, pad u16, flags u16, lower u16, upper u16; then u16 node offsets;
    a node: lo u16, hi u16, flags u16, key size u16, the key."""
    pages = {}
    for number in range(2, len(data) // PAGE):  # pages 0 and 1 are the meta pages
        at = number * PAGE
        flags, lower = struct.unpack_from("<HH", data, at + 10)
        if flags != P_LEAF:
            continue
        keys = []
        for index in range((lower - 16) // 2):
            offset = struct.unpack_from("<H", data, at + 16 + 2 * index)[0]
            size = struct.unpack_from("<H", data, at + offset + 6)[0]
            keys.append(bytes(data[at + offset + 8: at + offset + 8 + size]))
        pages[number] = keys
    return pages


def _complete_sessions(path: Path, messages: int) -> set[str]:
    """Sessions whose record and every message read back through the proxy's own store."""

    async def read() -> set[str]:
        store = LmdbStore.open(str(path))
        try:
            complete = set()
            for session in await store.list_sessions("local"):
                stored = await store.get_messages("local", session.id)
                if [m.seq for m in stored] == list(range(messages)) and not transcript.broken_chains(stored):
                    complete.add(session.id)
            return complete
        finally:
            await store.close()

    return asyncio.run(read())


def _start_unready(proxy: ProxyProcess) -> None:
    """Start a proxy that is expected never to report ready (ProxyProcess.start waits for it)."""
    log = open(proxy.log_path, "ab")
    proxy.process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(proxy.config_path), "--port", str(proxy.port)],
                                     cwd=REPO, env=proxy.env, stdout=log, stderr=subprocess.STDOUT)
    log.close()


def _wait_until_damage_is_reported(proxy: ProxyProcess, timeout: float = 60, never_ready: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proxy.process.poll() is None, proxy.log()
        try:
            answer = httpx.get(proxy.url + "/ready", timeout=2)
            assert not (never_ready and answer.status_code == 200), "reported ready on a damaged store"
            if answer.status_code == 503 and answer.json()["status"] == "store_damaged":
                return answer.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/ready never reported the damage: {proxy.log()}")


def test_overwritten_pages_flip_ready_and_salvage_recovers_every_intact_session(tmp_path: Path, upstream: FakeUpstream) -> None:
    sessions, messages = 40, 20
    original = tmp_path / "original" / "lmdb"
    _populate(original, sessions, messages)
    # A copy of the store (compacted: every page in it is in use), then a few B-tree leaf pages
    # of messages get their headers overwritten, in different sessions.
    config = write_config(tmp_path / "damaged", {"local": open_tenant(upstream.base_url)})
    data_dir = tmp_path / "damaged" / "data"
    copied = cli("backup", "--config", str(config), "--data-dir", str(original.parent), "--to", str(data_dir / "lmdb"))
    assert copied.returncode == 0, copied.stderr
    data_file = data_dir / "lmdb" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    message_pages = [(number, keys) for number, keys in _leaf_pages(bytes(data)).items() if keys and all(k[:1] == b"m" for k in keys)]
    victims = [message_pages[len(message_pages) * i // 4] for i in (1, 2, 3)]
    hit = {split_key(key)[2][:16] for _, keys in victims for key in keys}
    for number, _ in victims:
        data[number * PAGE: number * PAGE + 16] = b"\xff" * 16
    data_file.write_bytes(bytes(data))
    all_ids = {f"session-{n:03d}" for n in range(sessions)}
    intact = {sid for sid in all_ids if session_digest(sid) not in hit}
    assert 0 < len(intact) < sessions

    # The proxy on the damaged store: not ready, with the reason; requests get a clear 503.
    proxy = ProxyProcess(config)
    _start_unready(proxy)
    try:
        state = _wait_until_damage_is_reported(proxy)
        assert "MDB_CORRUPTED" in state["reason"]
        assert "agent-state-proxy verify" in state["run"]
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Session-ID": "new-one"})
        assert refused.value.status_code == 503 and refused.value.body["code"] == "store_damaged"
        with pytest.raises(openai.APIStatusError) as refused:  # every protocol's route refuses alike
            sdk.responses.create(model="fake-model", input="hi", extra_headers={"X-Session-ID": "new-two"})
        assert refused.value.status_code == 503 and refused.value.body["code"] == "store_damaged"
        anthropic = httpx.post(proxy.url + "/v1/messages", headers={"X-Session-ID": "new-three"},
                               json={"model": "fake-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
        assert anthropic.status_code == 503 and anthropic.json()["type"] == "error"
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert "agent-state-proxy verify" in proxy.log()  # the log says what to run

    checked = cli("verify", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "structural damage: 3 unreadable range(s)" in checked.stdout

    salvaged = tmp_path / "salvaged"
    result = cli("salvage", "--config", str(config), "--to", str(salvaged))
    assert result.returncode == 0, result.stderr
    assert f"sessions with lost messages: {sessions - len(intact)}" in result.stdout
    assert _complete_sessions(salvaged, messages) == intact  # every session whose pages were intact
    assert cli("verify", "--config", str(config), "--store", str(salvaged)).returncode == 0

    restored = cli("restore", "--config", str(config), "--from", str(salvaged))
    assert restored.returncode == 0, restored.stderr
    proxy.start()  # ready again
    try:
        sid = sorted(intact)[0]
        sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "go on"}], extra_headers={"X-Session-ID": sid})
        assert len(upstream.chat_requests[-1]["messages"]) == messages + 1  # the whole history restored
    finally:
        assert proxy.stop() == 0, proxy.log()


def test_verify_finds_changed_and_edited_messages_and_salvage_quarantines_them(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url)
    store = tmp_path / "data" / "lmdb"
    _populate(store, 3, 6)
    assert cli("verify", "--config", str(config)).returncode == 0
    env = lmdb.open(str(store), subdir=True)
    with env.begin(write=True) as txn:
        changed = messages_prefix("local", "session-000") + (2).to_bytes(8, "big")
        txn.put(changed, bytes(txn.get(changed)).replace(b"message 2", b"message 7"))  # the CRC no longer matches
        edited = messages_prefix("local", "session-001") + (3).to_bytes(8, "big")
        raw = bytes(txn.get(edited)).replace(b"message 3", b"message 8")
        txn.put(edited, raw[:1] + zlib.crc32(raw[5:]).to_bytes(4, "big") + raw[5:])  # CRC rewritten: the chain tells
    env.close()
    checked = cli("verify", "--config", str(config))
    assert checked.returncode == 1, checked.stdout
    assert "corrupt records (checksum or decoding): 1" in checked.stdout
    assert "messages whose chain hash does not match (edited): 1" in checked.stdout
    salvaged = tmp_path / "salvaged"
    assert cli("salvage", "--config", str(config), "--to", str(salvaged)).returncode == 0
    after = cli("verify", "--config", str(config), "--store", str(salvaged))
    assert after.returncode == 0, after.stdout
    assert "quarantined records (moved aside earlier, see /admin/recovery): 2" in after.stdout
    assert "sessions with lost messages: 2 (2 messages)" in after.stdout


def _root_page(data: bytes) -> int:
    """The main B-tree's root page, from the newer of the two meta pages (MDB_meta: magic,
    version, address, map size, then two MDB_db of 48 bytes whose last field is the root;
    then the last page and the transaction id)."""
    metas = [struct.unpack_from("<QQQ", data, page * PAGE + 128) for page in (0, 1)]
    root, _, _ = max(metas, key=lambda meta: meta[2])
    return root


def test_a_damaged_root_page_is_caught_before_the_proxy_reports_ready(tmp_path: Path, upstream: FakeUpstream) -> None:
    original = tmp_path / "original" / "lmdb"
    _populate(original, 10, 20)
    config = write_config(tmp_path / "damaged", {"local": open_tenant(upstream.base_url)})
    data_dir = tmp_path / "damaged" / "data"
    assert cli("backup", "--config", str(config), "--data-dir", str(original.parent), "--to", str(data_dir / "lmdb")).returncode == 0
    data_file = data_dir / "lmdb" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    root = _root_page(bytes(data))
    data[root * PAGE: root * PAGE + 16] = b"\xff" * 16  # every read goes through the root
    data_file.write_bytes(bytes(data))
    proxy = ProxyProcess(config)
    _start_unready(proxy)
    try:
        _wait_until_damage_is_reported(proxy, never_ready=True)  # the start-up check caught it
        listed = httpx.get(proxy.url + "/admin/sessions")
        assert listed.status_code == 503 and listed.json()["error"]["code"] == "store_damaged"
    finally:
        assert proxy.stop() == 0, proxy.log()
    checked = cli("verify", "--config", str(config))
    assert checked.returncode == 1 and "result: DAMAGED" in checked.stdout, checked.stdout


def test_backup_while_four_sdk_clients_write_holds_every_turn_acknowledged_before_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url, persistence={"mode": "sync"})
    proxy = ProxyProcess(config).start()
    acknowledged: dict[str, list[tuple[float, str]]] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def client(name: str) -> None:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        history: list[dict] = []
        turns = acknowledged.setdefault(name, [])
        try:
            while not stop.is_set():
                question = f"{name} turn {len(turns)}"
                history.append({"role": "user", "content": question})
                answer = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": name})
                history.append({"role": "assistant", "content": answer.choices[0].message.content})
                turns.append((time.time(), question))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(f"writer-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(len(t) for t in acknowledged.values()) < 40 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        started = time.time()
        made = cli("backup", "--config", str(config), "--to", str(tmp_path / "snapshot"))
        during = sum(len(t) for t in acknowledged.values())
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        assert proxy.stop() == 0, proxy.log()
    assert not failures, failures
    assert made.returncode == 0, made.stderr
    assert during > 40  # the clients kept writing while the copy was taken
    checked = cli("verify", "--config", str(config), "--store", str(tmp_path / "snapshot"))
    assert checked.returncode == 0, checked.stdout

    async def held() -> dict[str, set[str]]:
        store = LmdbStore.open(str(tmp_path / "snapshot"))
        try:
            return {name: {m.body["content"] for m in await store.get_messages("local", name)} for name in acknowledged}
        finally:
            await store.close()

    in_backup = asyncio.run(held())
    for name, turns in acknowledged.items():
        before = [question for at, question in turns if at < started]
        assert before and set(before) <= in_backup[name], name


def test_scheduled_backups_keep_the_newest(tmp_path: Path, upstream: FakeUpstream) -> None:
    backups = tmp_path / "backups"
    config = write_config(tmp_path, {"local": open_tenant(upstream.base_url, persistence={"mode": "sync"})},
                          storage={"data_dir": str(tmp_path / "data"), "backup": {"dir": str(backups), "every_minutes": 0.01, "keep": 2}})
    seen: set[str] = set()
    with start_thread(config) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "keep me"}], extra_headers={"X-Session-ID": "kept"})
        deadline = time.monotonic() + 60
        while len(seen) < 4 and time.monotonic() < deadline:
            current = list_backups(backups)
            # Older ones are deleted once a new one is complete (for a moment, keep + 1 exist).
            assert len(current) <= 3
            seen.update(p.name for p in current)
            time.sleep(0.05)
    assert len(seen) >= 4, seen
    newest = list_backups(backups)[-1]
    checked = cli("verify", "--config", str(config), "--store", str(newest))
    assert checked.returncode == 0 and "sessions: 1, messages: 2" in checked.stdout, checked.stdout


def test_backup_settings_are_validated(tmp_path: Path, upstream: FakeUpstream) -> None:
    from proxy.config import ConfigError, load_config

    config = write_config(tmp_path, {"local": open_tenant(upstream.base_url)}, storage={"backup": {"dir": "b", "every_minutes": 0}})
    with pytest.raises(ConfigError, match=r"proxy.yaml: storage.backup.every_minutes: must be a number between"):
        load_config(config)
    config = write_config(tmp_path, {"local": open_tenant(upstream.base_url)}, storage={"backup": {"dir": "b", "every": 5}})
    with pytest.raises(ConfigError, match=r"storage.backup.every: unknown key"):
        load_config(config)


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url)
    proxy = ProxyProcess(config).start()
    try:
        with pytest.raises(RuntimeError, match="another agent-state-proxy process is serving"):
            ProxyProcess(config).start()
        refused = cli("restore", "--config", str(config), "--from", str(tmp_path / "data" / "lmdb"))
        assert refused.returncode == 2 and "serving" in refused.stderr
    finally:
        assert proxy.stop() == 0, proxy.log()

