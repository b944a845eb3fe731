"""Test harness: write configs, run the proxy in a thread or as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from proxy.config import Config, load_config
from proxy.server import keys
from proxy.server.app import create_app
from proxy.server.protocol import ProxyRunner
from proxy.storage.base import Store

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


def open_tenant(upstream_base: str, **extra: Any) -> dict[str, Any]:
    """An open tenant for local clients. The suite's SDK clients send a placeholder key, as
    agents that only changed their base URL do, so it ignores unknown keys."""
    return {
        "allow_unauthenticated": True,
        "ignore_client_keys": True,
        "models": {"*": {"model": "openai/{model}", "api_base": upstream_base, "api_key": "upstream-secret-key"}},
    } | extra


def keyed_tenant(upstream_base: str, key: str, **extra: Any) -> dict[str, Any]:
    from proxy.config import hash_key

    return {
        "api_key_sha256": [hash_key(key)],
        "models": {"*": {"model": "openai/{model}", "api_base": upstream_base, "api_key": "upstream-secret-key"}},
    } | extra


class ProxyThread:
    """The proxy app on its own event loop in a daemon thread, so sync and async clients both work."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config, self.store = config, store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.app: web.Application | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self.app = create_app(self.config, self.store)
        self._runner = ProxyRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()


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
