"""The pipeline's stages, one at a time, on a real store and a fake provider on a real port.

Each stage reads a turn and returns what it decided; only the pipeline writes into the turn.
These tests call the stages directly and check both halves: the decision, and that the turn
(and the session it carries) is left alone until ``Pipeline._decided``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy import codec, transcript
from proxy.config import load_config
from proxy.context.manager import ContextManager, Shaped
from proxy.errors import ProxyError
from proxy.pipeline import Pipeline, _decided
from proxy.records import Message, Session
from proxy.sessions import SessionRef
from proxy.stages import load as load_stage, recall as recall_stage, replay
from proxy.stages.reconcile import gap_header, reconcile
from proxy.stages.record import Answer
from proxy.storage.memory import InMemoryStore
from proxy.storage.write_behind import WriteBehindStore
from proxy.upstream import Upstream
from tests.fake_upstream import FakeUpstream
from tests.harness import open_tenant, write_config

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
BUDGET = {"max_context_tokens": 1200, "reserve_completion_tokens": 200}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **tenant: Any) -> AsyncIterator[tuple[Pipeline, Any, FakeUpstream]]:
    """A pipeline with its context stage on a write-behind in-memory store, a real upstream client
    and the fake provider; yields (pipeline, tenant config, fake provider)."""
    async with FakeUpstream.start(expected_api_key="upstream-secret-key") as fake:
        config = load_config(write_config(tmp_path, {"local": open_tenant(fake.base_url, **tenant)}))
        store = WriteBehindStore(InMemoryStore())
        await store.start()
        upstream = Upstream()
        await upstream.start()
        context = ContextManager(store, upstream)
        try:
            yield Pipeline(store, upstream, context=context), config.tenants["local"], fake
        finally:
            await context.close()
            await upstream.close()
            await store.close()


async def turn_for(pipeline: Pipeline, tenant: Any, session: str, messages: list[dict[str, Any]], **kwargs: Any):
    ref, body, route = pipeline.identify(tenant, {"X-Session-ID": session}, None, {"model": "fake-model", "messages": messages})
    async with pipeline.session_lock(tenant, ref):
        return await pipeline.prepare(tenant, ref, body, route, **kwargs)


async def test_a_turn_is_recorded_and_the_next_one_gets_the_history_the_client_left_out(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        first = await turn_for(pipeline, tenant, "s", [SYSTEM, {"role": "user", "content": "My name is Ada."}])
        assert first.headers["X-Session-ID"] == "s" and first.headers["X-Session-Source"] == "header"
        answer = await pipeline.complete(first)
        reply = answer["choices"][0]["message"]["content"]
        stored = await pipeline.store.get_messages("local", "s")
        assert [m.role for m in stored] == ["system", "user", "assistant"] and stored[-1].body["content"] == reply

        second = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "What is my name?"}])
        assert second.headers["X-History-Restored"] == "3"
        assert [m["content"] for m in second.body["messages"]] == [SYSTEM["content"], "My name is Ada.", reply, "What is my name?"]
        await pipeline.complete(second)
        assert fake.chat_requests[-1]["messages"][1]["content"] == "My name is Ada."


async def test_a_stream_the_client_abandons_is_recorded_as_aborted(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        fake.script_reply("one two three four five six seven eight nine ten")
        turn = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "count"}])
        turn.body = turn.body | {"stream": True}
        batches = pipeline.stream(turn)
        await anext(batches)  # the client reads one batch, then goes away
        await batches.aclose()
        stored = await pipeline.store.get_messages("local", "s")
        assert [m.outcome for m in stored] == ["ok", "aborted"] and stored[-1].body["content"]
        assert turn.upstream_status is None  # the provider never finished


async def test_an_upstream_failure_is_recorded_with_the_request_and_raised(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        fake.fail_next(500, "boom")
        turn = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "hello"}])
        with pytest.raises(ProxyError):
            await pipeline.complete(turn)
        stored = await pipeline.store.get_messages("local", "s")
        assert [(m.role, m.outcome) for m in stored] == [("user", "error")]


async def test_the_context_stage_returns_its_decision_and_leaves_the_turn_alone(tmp_path: Path) -> None:
    async with running(tmp_path, context=BUDGET | {"window_turns": 2}) as (pipeline, tenant, fake):
        long = "a long detail about the project plan and its many steps " * 12
        history = [SYSTEM]
        for t in range(8):  # well over the 1,000-token budget
            history.append({"role": "user", "content": f"Turn {t}: {long}"})
            turn = await turn_for(pipeline, tenant, "s", history)
            history.append((await pipeline.complete(turn))["choices"][0]["message"])
        history.append({"role": "user", "content": "And now?"})
        pipeline.context, context = None, pipeline.context  # the turn as it is before the context stage
        turn = await turn_for(pipeline, tenant, "s", history)
        body, extra = copy.deepcopy(turn.body), copy.deepcopy(turn.session.extra)

        shaped = await context.shape(turn, reserve=0)
        assert turn.body == body and turn.session.extra == extra and "X-Context-Tokens" not in turn.headers
        assert len(shaped.body["messages"]) < len(body["messages"])
        sent, saved = int(shaped.headers["X-Context-Tokens"]), int(shaped.headers["X-Context-Tokens-Saved"])
        assert 0 < sent <= 1000 < sent + saved
        assert shaped.stats["requests"] == extra["context"]["requests"] + 1
        assert shaped.stats["tokens_saved"] == extra["context"]["tokens_saved"] + saved

        _decided(turn, shaped, recall_stage.Memories())
        assert turn.body is shaped.body and turn.headers["X-Context-Tokens"] == str(sent)
        assert turn.session.extra["context"] is shaped.stats


async def test_a_short_conversation_keeps_all_the_room_asked_for_the_memory_block(tmp_path: Path) -> None:
    async with running(tmp_path, context=BUDGET) as (pipeline, tenant, fake):
        turn = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "hello"}])
        shaped = await pipeline.context.shape(turn, reserve=150)
        assert shaped.kept_free == 150 and shaped.body["messages"] == turn.body["messages"]
        assert shaped.stats["requests"] == turn.session.extra["context"]["requests"] + 1  # prepare shaped it once already
        assert int(shaped.headers["X-Context-Budget"]) == 1000 - 150


class _Recorder:
    """The memory service's recall half as the pipeline sees it: it reads the turn it is given
    and writes its outcome there, as proxy/memory/service.py does."""

    def __init__(self) -> None:
        self.rooms: list[int] = []

    def begin_recall(self, turn: Any, early: Any) -> Any:
        turn.headers["X-Memory-Status"] = "searching"
        return _Recall()

    async def finish_recall(self, turn: Any, recall: Any) -> None:
        self.rooms.append(recall.room)
        turn.body = turn.body | {"messages": [*turn.body["messages"][:-1], {"role": "user", "content": "[memories]"}, turn.body["messages"][-1]]}
        turn.injected = ["mem_1"]
        turn.headers["X-Memory-Ids"] = "mem_1"


class _Recall:
    room = 500
    query = "hello"
    started = 0.0

    def cancel(self) -> None:
        pass


async def test_the_recall_stage_returns_the_memories_and_leaves_the_turn_alone(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        turn = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "hello"}])
        body, headers = turn.body, dict(turn.headers)
        memory = _Recorder()
        started = recall_stage.begin(memory, turn, None)
        assert started.reserve == 500 and started.headers == {"X-Memory-Status": "searching"}
        memories = await recall_stage.finish(memory, turn, started, body, [], room=120)
        assert memory.rooms == [120]  # the room the context stage left, passed as a value
        assert turn.body is body and turn.headers == headers and turn.injected is None
        assert memories.ids == ["mem_1"] and memories.headers["X-Memory-Ids"] == "mem_1"
        assert [m["content"] for m in memories.body["messages"]] == ["[memories]", "hello"]

        _decided(turn, Shaped(body, 120), memories)
        assert turn.body is memories.body and turn.injected == ["mem_1"] and turn.headers["X-Memory-Status"] == "searching"


async def test_a_retried_request_is_answered_from_its_record_and_a_changed_body_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        ask = [{"role": "user", "content": "hello"}]
        first = await turn_for(pipeline, tenant, "s", ask, idempotency_key="k1")
        answer = await pipeline.complete(first)
        again = await turn_for(pipeline, tenant, "s", ask, idempotency_key="k1")
        assert again.replay["response"] == answer and again.headers["Idempotent-Replayed"] == "true"
        assert again.request_id == first.request_id and len(fake.chat_requests) == 1

        body = {"model": "fake-model", "messages": [{"role": "user", "content": "something else"}]}
        assert await replay.find(pipeline.store, "local", "s", None, body) is None
        with pytest.raises(ProxyError) as refused:
            await replay.find(pipeline.store, "local", "s", "k1", body)
        assert refused.value.status == 422 and refused.value.code == "idempotency_key_reused"


def _message(seq: int, parent: int | None, chain: str, body: dict[str, Any]) -> Message:
    return Message(seq=seq, parent=parent, chain=transcript.chain_hash(chain, body), role=body["role"], body=body, ts=1.0)


async def test_reconcile_restores_and_refuses_unstorable_messages(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"local": open_tenant("http://127.0.0.1:9/v1")}))
    tenant = config.tenants["local"]
    first = _message(0, None, transcript.ROOT_CHAIN, {"role": "user", "content": "hi"})
    second = _message(1, 0, first.chain, {"role": "assistant", "content": "hello"})
    session = Session(tenant="local", id="s", created_at=1.0, last_active=1.0, head=1, next_seq=2)
    history = reconcile(tenant, session, [first, second], {"messages": [{"role": "user", "content": "again"}]})
    assert history.headers == {"X-History-Restored": "2"}
    assert [m["content"] for m in history.messages] == ["hi", "hello", "again"]
    assert history.plan.parent is second and history.plan.new_messages == [{"role": "user", "content": "again"}]
    with pytest.raises(ProxyError) as refused:
        deep: Any = "bottom"
        for _ in range(codec.MAX_DEPTH + 2):
            deep = [deep]
        reconcile(tenant, session, [first, second], {"messages": [{"role": "user", "content": "x", "extra": deep}]})
    assert refused.value.status == 400 and "messages[0]" in refused.value.message
    assert gap_header([transcript.Gap(1, 5, (2, 3, 4)), transcript.Gap(None, 9, (8,)), transcript.Gap(None, 12, ())]) == "2-4,8,?"


async def test_the_repairs_listed_are_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(load_stage, "REPAIRS_KEPT", 3)
    async with running(tmp_path) as (pipeline, tenant, fake):
        loader = load_stage.SessionLoader(pipeline.store, pipeline.lifecycle)
        for n in range(5):  # messages without their session record: each is repaired on load
            message = _message(0, None, transcript.ROOT_CHAIN, {"role": "user", "content": f"hi {n}"})
            await pipeline.store.apply([_orphan_write(f"s{n}", message)])
            session, stored = await loader.load(tenant, SessionRef(f"s{n}", False, None, "header"), 2.0 + n)
            assert session.head == 0 and len(stored) == 1
        assert [r["session"] for r in loader.repaired] == ["s2", "s3", "s4"]


def _orphan_write(session_id: str, message: Message):
    from proxy.storage.base import Write

    # The session record names a head message that is not stored: what a damaged store holds.
    return Write("local", Session(tenant="local", id=session_id, created_at=1.0, last_active=1.0, head=1, next_seq=2), [message])


async def test_records_of_a_recorded_answer_carry_the_context_counts(tmp_path: Path) -> None:
    async with running(tmp_path) as (pipeline, tenant, fake):
        turn = await turn_for(pipeline, tenant, "s", [{"role": "user", "content": "hello"}])
        turn.headers |= {"X-Context-Tokens": "10", "X-Context-Tokens-Saved": "5"}
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
        await pipeline._record(turn, Answer([{"role": "assistant", "content": "hi"}], "ok", "stop", usage, "fake-model"))
        reply = (await pipeline.store.get_messages("local", "s"))[-1]
        assert reply.usage == {"prompt": 10, "completion": 2, "cached": 4, "sent": 10, "full": 15}
        assert turn.headers["X-Context-Cached-Tokens"] == "4" and turn.session.extra["cache"]["cached_tokens"] == 4
