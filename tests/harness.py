"""Test harness: write configs, run the proxy in a thread or as a real process, answer the
upstream client's requests with a handler function."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import yaml
from aiohttp import abc, web
from aiohttp.test_utils import RawTestServer

from proxy.config import Config, load_config
from proxy.server import keys
from proxy.server.app import create_app
from proxy.server.protocol import ProxyRunner
from proxy.storage.base import Store
from proxy.upstream import Upstream
from tests.serving import LoopThread, serve

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, tenants: dict[str, dict[str, Any]], **sections: Any) -> Path:
    """Write proxy.yaml + tenants/*.yaml under ``directory``; returns the proxy.yaml path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tenants").mkdir(exist_ok=True)
    doc = {"storage": {"data_dir": str(directory / "data")}} | sections
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    for name, tenant in tenants.items():
        (directory / "tenants" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name} | tenant))
    return path


UPSTREAM_KEY = "upstream-secret-key"  # the key the fake providers expect


def route(upstream_base: str, model: str = "openai/{model}", **extra: Any) -> dict[str, Any]:
    """One model route of a tenant: ``model`` at the fake provider ``upstream_base``, with its key."""
    return {"model": model, "api_base": upstream_base, "api_key": UPSTREAM_KEY} | extra


def open_tenant(upstream_base: str, **extra: Any) -> dict[str, Any]:
    """An open tenant for local clients. The suite's SDK clients send a placeholder key, as
    agents that only changed their base URL do, so it ignores unknown keys."""
    return {
        "allow_unauthenticated": True,
        "ignore_client_keys": True,
        "models": {"*": route(upstream_base)},
    } | extra


def keyed_tenant(upstream_base: str, key: str, **extra: Any) -> dict[str, Any]:
    from proxy.config import hash_key

    return {
        "api_key_sha256": [hash_key(key)],
        "models": {"*": route(upstream_base)},
    } | extra


def local_config(directory: Path, upstream_base: str, sections: dict[str, Any] | None = None, **tenant: Any) -> Path:
    """The config of the default install: one open tenant, "local", routed to ``upstream_base``
    (``tenant``: its other keys; ``sections``: proxy.yaml's, e.g. ``{"server": {...}}``)."""
    return write_config(directory, {"local": open_tenant(upstream_base, **tenant)}, **(sections or {}))


def local_proxy(directory: Path, upstream_base: str, sections: dict[str, Any] | None = None, **tenant: Any) -> ProxyThread:
    """The proxy in a thread over ``local_config`` (start it with ``with``)."""
    return start_thread(local_config(directory, upstream_base, sections, **tenant))


class ProxyThread:
    """The proxy app on its own event loop in a daemon thread, so sync and async clients both work."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config, self.store = config, store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.app: web.Application | None = None
        self._thread = LoopThread("proxy")
        self._serving: contextlib.AbstractAsyncContextManager[int] | None = None

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.app = create_app(self.config, self.store)  # on the loop that will run it
        self._serving = serve(self.app, "127.0.0.1", self.port, runner=ProxyRunner)
        await self._serving.__aenter__()

    def __exit__(self, *exc: object) -> None:
        assert self._serving is not None
        self.call(self._serving.__aexit__(None, None, None))
        self._thread.stop()

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the proxy's loop and wait for its result."""
        return self._thread.call(coro, timeout)


def context_settled(proxy: ProxyThread) -> None:
    """Block until the context manager's background work (summaries) is done: what a model's
    seconds of thinking give it between two turns (tests and benchmarks only)."""

    async def settle() -> None:
        context = proxy.app[keys.PIPELINE].context
        while context._tasks:
            await asyncio.gather(*list(context._tasks), return_exceptions=True)

    proxy.call(settle())


def start_thread(config_path: Path) -> ProxyThread:
    return ProxyThread(load_config(config_path))


class ProxyProcess:
    """`agent-state-proxy serve` as a real child process, the way a user runs it."""

    def __init__(self, config_path: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        self.process: subprocess.Popen | None = None
        self.log_path = config_path.parent / f"proxy-{self.port}.log"

    def start(self, timeout: float = 30) -> ProxyProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path), "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"proxy not ready after {timeout}s: {self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class _ToServer(abc.AbstractResolver):
    """Resolves every host name to one local port: the provider's own URL reaches the handler."""

    def __init__(self, port: int) -> None:
        self._port = port

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": self._port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def handler_upstream(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                           secrets: tuple[str, ...] = ()) -> AsyncIterator[Upstream]:
    """A started Upstream whose every request, to any http:// host, ``handler`` answers (an
    aiohttp handler function: it sees the request as sent and returns any response, SSE too).
    For unit tests of the upstream client; end-to-end tests use the fake servers."""
    server = RawTestServer(handler)
    await server.start_server()
    assert server.port is not None
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_ToServer(server.port)))
    upstream = Upstream(secrets, http=session)
    try:
        await upstream.start()
        yield upstream
    finally:
        await upstream.close()
        await session.close()
        await server.close()
