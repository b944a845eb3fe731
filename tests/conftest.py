"""Shared fixtures: a fake provider on a real port and the proxy in front of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import UPSTREAM_KEY, ProxyThread, keyed_tenant, local_proxy, route, start_thread, write_config

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ALPHA_KEY = "alpha-proxy-key-123"
BETA_KEY = "beta-proxy-key-456"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.run_in_thread(expected_api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    """The proxy with one open local tenant, the way the default install runs."""
    with local_proxy(tmp_path, upstream.base_url) as running:
        yield running


@pytest.fixture
def keyed_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    """Two authenticated tenants and no open one; 'beta' refuses concurrent session requests."""
    beta = keyed_tenant(upstream.base_url, BETA_KEY, concurrency="reject", upstream_timeout_seconds=1)
    beta["models"] = {"fast": route(upstream.base_url, "openai/fake-model")}
    path = write_config(tmp_path, {"alpha": keyed_tenant(upstream.base_url, ALPHA_KEY), "beta": beta}, server={"max_body_bytes": 64 * 1024})
    with start_thread(path) as running:
        yield running


@pytest.fixture(scope="session")
def postgres_server() -> Iterator["PostgresServer"]:
    """One private PostgreSQL server for the whole run (started only if a test asks for it)."""
    from tests.postgres_server import serving

    yield from serving()
