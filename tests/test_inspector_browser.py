"""The session inspector in a real browser: Debian's chromium driven by Playwright opens /ui,
logs in with the tenant key, opens a session recorded through the OpenAI SDK and checks what a
person sees, then what long-term memory learned from a user's sessions (the fake upstream acting
as the extractor model); screenshots are saved under the test's temp dir."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from tests.conftest import ALPHA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import keyed_tenant, write_config
from tests.memory_helpers import SLOW_OK, Extractor, chat, drain, known_ids, quiet, running

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -c constraints.txt -e '.[test]')")

HOSTILE = "<script>alert('owned')</script> is just text here"
NOTES = "My notes on the venue, room by room: " + "; ".join(f"room {n} has a view of the river and a small desk" for n in range(1, 16))


def _chromium() -> str:
    """Debian's chromium (Playwright's own browser download does not work here); $ASP_CHROMIUM overrides."""
    for candidate in (os.environ.get("ASP_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    reason = "no chromium executable found (apt-get install -y chromium; .ci/run installs it)"
    if os.environ.get("ASP_REQUIRE_CHROMIUM"):  # set by .ci/run: CI never skips this test
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def _browser_page(executable: str, dialogs: list[str]) -> Iterator[Any]:
    """A page of a fresh headless chromium; any dialog (a script that ran) is noted and dismissed."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            yield page
        finally:
            browser.close()


def _asker(base_url: str) -> Callable[[str, list[dict], str], list[dict]]:
    """One turn of user ada through the OpenAI SDK: the history with the question and the answer."""
    sdk = openai.OpenAI(base_url=base_url, api_key=ALPHA_KEY, max_retries=0)

    def ask(session: str, history: list[dict], text: str) -> list[dict]:
        history = history + [{"role": "user", "content": text}]
        reply = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": session, "X-User-ID": "ada"})
        return history + [{"role": "assistant", "content": reply.choices[0].message.content}]

    return ask


def test_a_person_logs_in_and_reads_a_recorded_session(tmp_path: Path, upstream: FakeUpstream) -> None:
    executable = _chromium()
    tenant = keyed_tenant(upstream.base_url, ALPHA_KEY, memory={"latency_budget_ms": SLOW_OK})
    with running(write_config(tmp_path / "proxy", {"alpha": tenant})) as proxy:
        ask = _asker(proxy.base_url)
        ask("offsite-planning", [], "For the Lisbon offsite we settled on the Alfama Lighthouse hotel.")
        drain(proxy)  # the first session's messages are memories now
        history = ask("hotel-review", [{"role": "system", "content": "You are terse."}], "Which hotel did we pick for the offsite?")
        history = ask("hotel-review", history, HOSTILE)
        history = ask("hotel-review", history, NOTES)
        history = ask("hotel-review", history, "We decided to book two extra rooms.")
        ask("hotel-review", history[:-2], "Actually, cancel the extra rooms.")  # an edit: a branch

        dialogs: list[str] = []
        with _browser_page(executable, dialogs) as page:
            page.goto(f"{proxy.url}/ui")
            assert page.url.endswith("/ui/login")  # a keyed tenant: the key first
            page.fill("#key", ALPHA_KEY)
            page.click("button[type=submit]")
            page.wait_for_url(f"{proxy.url}/ui")
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies["asp_inspector"]["httpOnly"] and ALPHA_KEY not in cookies["asp_inspector"]["value"]

            assert page.locator("tr.session-row").count() == 2
            page.fill("input[name=q]", "hotel")
            page.click("form.search button")
            assert page.locator("tr.session-row").count() == 1
            page.click("text=hotel-review")
            page.wait_for_url("**/ui/sessions/hotel-review")

            assert page.locator("h1").inner_text() == "Session hotel-review"
            timeline = page.locator("ol.timeline")
            for text in ("Which hotel did we pick for the offsite?", "We decided to book two extra rooms.", "Actually, cancel the extra rooms."):
                assert timeline.get_by_text(text, exact=True).is_visible(), text
            assert timeline.get_by_text(HOSTILE, exact=True).is_visible()  # shown as text, never run
            assert page.locator(".branch-marker", has_text="branch 1").first.is_visible()
            assert page.locator("li.msg.role-user.inactive", has_text="We decided to book two extra rooms.").is_visible()
            assert page.locator("li.msg.role-user.active", has_text="Actually, cancel the extra rooms.").is_visible()
            memories = page.locator("details.injected", has_text="Alfama Lighthouse")  # recalled from the other session
            assert memories.count() >= 1 and memories.first.is_visible()
            chart = page.locator("#token-chart")
            assert chart.is_visible() and page.locator("#token-chart rect.bar-sent").count() == 5
            assert page.locator("#token-chart rect.bar-cached").count() >= 1
            assert "decision" in page.locator("section", has_text="Pinned messages").inner_text()

            shot = tmp_path / "inspector-session.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.goto(f"{proxy.url}/ui")
            page.screenshot(path=str(tmp_path / "inspector-sessions.png"), full_page=True)
        assert dialogs == []  # the hostile content never ran
        print(f"screenshots: {tmp_path}")


def _log_in(page, url: str) -> None:
    page.goto(f"{url}/ui")
    page.fill("#key", ALPHA_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/ui")


def test_a_person_sees_what_was_learned_from_which_turn_and_what_it_replaced(tmp_path: Path, upstream: FakeUpstream) -> None:
    executable = _chromium()
    extractor = Extractor(upstream)
    tenant = keyed_tenant(upstream.base_url, ALPHA_KEY, memory={"latency_budget_ms": SLOW_OK, "extractor_model": "extractor"})
    with running(write_config(tmp_path / "proxy", {"alpha": tenant})) as proxy:
        quiet(proxy)
        extractor.replies.append({"memories": [{"kind": "fact", "text": "The user lives in Lisbon.", "subject": "user.home_city", "seqs": [0]}]})
        chat(proxy, "I live in Lisbon.", user="ada", session="lisbon-days", key=ALPHA_KEY)
        drain(proxy)
        extractor.replies.append(lambda body: {"memories": [
            {"kind": "fact", "text": "The user lives in Porto now.", "replaces": known_ids(body)[0], "seqs": [0]},
            {"type": "procedural", "kind": "preference", "text": f"The user writes {HOSTILE}", "seqs": [0]}]})
        chat(proxy, "I have moved to Porto since.", user="ada", session="porto-move", key=ALPHA_KEY)
        drain(proxy)
        chat(proxy, "Which city does the user live in these days?", user="ada", session="city-question", key=ALPHA_KEY)
        drain(proxy)

        dialogs: list[str] = []
        with _browser_page(executable, dialogs) as page:
            _log_in(page, proxy.url)
            page.click("text=porto-move")
            page.wait_for_url("**/ui/sessions/porto-move")

            learned = page.locator("section#learned")
            assert learned.locator("tr.run").count() == 1
            live = learned.locator("li.memory.status-live", has_text="The user lives in Porto now.")
            assert live.is_visible() and live.locator(".badge.type").inner_text() == "semantic"
            old = learned.locator("li.memory.status-superseded", has_text="The user lives in Lisbon.")
            assert old.is_visible() and "superseded by" in old.locator(".badge.status-superseded").inner_text()
            assert live.locator(".supersedes").is_visible()
            lesson = learned.locator("li.memory.status-live", has_text="The user writes")
            assert lesson.locator(".badge.type").inner_text() == "procedural"
            assert lesson.get_by_text(f"The user writes {HOSTILE}", exact=True).is_visible()  # text, never run

            live.locator("a.source-turn").click()  # the turn it was extracted from
            page.wait_for_url("**/ui/sessions/porto-move#m0")
            turn = page.locator("li.msg:target")
            assert turn.is_visible() and "I have moved to Porto since." in turn.inner_text()
            page.screenshot(path=str(tmp_path / "inspector-learned.png"), full_page=True)

            page.locator("section#learned a.user-link").click()
            page.wait_for_url("**/ui/users/ada")
            steps = page.locator("ol.chain > li")
            assert steps.count() == 2
            assert "The user lives in Porto now." in steps.nth(0).inner_text()
            assert "The user lives in Lisbon." in steps.nth(1).inner_text() and "superseded by" in steps.nth(1).inner_text()
            page.screenshot(path=str(tmp_path / "inspector-user.png"), full_page=True)
            page.locator("#superseded a.source-session", has_text="lisbon-days").click()  # back to where the old fact was said
            page.wait_for_url("**/ui/sessions/lisbon-days")
            assert page.locator("li.memory.status-superseded", has_text="The user lives in Lisbon.").is_visible()

            page.goto(f"{proxy.url}/ui/sessions/city-question")
            injected = page.locator("details.injected", has_text="The user lives in Porto now.")
            assert injected.is_visible() and injected.locator(".badge.status-live").first.is_visible()
        assert dialogs == []
        print(f"screenshots: {tmp_path}")
