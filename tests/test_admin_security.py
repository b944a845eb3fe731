"""Admin writes under the session lock, idempotency fingerprints, tenant-scoped admin views."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, start_thread, write_config
from tests.inflight_helpers import in_flight, upstream_held, wait_for


def ask(proxy: ProxyThread, session: str, text: str, key: str = "x", **headers: str):
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    return sdk.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": text}], extra_headers={"X-Session-ID": session, **headers})


def test_fork_onto_a_session_being_created_is_refused_and_the_request_keeps_it(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    ask(proxy, "source", "one")
    ask(proxy, "source", "two")
    with upstream_held(upstream):
        request = in_flight(upstream, ask, proxy, "target", "mine")
        forked = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": "target"}, timeout=30)
    request.join(30)
    assert forked.status_code == 409 and forked.json()["error"]["code"] == "session_exists"
    target = httpx.get(f"{proxy.url}/admin/sessions/target").json()
    assert [m["body"]["content"] for m in target["messages"]] == ["mine", "echo: mine"]
    assert "forked_from" not in target["session"]["extra"]
    # Onto an id that exists (the target now, or the source itself): 409, nothing changes.
    for new_id in ("target", "source"):
        again = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": new_id})
        assert again.status_code == 409 and again.json()["error"]["code"] == "session_exists"
    assert len(httpx.get(f"{proxy.url}/admin/sessions/target").json()["messages"]) == 2
    fresh = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": "fresh"})
    assert fresh.status_code == 201 and fresh.json()["messages"] == 4


def test_rollback_waits_for_the_request_in_flight_and_keeps_its_turn_consistent(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    ask(proxy, "busy", "one")
    upstream.latency = 1.0
    before = len(upstream.chat_requests)
    in_flight = threading.Thread(target=ask, args=(proxy, "busy", "two"))
    in_flight.start()
    try:
        wait_for(lambda: len(upstream.chat_requests) > before)
        report = httpx.post(f"{proxy.url}/admin/sessions/busy/rollback", json={"turns": 1}, timeout=30)
    finally:
        in_flight.join(30)
    upstream.latency = 0
    # The rollback ran after the in-flight turn was recorded, so it reverted that turn.
    assert report.status_code == 200 and report.json()["reverted"] == [2, 3]
    messages = httpx.get(f"{proxy.url}/admin/sessions/busy").json()["messages"]
    assert [(m["body"]["content"], m["active"]) for m in messages] == [
        ("one", True), ("echo: one", True), ("two", False), ("echo: two", False)]


def test_idempotency_key_with_a_different_body_is_a_422_not_the_old_answer(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    url, headers = f"{proxy.url}/v1/chat/completions", {"X-Session-ID": "pay", "Idempotency-Key": "order-7"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "pay 10 EUR"}], "temperature": 0}
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 200
    # The same request, keys in another order: a retry, answered from the record.
    reordered = {"temperature": 0, "messages": body["messages"], "model": "fake-model"}
    retry = httpx.post(url, json=reordered, headers=headers)
    assert retry.headers["idempotent-replayed"] == "true" and retry.json()["id"] == first.json()["id"]
    changed = httpx.post(url, json=body | {"messages": [{"role": "user", "content": "pay 1000 EUR"}]}, headers=headers)
    assert changed.status_code == 422
    error = changed.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["type"] == "invalid_request_error"
    assert len(upstream.chat_requests) == 1  # neither the retry nor the changed request reached the model
    messages = httpx.get(f"{proxy.url}/admin/sessions/pay").json()["messages"]
    assert [m["body"]["content"] for m in messages] == ["pay 10 EUR", "echo: pay 10 EUR"]


OPERATOR_KEY = "operator-key-789"


@pytest.fixture
def operated(tmp_path: Path, upstream: FakeUpstream):
    """alpha and beta (keyed tenants) plus an operator key; sync persistence so LMDB holds every turn."""
    from proxy.config import hash_key
    from tests.harness import keyed_tenant

    tenants = {name: keyed_tenant(upstream.base_url, key, persistence={"mode": "sync", "checkpoint_every_messages": 2})
               for name, key in (("alpha", ALPHA_KEY), ("beta", BETA_KEY))}
    path = write_config(tmp_path, tenants, server={"operator_key_sha256": [hash_key(OPERATOR_KEY)]})
    with start_thread(path) as running:
        yield running


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def break_session_record(proxy: ProxyThread, tenant: str, session: str) -> None:
    """Overwrite a session's LMDB record with garbage: the next load repairs (and quarantines) it."""
    from proxy.server import keys
    from proxy.storage.kv import session_key

    store = proxy.app[keys.STORE]
    proxy.call(store.inner._write(lambda txn: txn.put(session_key(tenant, session), b"\x01{broken")))
    store._stored_sessions.clear()


def test_recovery_is_scoped_to_the_tenant_and_global_figures_need_the_operator_key(operated: ProxyThread, tmp_path: Path) -> None:
    for key in (ALPHA_KEY, BETA_KEY):
        ask(operated, "hurt", "one", key=key)
        ask(operated, "hurt", "two", key=key)
    break_session_record(operated, "beta", "hurt")
    ask(operated, "hurt", "three", key=BETA_KEY)  # beta's session is repaired on load

    alpha = httpx.get(f"{operated.url}/admin/recovery", headers=bearer(ALPHA_KEY))
    assert alpha.status_code == 200
    assert alpha.json() == {"quarantined": [], "repaired_sessions": []}
    assert str(tmp_path) not in alpha.text  # no store path for a tenant

    beta = httpx.get(f"{operated.url}/admin/recovery", headers=bearer(BETA_KEY)).json()
    assert "store" not in beta and str(tmp_path) not in str(beta)
    assert [r["session"] for r in beta["repaired_sessions"]] == ["hurt"] and all(r["tenant"] == "beta" for r in beta["repaired_sessions"])
    assert beta["quarantined"] and {q["tenant"] for q in beta["quarantined"]} == {"beta"}

    operator = httpx.get(f"{operated.url}/admin/recovery", headers=bearer(OPERATOR_KEY)).json()
    assert operator["store"]["path"].startswith(str(tmp_path)) and operator["store"]["entries"] > 0
    assert [r["tenant"] for r in operator["repaired_sessions"]] == ["beta"]
    # A tenant key cannot pass for the operator, nor a wrong key for anyone.
    assert httpx.get(f"{operated.url}/admin/recovery", headers=bearer("not-a-key")).status_code == 401


def test_the_operator_key_acts_for_the_tenant_named_in_x_tenant(operated: ProxyThread) -> None:
    ask(operated, "beta-only", "hello", key=BETA_KEY)
    listed = httpx.get(f"{operated.url}/admin/sessions", headers=bearer(OPERATOR_KEY, **{"X-Tenant": "beta"}))
    assert [s["id"] for s in listed.json()["data"]] == ["beta-only"]
    viewed = httpx.get(f"{operated.url}/admin/sessions/beta-only", headers=bearer(OPERATOR_KEY, **{"X-Tenant": "alpha"}))
    assert viewed.status_code == 404  # alpha has no such session
    missing = httpx.get(f"{operated.url}/admin/sessions", headers=bearer(OPERATOR_KEY))
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "tenant_required"
    unknown = httpx.get(f"{operated.url}/admin/sessions", headers=bearer(OPERATOR_KEY, **{"X-Tenant": "gamma"}))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "tenant_not_found"
    # X-Tenant means nothing with a tenant key: alpha still sees only alpha.
    assert httpx.get(f"{operated.url}/admin/sessions", headers=bearer(ALPHA_KEY, **{"X-Tenant": "beta"})).json()["data"] == []


@pytest.mark.parametrize(("value", "rule"), [
    (["ABC"], "must be a list of lowercase sha256 hex digests"),
    ("0" * 64, "must be a list of lowercase sha256 hex digests"),
    ("tenant", "a key of tenant .alpha. cannot also be an operator key"),
])
def test_operator_keys_are_validated(tmp_path: Path, value, rule: str) -> None:
    from proxy.config import ConfigError, hash_key, load_config
    from tests.harness import keyed_tenant

    value = [hash_key(ALPHA_KEY)] if value == "tenant" else value
    path = write_config(tmp_path, {"alpha": keyed_tenant("http://127.0.0.1:9/v1", ALPHA_KEY)}, server={"operator_key_sha256": value})
    with pytest.raises(ConfigError, match=rf"proxy\.yaml: server\.operator_key_sha256: {rule}"):
        load_config(path)


def test_session_listing_is_paged_newest_first_and_filters_by_user(proxy: ProxyThread) -> None:
    names = [f"s{i}" for i in range(7)]
    for i, name in enumerate(names):
        ask(proxy, name, "hello", **({"X-User-ID": "alice"} if i % 2 == 0 else {}))
    ask(proxy, "s1", "again")  # s1 is now the most recently active
    expected = ["s1", "s6", "s5", "s4", "s3", "s2", "s0"]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"after": cursor} if cursor else {})
        page = httpx.get(f"{proxy.url}/admin/sessions", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 3
        seen += [s["id"] for s in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == expected and pages == 3
    alice = httpx.get(f"{proxy.url}/admin/sessions", params={"user_id": "alice"}).json()
    assert [s["id"] for s in alice["data"]] == ["s6", "s4", "s2", "s0"] and alice["has_more"] is False
    default = httpx.get(f"{proxy.url}/admin/sessions").json()
    assert [s["id"] for s in default["data"]] == expected and default["has_more"] is False
    for params, code in (({"limit": 0}, "invalid_limit"), ({"limit": 1001}, "invalid_limit"), ({"limit": "x"}, "invalid_limit"),
                         ({"after": "not-a-cursor"}, "invalid_cursor"), ({"after": "WzEsMl0"}, "invalid_cursor")):
        bad = httpx.get(f"{proxy.url}/admin/sessions", params=params)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == code


def test_no_admin_route_reaches_another_tenants_session(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    url = keyed_proxy.url
    alpha_sdk = openai.OpenAI(base_url=keyed_proxy.base_url, api_key=ALPHA_KEY, max_retries=0)
    for text in ("alpha one", "alpha two"):
        alpha_sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}],
                                          extra_headers={"X-Session-ID": "a1", "Idempotency-Key": "k-" + text})
    before = httpx.get(f"{url}/admin/sessions/a1", headers=bearer(ALPHA_KEY)).json()
    checkpoint = httpx.get(f"{url}/admin/sessions/a1/checkpoints", headers=bearer(ALPHA_KEY)).json()["data"]
    beta = bearer(BETA_KEY)
    attempts = [
        httpx.get(f"{url}/admin/sessions/a1", headers=beta),
        httpx.get(f"{url}/admin/sessions/a1/checkpoints", headers=beta),
        httpx.post(f"{url}/admin/sessions/a1/rollback", json={"turns": 1}, headers=beta),
        httpx.post(f"{url}/admin/sessions/a1/fork", json={"session_id": "stolen"}, headers=beta),
        httpx.delete(f"{url}/admin/sessions/a1", headers=beta),
    ]
    if checkpoint:
        attempts.append(httpx.post(f"{url}/admin/sessions/a1/rollback", json={"checkpoint": checkpoint[0]["id"]}, headers=beta))
    for response in attempts:
        assert response.status_code == 404, response.request.url
        assert response.json()["error"]["code"] == "session_not_found"
        assert "alpha" not in response.text
    assert httpx.get(f"{url}/admin/sessions", headers=beta).json()["data"] == []
    assert httpx.get(f"{url}/admin/sessions/stolen", headers=beta).status_code == 404

    # beta reusing alpha's session id and Idempotency-Key gets its own answer, never alpha's.
    calls = len(upstream.chat_requests)
    beta_sdk = openai.OpenAI(base_url=keyed_proxy.base_url, api_key=BETA_KEY, max_retries=0)
    raw = beta_sdk.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "alpha one"}],
        extra_headers={"X-Session-ID": "a1", "Idempotency-Key": "k-alpha one"})
    assert raw.headers.get("idempotent-replayed") is None and len(upstream.chat_requests) == calls + 1
    assert len(upstream.chat_requests[-1]["messages"]) == 1  # none of alpha's history went with it
    # beta forking its own session onto the id alpha uses makes beta's session, alpha's is untouched.
    assert httpx.post(f"{url}/admin/sessions/a1/fork", json={"session_id": "a1-copy"}, headers=beta).status_code == 201
    after = httpx.get(f"{url}/admin/sessions/a1", headers=bearer(ALPHA_KEY)).json()
    assert after["messages"] == before["messages"] and after["session"]["next_seq"] == before["session"]["next_seq"]
    assert httpx.get(f"{url}/admin/sessions/a1-copy", headers=bearer(ALPHA_KEY)).status_code == 404
