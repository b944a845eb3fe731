"""The proxy on PostgreSQL (storage.backend: postgres), run the way an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import REPO, ProxyProcess, open_tenant, write_config


@pytest.fixture
def database(postgres_server) -> str:
    import asyncio

    return asyncio.run(postgres_server.new_database())


def postgres_config(tmp_path: Path, upstream: FakeUpstream, dsn: str) -> Path:
    storage = {"data_dir": str(tmp_path / "data"), "backend": "postgres", "postgres": {"dsn": "${TEST_DATABASE_URL}"}}
    tenant = open_tenant(upstream.base_url, persistence={"mode": "sync"}, memory={"enabled": False})
    return write_config(tmp_path, {"local": tenant}, storage=storage)


def test_a_conversation_survives_kill_9_on_postgres(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    config = postgres_config(tmp_path, upstream, database)
    env = {"TEST_DATABASE_URL": database}
    proxy = ProxyProcess(config, env=env).start()
    try:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        history = []
        for text in ("my name is Ada", "I work on compilers"):
            history.append({"role": "user", "content": text})
            reply = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": "pg"})
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
        proxy.kill()
        proxy = ProxyProcess(config, env=env).start()
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "what do I work on?"}], extra_headers={"X-Session-ID": "pg"})
        assert raw.headers["x-history-restored"] == "4"
        assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == [
            "my name is Ada", "echo: my name is Ada", "I work on compilers", "echo: I work on compilers", "what do I work on?"]
    finally:
        proxy.stop()


def test_a_second_replica_on_the_same_database_refuses_to_start(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    env = {"TEST_DATABASE_URL": database}
    first = ProxyProcess(postgres_config(tmp_path / "a", upstream, database), env=env).start()
    try:
        second = ProxyProcess(postgres_config(tmp_path / "b", upstream, database), env=env)
        with pytest.raises(RuntimeError, match="another agent-state-proxy replica is using this database"):
            second.start(timeout=30)
        assert "Traceback" not in second.log() and database not in second.log()
    finally:
        first.stop()


def test_migrate_is_safe_to_run_concurrently(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    config = postgres_config(tmp_path, upstream, database)
    command = [sys.executable, "-m", "proxy", "migrate", "--config", str(config)]
    env = {"TEST_DATABASE_URL": database, "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    applied = sorted(out.split("(")[1].split(" ")[0] for out, _ in outputs)
    from proxy.storage.postgres import MIGRATIONS

    assert applied == ["0", "0", str(len(MIGRATIONS))]  # one of them created the schema, the others found it current
