"""The command line as a user meets it: --version, one-line errors (bad flags, a busy port), and
the warnings `serve` gives on the embedded defaults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import proxy
from tests.harness import REPO, free_port, local_config


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(REPO)} | (env or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"agent-state-proxy {proxy.__version__}"


@pytest.mark.parametrize(("args", "env", "named"), [
    (["serve", "--log-level", "verbose"], {}, "--log-level: invalid choice: 'VERBOSE'"),
    (["serve", "--log-format", "xml"], {}, "--log-format: invalid choice: 'xml'"),
    (["serve", "--port", "eighty"], {}, "--port: invalid int value: 'eighty'"),
    (["serve"], {"ASP_LOG_LEVEL": "loud"}, "ASP_LOG_LEVEL: invalid choice 'LOUD'"),
    (["serve"], {"ASP_LOG_FORMAT": "yaml"}, "ASP_LOG_FORMAT: invalid choice 'yaml'"),
    (["launch"], {}, "invalid choice: 'launch'"),
])
def test_a_bad_flag_is_one_line_naming_it(args: list[str], env: dict[str, str], named: str) -> None:
    result = _run(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr and "--help" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_busy_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = local_config(tmp_path, "http://127.0.0.1:9/v1", memory={"enabled": False})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("serve", "--config", str(config), "--port", str(port))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_the_embedded_defaults_warns_when_openai_api_key_is_unset(tmp_path: Path) -> None:
    """From a directory without config/ (the embedded defaults), as a new user runs it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ASP_CONFIG")}
    env |= {"PYTHONPATH": str(REPO), "ASP_LOG_FORMAT": "text"}
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    warning = next(line for line in output.splitlines() if "OPENAI_API_KEY" in line)
    assert "WARNING" in warning and "embedded default tenant" in warning and "is not set" in warning
    assert "embedded defaults" in output
