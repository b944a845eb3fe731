"""Silent corruption is caught: checksummed records, chain hashes checked on a session's first
load, and a lost message leaves a marked gap instead of cutting the history short."""

from __future__ import annotations

import zlib
from pathlib import Path

import httpx
import lmdb
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import codec, transcript
from proxy.codec import CorruptRecord
from proxy.records import Message
from proxy.records import Session
from proxy.storage.kv import messages_prefix, session_key
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, local_config, start_thread


def test_records_written_before_checksums_still_decode() -> None:
    record = {"role": "user", "content": "from an older version"}
    assert codec.decode(b"\x01" + orjson.dumps(record)) == record
    assert codec.encode(record)[0] == 2


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=40), min_size=1), st.data())
def test_any_changed_byte_of_a_record_is_detected(record: dict, data: st.DataObject) -> None:
    raw = bytearray(codec.encode(record))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptRecord):
        codec.decode(bytes(raw))


def test_a_store_written_before_checksums_is_served_and_verifies(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Existing data (format 1, no checksums) keeps working after the upgrade."""
    config = local_config(tmp_path, upstream.base_url)
    (tmp_path / "data" / "lmdb").mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "data" / "lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        for message in _linear(4):
            txn.put(messages_prefix("local", "old") + message.seq.to_bytes(8, "big"), b"\x01" + orjson.dumps(message))
        session = Session(tenant="local", id="old", created_at=1.0, last_active=9e9, head=3, next_seq=4, turns=2)
        txn.put(session_key("local", "old"), b"\x01" + orjson.dumps(session))
    env.close()
    with start_thread(config) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "and now?"}], extra_headers={"X-Session-ID": "old"})
        assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == ["m0", "m1", "m2", "m3", "and now?"]
        assert httpx.get(f"{proxy.url}/admin/recovery").json()["quarantined"] == []
    from proxy.storage.maintenance import verify

    report = verify(tmp_path / "data" / "lmdb")
    assert not report.damaged and report.messages == 6, report.summary()


def _message(seq: int, parent: int | None, parent_chain: str, body: dict, branch: int = 0) -> Message:
    return Message(seq=seq, parent=parent, chain=transcript.chain_hash(parent_chain, body), role=body["role"], body=body, ts=0.0, branch=branch)


def _linear(count: int) -> list[Message]:
    messages, chain = [], transcript.ROOT_CHAIN
    for seq in range(count):
        body = {"role": "user" if seq % 2 == 0 else "assistant", "content": f"m{seq}"}
        messages.append(_message(seq, seq - 1 if seq else None, chain, body))
        chain = messages[-1].chain
    return messages


def test_an_edited_message_breaks_only_its_own_chain() -> None:
    messages = _linear(6)
    assert transcript.broken_chains(messages) == {}
    messages[2].body = {"role": "user", "content": "m2 but edited"}
    assert list(transcript.broken_chains(messages)) == [2]
    messages = _linear(6)
    messages[2].chain = "00" * 16  # the chain itself edited: its children still check out
    assert list(transcript.broken_chains(messages)) == [2]


def test_the_active_path_crosses_a_lost_message_and_reports_the_gap() -> None:
    messages = [m for m in _linear(8) if m.seq not in (3, 4)]
    path, gaps = transcript.walk(messages, 7)
    assert [m.seq for m in path] == [0, 1, 2, 5, 6, 7]
    assert [g.to_dict() for g in gaps] == [{"after": 2, "before": 5, "missing": [3, 4]}]


def _message_key(seq: int) -> bytes:
    return messages_prefix("local", "kept") + seq.to_bytes(8, "big")


def _edit_stored_message(data_dir: Path, seq: int, rewrite_checksum: bool, old: bytes = b"turn 1") -> None:
    """What a disk or a person might do with the proxy stopped: one letter of a message changes
    and the record stays valid JSON (with ``rewrite_checksum``, its checksum is made to match)."""
    env = lmdb.open(str(data_dir / "lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        raw = bytes(txn.get(_message_key(seq)))
        assert old in raw
        edited = raw.replace(old, old[:-1] + b"7")
        if rewrite_checksum:
            edited = edited[:1] + zlib.crc32(edited[5:]).to_bytes(4, "big") + edited[5:]
        txn.put(_message_key(seq), edited)
    env.close()


@pytest.mark.parametrize("rewrite_checksum", [False, True], ids=["byte-changed", "checksum-rewritten"])
def test_an_edited_message_is_quarantined_and_the_rest_of_the_history_still_restored(
        tmp_path: Path, upstream: FakeUpstream, rewrite_checksum: bool) -> None:
    config = local_config(tmp_path, upstream.base_url, persistence={"mode": "sync"})
    proxy = ProxyProcess(config).start()
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    headers = {"X-Session-ID": "kept"}
    try:
        for turn in range(4):  # seqs 0..7: user "turn N" at 2N, the answer at 2N + 1
            sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"turn {turn}"}], extra_headers=headers)
        assert proxy.stop() == 0, proxy.log()
        _edit_stored_message(tmp_path / "data", 2, rewrite_checksum)  # the user's "turn 1"
        proxy.start()
        # An agent that restarted sends only its newest message.
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "where were we?"}], extra_headers=headers)
        sent = [m["content"] for m in upstream.chat_requests[-1]["messages"]]
        assert sent == ["turn 0", "echo: turn 0", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3", "echo: turn 3", "where were we?"]
        assert raw.headers["X-History-Restored"] == "7"
        assert raw.headers["X-History-Gap"] == "2"
        recovery = httpx.get(f"{proxy.url}/admin/recovery").json()
        [moved] = recovery["quarantined"]
        assert moved["key"] == _message_key(2).hex()
        assert ("chain hash mismatch" if rewrite_checksum else "checksum mismatch") in moved["reason"]
        view = httpx.get(f"{proxy.url}/admin/sessions/kept").json()
        assert view["gaps"] == [{"after": 1, "before": 3, "missing": [2]}]
        assert [m["seq"] for m in view["messages"] if m.get("gap_before")] == [3]
    finally:
        assert proxy.stop() == 0, proxy.log()


def test_a_lost_head_message_is_repaired_from_the_checkpoint_and_the_rest_restored(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url, persistence={"mode": "sync", "checkpoint_every_messages": 2})
    proxy = ProxyProcess(config).start()
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    headers = {"X-Session-ID": "kept"}
    try:
        for turn in range(4):
            sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"turn {turn}"}], extra_headers=headers)
        assert proxy.stop() == 0, proxy.log()
        _edit_stored_message(tmp_path / "data", 7, rewrite_checksum=False, old=b"echo: turn 3")  # the newest answer: the head
        proxy.start()
        sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "where were we?"}], extra_headers=headers)
        sent = [m["content"] for m in upstream.chat_requests[-1]["messages"]]
        assert sent == ["turn 0", "echo: turn 0", "turn 1", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3", "where were we?"]
        recovery = httpx.get(f"{proxy.url}/admin/recovery").json()
        assert [r["problem"] for r in recovery["repaired_sessions"]] == ["head message missing"]
        assert "checksum mismatch" in recovery["quarantined"][0]["reason"]
    finally:
        assert proxy.stop() == 0, proxy.log()
