"""Which session a request belongs to, and one request at a time per session (proxy/sessions.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.errors import BadRequest, Conflict
from proxy.sessions import (
    MAX_SESSION_ID, SessionLocks, agent_identity, identify, implicit_session_id, strip_proxy_fields, user_id_of,
)

MESSAGES = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "first question"}]
CLAUDE_USER = json.dumps({"device_id": "dev-1", "account_uuid": "acct-1", "session_id": "cc-session-1"})


def test_the_first_source_that_names_a_session_wins() -> None:
    body = {"messages": MESSAGES, "metadata": {"session_id": "from-metadata"}}
    headers = {"X-Session-ID": "from-header", "session-id": "from-codex"}
    assert identify("t", headers, "from-path", body).source == "header"
    assert identify("t", {"session-id": "from-codex"}, "from-path", body).id == "from-path"
    ref = identify("t", {"session-id": "from-codex"}, None, body)
    assert (ref.id, ref.source, ref.implicit) == ("from-metadata", "metadata", False)
    ref = identify("t", {"session-id": "from-codex"}, None, {"messages": MESSAGES})
    assert (ref.id, ref.source) == ("from-codex", "codex")


def test_claude_codes_session_and_user_come_from_its_header_or_metadata() -> None:
    body = {"messages": MESSAGES, "metadata": {"user_id": CLAUDE_USER}}
    ref = identify("t", {}, None, body)
    assert (ref.id, ref.source, ref.user_id) == ("cc-session-1", "claude-code", "acct-1")
    ref = identify("t", {"X-Claude-Code-Session-Id": "cc-header"}, None, body)
    assert (ref.id, ref.source) == ("cc-header", "claude-code")


def test_without_a_session_id_one_conversation_is_one_implicit_session() -> None:
    ref = identify("t", {}, None, {"messages": MESSAGES})
    assert ref.implicit and ref.source == "implicit" and ref.id.startswith("implicit-")
    later = MESSAGES + [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "second question"}]
    assert identify("t", {}, None, {"messages": later}).id == ref.id  # the conversation went on
    assert identify("other", {}, None, {"messages": MESSAGES}).id != ref.id  # tenants never share one
    other_start = [MESSAGES[0], {"role": "user", "content": "another question"}]
    assert identify("t", {}, None, {"messages": other_start}).id != ref.id


def test_cache_breakpoints_do_not_move_a_conversation_to_another_session() -> None:
    plain = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    marked = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    assert implicit_session_id("t", plain) == implicit_session_id("t", marked)


@pytest.mark.parametrize("value", ["", "x" * (MAX_SESSION_ID + 1), "line\nbreak"])
def test_a_bad_session_id_is_a_400_naming_where_it_came_from(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        identify("t", {"X-Session-ID": value}, None, {"messages": MESSAGES})
    assert (caught.value.code, caught.value.param) == ("invalid_session_id", "X-Session-ID")


def test_a_session_id_that_is_not_a_string_is_a_400() -> None:
    with pytest.raises(BadRequest) as caught:
        identify("t", {}, None, {"messages": MESSAGES, "metadata": {"session_id": 42}})
    assert caught.value.param == "metadata.session_id"


def test_the_user_is_the_header_else_metadata() -> None:
    assert user_id_of({"X-User-ID": "alice"}, {"metadata": {"user_id": "bob"}}) == "alice"
    assert user_id_of({}, {"metadata": {"user_id": "bob"}}) == "bob"
    assert user_id_of({}, {"metadata": {"user_id": json.dumps({"device_id": "dev-9"})}}) == "dev-9"
    assert user_id_of({}, {"messages": MESSAGES}) is None
    with pytest.raises(BadRequest):
        user_id_of({"X-User-ID": "tab\there"}, {})


def test_an_agents_identity_is_stable_and_separates_credentials_prompts_and_tools() -> None:
    body = {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "search"}}]}
    headers = {"Authorization": "Bearer key-a"}
    same = agent_identity("t", headers, body, None)
    assert same == agent_identity("t", headers, body | {"messages": MESSAGES + [{"role": "user", "content": "more"}]}, None)
    assert same != agent_identity("t", {"Authorization": "Bearer key-b"}, body, None)
    assert same != agent_identity("t", headers, body | {"tools": []}, None)
    assert same != agent_identity("t", headers, body, "alice")
    assert same != agent_identity("t", headers, {**body, "messages": [{"role": "system", "content": "other"}]}, None)


def test_proxy_fields_are_stripped_without_touching_the_callers_body() -> None:
    body = {"model": "m", "metadata": {"session_id": "s", "user_id": "u", "trace": "keep"}}
    assert strip_proxy_fields(body) == {"model": "m", "metadata": {"trace": "keep"}}
    assert body["metadata"] == {"session_id": "s", "user_id": "u", "trace": "keep"}
    assert strip_proxy_fields({"model": "m", "metadata": {"session_id": "s"}}) == {"model": "m"}
    untouched = {"model": "m", "metadata": {"trace": "t"}}
    assert strip_proxy_fields(untouched) is untouched


async def test_requests_of_one_session_run_one_at_a_time_in_arrival_order() -> None:
    locks, order = SessionLocks(), []

    async def request(name: str, session: str) -> None:
        async with locks.hold("t", session, refuse_when_busy=False):
            order.append(f"{name} in")
            await asyncio.sleep(0.02)
            order.append(f"{name} out")

    await asyncio.gather(request("a", "s1"), request("b", "s1"), request("c", "s2"))
    assert order.index("a out") < order.index("b in")  # same session: serialised
    assert order.index("c in") < order.index("a out")  # another session: not held up
    assert locks._locks == {} and locks._users == {}  # idle sessions' locks are forgotten


async def test_a_tenant_that_refuses_concurrency_gets_a_409_while_the_session_is_busy() -> None:
    locks = SessionLocks()
    entered, release = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with locks.hold("t", "s", refuse_when_busy=True):
            entered.set()
            await release.wait()

    task = asyncio.create_task(first())
    await entered.wait()
    with pytest.raises(Conflict) as caught:
        async with locks.hold("t", "s", refuse_when_busy=True):
            pass
    assert caught.value.status == 409
    async with locks.hold("other-tenant", "s", refuse_when_busy=True):
        pass  # the same id in another tenant is another session
    release.set()
    await task
    async with locks.hold("t", "s", refuse_when_busy=True):
        pass  # free again


async def test_a_waiter_cancelled_in_the_queue_leaves_no_lock_behind() -> None:
    locks = SessionLocks()
    entered, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with locks.hold("t", "s", refuse_when_busy=False):
            entered.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("t", "s", refuse_when_busy=False):
            pytest.fail("a cancelled waiter must not get the lock")

    first = asyncio.create_task(holder())
    await entered.wait()
    second = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    release.set()
    await first
    assert locks._locks == {} and locks._users == {}
