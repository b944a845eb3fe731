"""The session inspector (/ui) over HTTP: login by tenant key, tenant scoping, the sessions list
(search, newest first, pages), what a session page shows, escaping of recorded content, and what
long-term memory learned (extraction runs, supersession, injected memories, a user's page)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from proxy.server.ui import PAGE_SIZE
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, keyed_tenant, open_tenant, start_thread, write_config
from tests.memory_helpers import SLOW_OK, Extractor, chat, drain, injected_ids, known_ids, quiet, running

SCRIPT = "<script>alert('owned')</script>"
HOSTILE_ID = '"><img src=x onerror=alert(1)>'


def record(base_url: str, key: str, session: str, questions: list[str]) -> list[dict]:
    """A conversation through the OpenAI SDK, the client resending its history each turn."""
    sdk = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    history: list[dict] = [{"role": "system", "content": "You are terse."}]
    for question in questions:
        history.append({"role": "user", "content": question})
        reply = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": session})
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return history


def log_in(proxy: ProxyThread, key: str) -> dict[str, str]:
    """POST the key to the login form; the Cookie header the browser would send afterwards."""
    response = httpx.post(f"{proxy.url}/ui/login", data={"key": key})
    assert response.status_code == 303 and response.headers["location"] == "/ui"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    name, token = cookie.split(";")[0].split("=", 1)
    assert key not in cookie and len(token) >= 32
    return {"Cookie": f"{name}={token}"}


@pytest.fixture
def two_tenants(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    tenants = {"alpha": keyed_tenant(upstream.base_url, ALPHA_KEY, memory={"enabled": False}),
               "beta": keyed_tenant(upstream.base_url, BETA_KEY, memory={"enabled": False})}
    with start_thread(write_config(tmp_path, tenants)) as started:
        yield started


def test_a_keyed_tenant_logs_in_and_sees_only_its_own_sessions(two_tenants: ProxyThread) -> None:
    record(two_tenants.base_url, ALPHA_KEY, "alpha-plans", ["hello from alpha"])
    record(two_tenants.base_url, BETA_KEY, "beta-secrets", ["hello from beta"])

    anonymous = httpx.get(f"{two_tenants.url}/ui")
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"
    wrong = httpx.post(f"{two_tenants.url}/ui/login", data={"key": "not-a-key"})
    assert wrong.status_code == 401 and "not a proxy key" in wrong.text and "set-cookie" not in wrong.headers

    alpha = log_in(two_tenants, ALPHA_KEY)
    listing = httpx.get(f"{two_tenants.url}/ui", headers=alpha)
    assert listing.status_code == 200 and "alpha-plans" in listing.text and "beta-secrets" not in listing.text
    assert "script-src" not in listing.headers["content-security-policy"]  # no script may run at all
    assert httpx.get(f"{two_tenants.url}/ui/sessions/beta-secrets", headers=alpha).status_code == 404
    page = httpx.get(f"{two_tenants.url}/ui/sessions/alpha-plans", headers=alpha)
    assert page.status_code == 200 and "hello from alpha" in page.text
    assert "Long-term memory is off for this tenant." in page.text  # the learned-memories section says why it is empty

    assert httpx.post(f"{two_tenants.url}/ui/logout", headers=alpha).status_code == 303
    assert httpx.get(f"{two_tenants.url}/ui", headers=alpha).status_code == 303  # the token is revoked server-side


def test_the_open_local_tenant_needs_no_key_from_loopback(proxy: ProxyThread) -> None:
    record(proxy.base_url, "whatever", "local-session", ["hi"])
    listing = httpx.get(f"{proxy.url}/ui")
    assert listing.status_code == 200 and "local-session" in listing.text


def test_sessions_are_listed_newest_first_searched_and_paginated(proxy: ProxyThread) -> None:
    total = PAGE_SIZE + 3
    for number in range(total):
        record(proxy.base_url, "x", f"job-{number:02d}", [f"question {number}"])
    record(proxy.base_url, "x", "other-thing", ["unrelated"])

    first = httpx.get(f"{proxy.url}/ui").text
    ids = re.findall(r'href="/ui/sessions/([^"]+)"', first)
    assert len(ids) == PAGE_SIZE and ids[:3] == ["other-thing", f"job-{total - 1:02d}", f"job-{total - 2:02d}"]
    second = re.findall(r'href="/ui/sessions/([^"]+)"', httpx.get(f"{proxy.url}/ui", params={"page": 2}).text)
    assert second == [f"job-{n:02d}" for n in range(3, -1, -1)]
    found = httpx.get(f"{proxy.url}/ui", params={"q": "JOB-1"}).text
    assert re.findall(r'href="/ui/sessions/([^"]+)"', found) == [f"job-{n}" for n in range(19, 9, -1)]
    assert "No sessions match" in httpx.get(f"{proxy.url}/ui", params={"q": "nothing-like-this"}).text


def test_recorded_content_and_session_ids_are_shown_as_text_never_markup(proxy: ProxyThread) -> None:
    record(proxy.base_url, "x", HOSTILE_ID, [SCRIPT, "second <b>bold</b> & more"])
    listing = httpx.get(f"{proxy.url}/ui").text
    assert "<img src=x" not in listing and "&lt;img src=x onerror=alert(1)&gt;" in listing
    page = httpx.get(f"{proxy.url}/ui/sessions/{httpx.URL(path=HOSTILE_ID).raw_path.decode()}")
    assert page.status_code == 200
    assert SCRIPT not in page.text and "<img src=x" not in page.text and "<b>bold</b>" not in page.text
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page.text
    assert "second &lt;b&gt;bold&lt;/b&gt; &amp; more" in page.text


def test_a_session_page_shows_branches_rollbacks_forks_tokens_and_bodies(proxy: ProxyThread) -> None:
    history = record(proxy.base_url, "x", "story", ["first question", "We decided to ship on Friday.", "third question"])
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    # The user edits the third question: the transcript branches and the new branch is active.
    sdk.chat.completions.create(model="fake-model", messages=history[:-2] + [{"role": "user", "content": "edited third question"}],
                                extra_headers={"X-Session-ID": "story"})
    assert httpx.post(f"{proxy.url}/admin/sessions/story/rollback", json={"turns": 1}).status_code == 200
    assert httpx.post(f"{proxy.url}/admin/sessions/story/fork", json={"session_id": "story-copy"}).status_code == 201

    page = httpx.get(f"{proxy.url}/ui/sessions/story").text
    assert "first question" in page and "edited third question" in page and "third question" in page
    assert 'class="badge branch-marker">branch 1<' in page
    assert re.search(r'<li id="m\d+" class="msg role-user inactive">', page)  # the original third question, now off the path
    assert "rolled back" in page and "Rollbacks" in page
    assert 'href="/ui/sessions/story-copy"' in page  # the fork is linked
    assert 'class="badge tag">decision<' in page and "Pinned messages" in page
    assert '<svg id="token-chart"' in page and page.count('class="bar-cached"') >= 2  # resent prefixes were cached
    assert "the forwarded request itself is not recorded" in page and "&quot;role&quot;: &quot;user&quot;" in page
    fork = httpx.get(f"{proxy.url}/ui/sessions/story-copy").text
    assert 'href="/ui/sessions/story"' in fork and "forked from" in fork


def test_a_missing_session_is_a_404_page(proxy: ProxyThread) -> None:
    response = httpx.get(f"{proxy.url}/ui/sessions/never-recorded")
    assert response.status_code == 404 and "No session" in response.text and response.headers["content-type"].startswith("text/html")


def test_the_chart_and_summaries_show_what_compaction_left_out(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, context={"max_context_tokens": 600, "reserve_completion_tokens": 100}, memory={"enabled": False})
    with start_thread(write_config(tmp_path, {"local": tenant})) as started:
        record(started.base_url, "x", "long", [f"Turn {n}: " + "a long detail about the project plan " * 12 for n in range(12)])
        deadline = time.monotonic() + 30
        while "summary of messages #" not in (page := httpx.get(f"{started.url}/ui/sessions/long").text):
            assert time.monotonic() < deadline, "no summary shown (they are made in the background)"
            time.sleep(0.1)
    # A summary names the messages it covers, as ranges of seqs.
    assert re.search(r"segment summary of messages #\d+–#\d+ \(\d+ messages: #\d+", page)
    rows = re.findall(r'<tr><td>#(\d+)</td><td class="num">([\d,]+)</td><td class="num">([\d,]+)</td>', page)
    numbers = [(int(full.replace(",", "")), int(sent.replace(",", ""))) for _, full, sent in rows]
    assert len(numbers) == 12 and numbers[0][0] == numbers[0][1]  # the first request was sent whole
    assert any(full > sent for full, sent in numbers[1:])  # later ones were compacted: full history above what was sent
    assert page.count('class="bar-full"') == 12


def test_a_long_session_shows_its_newest_requests_unless_all_are_asked_for(proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.server import ui

    monkeypatch.setattr(ui, "TIMELINE_REQUESTS", 3)
    record(proxy.base_url, "x", "long", [f"question number {n}" for n in range(5)])
    page = httpx.get(f"{proxy.url}/ui/sessions/long").text
    assert "The newest 3 of 5 requests" in page and 'href="/ui/sessions/long?all=1"' in page
    assert "question number 4" in page and "question number 2" in page
    assert ">question number 1<" not in page and "You are terse." not in page  # older requests' messages left out
    whole = httpx.get(f"{proxy.url}/ui/sessions/long", params={"all": "1"}).text
    assert ">question number 0<" in whole and "You are terse." in whole and "The newest" not in whole


def _get(proxy: ProxyThread, path: str, cookie: dict[str, str]) -> str:
    response = httpx.get(f"{proxy.url}{path}", headers=cookie)
    assert response.status_code == 200, (path, response.status_code)
    return response.text


def test_pages_show_what_was_learned_from_which_turns_what_it_superseded_and_what_was_injected(tmp_path: Path, upstream: FakeUpstream) -> None:
    memory = {"latency_budget_ms": SLOW_OK, "top_k": 5, "extractor_model": "extractor"}
    tenants = {"alpha": keyed_tenant(upstream.base_url, ALPHA_KEY, memory=memory),
               "beta": keyed_tenant(upstream.base_url, BETA_KEY, memory=memory)}
    extractor = Extractor(upstream)
    with running(write_config(tmp_path, tenants)) as proxy:
        quiet(proxy)
        # Real extraction runs, the fake upstream answering as the extractor model.
        extractor.replies.append({"memories": [{"kind": "fact", "text": f"The user lives in Lisbon. {SCRIPT}",
                                                "subject": "user.home_city", "seqs": [0]}]})
        chat(proxy, "I live in Lisbon.", user="ada", session="s1", key=ALPHA_KEY)
        drain(proxy)
        extractor.replies.append(lambda body: {"memories": [{"kind": "fact", "text": "The user lives in Porto now.",
                                                             "replaces": known_ids(body)[0], "seqs": [0]}]})
        chat(proxy, "I have moved to Porto since.", user="ada", session="s2", key=ALPHA_KEY)
        drain(proxy)
        extractor.replies.append({"memories": [{"kind": "preference", "text": "Beta's ada drinks green tea.", "seqs": [0]}]})
        chat(proxy, "I drink green tea.", user="ada", session="b1", key=BETA_KEY)  # another tenant's user of the same name
        drain(proxy)
        _, headers = chat(proxy, "Which city does the user live in these days?", user="ada", session="q", key=ALPHA_KEY)
        drain(proxy)

        bearer = {"Authorization": f"Bearer {ALPHA_KEY}"}
        user = httpx.get(f"{proxy.url}/admin/memory/extractions", params={"user_id": "ada"}, headers=bearer).json()
        (new,) = user["memories"]
        (old,) = user["superseded"]
        assert new["content"] == "The user lives in Porto now." and old["superseded_by"] == new["id"]
        assert user["chains"] == [[new["id"], old["id"]]]
        assert new["id"] in injected_ids(headers)

        alpha = log_in(proxy, ALPHA_KEY)
        # The session whose run superseded: the run, its turns, the new memory live, the old one marked.
        s2 = _get(proxy, "/ui/sessions/s2", alpha)
        assert '<tr class="run">' in s2 and '<a class="turn-link" href="#m0">#0</a>' in s2 and 'id="m0"' in s2
        assert f'<li id="mem-{new["id"]}" class="memory status-live">' in s2
        assert f'supersedes <a class="memory-ref" href="#mem-{old["id"]}">' in s2
        assert f'<li id="mem-{old["id"]}" class="memory status-superseded">' in s2
        assert f'superseded by <a class="memory-ref" href="#mem-{new["id"]}">' in s2
        assert 'extracted from turns <a class="source-turn" href="#m0">#0</a>' in s2  # the new memory's source turn
        assert '<a class="source-turn" href="/ui/sessions/s1#m0">#0</a>' in s2  # the old one's, in its own session
        assert 'href="/ui/users/ada"' in s2
        assert SCRIPT not in s2 and "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in s2
        # The first session: its memory superseded by one shown on the user's page.
        s1 = _get(proxy, "/ui/sessions/s1", alpha)
        assert f'<li id="mem-{old["id"]}" class="memory status-superseded">' in s1
        assert f'superseded by <a class="memory-ref" href="/ui/users/ada#mem-{new["id"]}">' in s1
        # The question's request: the memory injected into it, its status and where it came from.
        q = _get(proxy, "/ui/sessions/q", alpha)
        injected = re.search(r'<details class="injected" open>.*?</details>', q, re.S)
        assert injected is not None and f"<code>{new['id']}</code>" in injected.group(0)
        assert "status-live" in injected.group(0) and "The user lives in Porto now." in injected.group(0)
        assert 'href="/ui/sessions/s2#m0"' in injected.group(0)
        # The user's page: the chain newest first, links back to the source sessions.
        page = _get(proxy, "/ui/users/ada", alpha)
        (chain,) = re.findall(r'<ol class="chain">(.*?)</ol>', page, re.S)
        assert chain.index(new["id"]) < chain.index(old["id"]) and "superseded by" in chain
        assert all(f'href="/ui/sessions/{s}"' in page for s in ("s1", "s2", "q"))
        assert '<a class="source-session" href="/ui/sessions/s1">s1</a>' in page
        assert SCRIPT not in page and "&lt;script&gt;" in page and "green tea" not in page

        # The JSON route and the page read the same view.
        view = httpx.get(f"{proxy.url}/admin/memory/extractions", params={"session_id": "q"}, headers=bearer).json()
        (entry,) = [e for e in view["injected"] if new["id"] in e["memory_ids"]]
        assert [m["status"] for m in entry["memories"] if m["id"] == new["id"]] == ["live"]

        # Another tenant's admin sees none of it, even for a user of the same name.
        beta = log_in(proxy, BETA_KEY)
        theirs = _get(proxy, "/ui/users/ada", beta)
        assert "green tea" in theirs and "Porto" not in theirs and "Lisbon" not in theirs and new["id"] not in theirs
        assert httpx.get(f"{proxy.url}/ui/sessions/s2", headers=beta).status_code == 404
        assert httpx.get(f"{proxy.url}/ui/users/nobody", headers=alpha).status_code == 404
        hostile = httpx.get(f"{proxy.url}/ui/users/{httpx.URL(path=HOSTILE_ID).raw_path.decode()}", headers=alpha)
        assert hostile.status_code == 404 and "<img src=x" not in hostile.text and "&lt;img src=x onerror=alert(1)&gt;" in hostile.text


def test_an_expired_memory_is_marked_until_the_sweep_erases_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "extract": True, "ttl": {"semantic": 2 / 86400}})
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        service = quiet(proxy)
        chat(proxy, "My favourite colour is teal.", user="alice", session="s1")
        drain(proxy)
        assert 'class="memory status-live"' in _get(proxy, "/ui/sessions/s1", {})
        time.sleep(2.2)
        assert 'class="memory status-expired"' in _get(proxy, "/ui/sessions/s1", {})
        assert 'class="memory status-expired"' in _get(proxy, "/ui/users/alice", {})
        assert proxy.call(service.learning.sweep()) >= 1
        assert 'class="memory status-erased"' in _get(proxy, "/ui/sessions/s1", {})
