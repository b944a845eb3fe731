"""The memories API: add, list, search, get, delete; validation errors in OpenAI's shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, keyed_tenant, write_config
from tests.memory_helpers import SLOW_OK, running

AUTH = {"Authorization": "Bearer alpha-key"}


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    tenants = {"alpha": keyed_tenant(upstream.base_url, "alpha-key", memory={"latency_budget_ms": SLOW_OK})}
    with running(write_config(tmp_path, tenants)) as started:
        yield started


def _error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "'content' is required"),
    ({"content": "   "}, "'content' is required"),
    ({"content": 42}, "'content' is required"),
    ({"content": "x" * 32_001}, "at most 32000 characters"),
    ({"content": "x", "type": "episodic"}, "recorded from conversations"),
    ({"content": "x", "type": "opinion"}, "'type' must be 'semantic' or 'procedural'"),
    ({"content": "x", "user_id": ""}, "'user_id' must be a string"),
    ({"content": "x", "user_id": 7}, "'user_id' must be a string"),
    ({"content": "x", "metadata": "tag"}, "'metadata' must be an object"),
    ({"content": "x", "colour": "blue"}, "unrecognized request argument supplied: 'colour'"),
])
def test_add_rejects_invalid_bodies_with_clear_messages(proxy: ProxyThread, body: dict, fragment: str) -> None:
    error = _error(httpx.post(f"{proxy.url}/v1/memories", headers=AUTH, json=body), 400, fragment)
    assert error["type"] == "invalid_request_error"


def test_add_rejects_non_objects_and_bad_json(proxy: ProxyThread) -> None:
    _error(httpx.post(f"{proxy.url}/v1/memories", headers=AUTH, json=["content"]), 400, "JSON object")
    _error(httpx.post(f"{proxy.url}/v1/memories", headers=AUTH | {"Content-Type": "application/json"}, content=b"{nope"), 400, "not valid JSON")
    _error(httpx.post(f"{proxy.url}/v1/memories", headers=AUTH, json={"content": "x", "session_id": "missing"}), 404, "no session 'missing'")


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "'query' is required"),
    ({"query": "x", "scope": "galaxy"}, "'scope' must be one of user, session, tenant"),
    ({"query": "x", "scope": "user"}, "scope 'user' needs 'user_id'"),
    ({"query": "x", "scope": "session"}, "scope 'session' needs 'session_id'"),
    ({"query": "x", "user_id": "u", "top_k": 0}, "'top_k' must be an integer between 1 and 100"),
    ({"query": "x", "user_id": "u", "top_k": True}, "'top_k' must be an integer"),
    ({"query": "x", "user_id": "u", "types": ["dreams"]}, "'types' must be a non-empty list"),
    ({"query": "x", "user_id": "u", "min_score": 2}, "'min_score' must be a number between -1 and 1"),
])
def test_search_rejects_invalid_bodies(proxy: ProxyThread, body: dict, fragment: str) -> None:
    _error(httpx.post(f"{proxy.url}/v1/memories/search", headers=AUTH, json=body), 400, fragment)


def test_list_and_unknown_ids(proxy: ProxyThread) -> None:
    _error(httpx.get(f"{proxy.url}/v1/memories?limit=0", headers=AUTH), 400, "'limit' must be an integer between 1 and 1000")
    _error(httpx.get(f"{proxy.url}/v1/memories?limit=many", headers=AUTH), 400, "'limit'")
    _error(httpx.get(f"{proxy.url}/v1/memories?type=dream", headers=AUTH), 400, "'type' must be one of")
    _error(httpx.get(f"{proxy.url}/v1/memories?after=mem_nope", headers=AUTH), 400, "'after'")
    error = _error(httpx.get(f"{proxy.url}/v1/memories/mem_nope", headers=AUTH), 404, "no memory 'mem_nope'")
    assert error["code"] == "memory_not_found"
    _error(httpx.delete(f"{proxy.url}/v1/memories/mem_nope", headers=AUTH), 404, "no memory 'mem_nope'")


def test_every_endpoint_needs_the_tenant_key(proxy: ProxyThread) -> None:
    for method, path in (("POST", "/v1/memories"), ("GET", "/v1/memories"), ("POST", "/v1/memories/search"),
                         ("GET", "/v1/memories/mem_x"), ("DELETE", "/v1/memories/mem_x"), ("GET", "/admin/memory")):
        response = httpx.request(method, proxy.url + path, json={"content": "x"} if method == "POST" else None,
                                 headers={"Authorization": "Bearer wrong"})
        _error(response, 401)


def test_add_list_search_get_delete(proxy: ProxyThread) -> None:
    added = [
        httpx.post(f"{proxy.url}/v1/memories", headers=AUTH, json={"content": text, "user_id": "alice", "metadata": {"source": "crm"}}).json()
        for text in ("Alice's favourite editor is Helix.", "Alice lives in Porto.", "Alice's cat is called Miso.")
    ]
    rule = httpx.post(f"{proxy.url}/v1/memories", headers=AUTH, json={"content": "Reply in French.", "type": "procedural"}).json()
    assert [m["type"] for m in added] == ["semantic"] * 3 and rule["type"] == "procedural"
    assert added[0]["metadata"] == {"source": "crm"} and added[0]["indexed"] is True

    page = httpx.get(f"{proxy.url}/v1/memories?limit=2", headers=AUTH).json()
    assert [m["id"] for m in page["data"]] == [added[0]["id"], added[1]["id"]] and page["has_more"] is True
    rest = httpx.get(f"{proxy.url}/v1/memories?limit=2&after={page['last_id']}", headers=AUTH).json()
    assert [m["id"] for m in rest["data"]] == [added[2]["id"], rule["id"]] and rest["has_more"] is False
    only_rules = httpx.get(f"{proxy.url}/v1/memories?type=procedural", headers=AUTH).json()["data"]
    assert [m["id"] for m in only_rules] == [rule["id"]]
    alices = httpx.get(f"{proxy.url}/v1/memories?user_id=alice", headers=AUTH).json()["data"]
    assert len(alices) == 3

    found = httpx.post(f"{proxy.url}/v1/memories/search", headers=AUTH, json={"query": "What is the name of Alice's cat?", "user_id": "alice", "top_k": 1}).json()
    assert [m["id"] for m in found["data"]] == [added[2]["id"]]
    assert found["data"][0]["similarity"] > 0.3 and found["degraded"] is None
    assert httpx.get(f"{proxy.url}/v1/memories/{added[2]['id']}", headers=AUTH).json()["content"] == "Alice's cat is called Miso."

    deleted = httpx.delete(f"{proxy.url}/v1/memories/{added[2]['id']}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json() == {"id": added[2]["id"], "object": "memory", "deleted": True}
    assert httpx.get(f"{proxy.url}/v1/memories/{added[2]['id']}", headers=AUTH).status_code == 404
    stored = {kind: {key for key, _ in proxy.call(proxy.app[keys.STORE].scan_records("alpha", kind))} for kind in ("memory", "memory_vector")}
    assert stored["memory"] == stored["memory_vector"] == {added[0]["id"], added[1]["id"], rule["id"]}  # the vector went too
    found = httpx.post(f"{proxy.url}/v1/memories/search", headers=AUTH, json={"query": "What is the name of Alice's cat?", "user_id": "alice"}).json()
    assert added[2]["id"] not in [m["id"] for m in found["data"]]
    stats = httpx.get(f"{proxy.url}/admin/memory", headers=AUTH).json()
    assert stats["tenant"] == "alpha" and stats["index"]["semantic"] == 2 and stats["index"]["procedural"] == 1


def test_a_memory_added_while_the_embedder_loads_is_embedded_once_it_is_up(tmp_path, upstream, monkeypatch) -> None:
    """Accepted before the embedder was ready, it must still be found by meaning (no shared words)."""
    import threading

    import proxy.memory.embedder_slots as service_module
    from tests.harness import open_tenant, start_thread, write_config

    gate = threading.Event()
    real = service_module.local_model

    def slow_local_model(alias):
        assert gate.wait(60), "the test never released the embedder"
        return real(alias)

    monkeypatch.setattr(service_module, "local_model", slow_local_model)
    with start_thread(write_config(tmp_path, {"local": open_tenant(upstream.base_url)})) as proxy:
        deadline = time.monotonic() + 30
        while (added := httpx.post(proxy.url + "/v1/memories", json={"content": "The user's dog is named Biscuit and loves the beach"})).status_code == 503:
            assert time.monotonic() < deadline, "memory never became ready"
            time.sleep(0.05)
        assert added.status_code == 200, added.text
        stats = httpx.get(proxy.url + "/admin/memory").json()
        assert not stats["embedder"]["ready"] and stats["index"]["unembedded"] == 1  # the case that was lost
        gate.set()
        deadline = time.monotonic() + 30
        while True:
            found = httpx.post(proxy.url + "/v1/memories/search", json={"query": "puppy at the seaside", "scope": "tenant", "min_score": 0.2})
            assert found.status_code == 200, found.text
            if [m["id"] for m in found.json()["data"]] == [added.json()["id"]]:
                break
            assert time.monotonic() < deadline, f"never found by meaning: {found.json()}"
            time.sleep(0.2)
        assert httpx.get(proxy.url + "/admin/memory").json()["index"]["unembedded"] == 0
