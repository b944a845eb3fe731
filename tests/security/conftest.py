"""Fixtures of the security suite: a logging "attacker" server, the proxy on both upstream paths,
and the hypothesis profiles of the fuzz tests."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings

from tests.harness import ProxyThread, route, start_thread, write_config
from tests.serving import in_thread, serve

# Profiles of the fuzz tests: "security-fast" runs in CI (500 bodies, ~35 s); "security-deep" is
# for a local hunt (5,000 bodies, 1-5 min on 2 shared cores):
#   HYPOTHESIS_PROFILE=deep python -m pytest tests/security/test_fuzz.py -o timeout=1500 -s
# Only the fuzz tests use them (``fuzz_settings``): loading one globally would change every other
# property test of the suite. Neither keeps an example database (nothing written into the
# repository) nor a deadline (a shared machine is slow at times; the fuzz asserts statuses only).
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("security-fast", max_examples=500, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("security-deep", max_examples=5000, deadline=None, database=None, suppress_health_check=_QUIET)


def fuzz_settings() -> settings:
    """The fuzz profile chosen by HYPOTHESIS_PROFILE (deep or security-deep), fast otherwise."""
    deep = os.environ.get("HYPOTHESIS_PROFILE", "").endswith("deep")
    return settings.get_profile("security-deep" if deep else "security-fast")


class Attacker:
    """A server the client would like the proxy to call: it records every request it gets, on
    any path and method, and answers like a provider would (so a leak "succeeds" visibly)."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict[str, Any]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append({"method": request.method, "path": request.path, "headers": dict(request.headers),
                              "body": await request.read()})
        reply = {"id": "chatcmpl-attacker", "object": "chat.completion", "created": int(time.time()), "model": "m1",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "attacker answer"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
        return web.json_response(reply)

    @contextlib.contextmanager
    def run(self) -> Iterator[Attacker]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        with in_thread(lambda: serve(app), "attacker") as port:
            self.url = f"http://127.0.0.1:{port}"
            yield self


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    with Attacker().run() as server:
        yield server


def two_path_tenant(upstream_base: str, **extra: Any) -> dict[str, Any]:
    """One open tenant whose model "direct" goes over the direct HTTP path and "via-litellm"
    through litellm, both to the same upstream with the same key."""
    return {
        "allow_unauthenticated": True,
        "models": {"direct": route(upstream_base, "openai/fake-model", path="direct"),
                   "via-litellm": route(upstream_base, "openai/fake-model", path="litellm")},
    } | extra


@contextlib.contextmanager
def running_proxy(tmp_path: Path, tenant: dict[str, Any], **sections: Any) -> Iterator[ProxyThread]:
    with start_thread(write_config(tmp_path, {"local": tenant}, **sections)) as proxy:
        yield proxy
