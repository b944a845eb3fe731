"""Field smuggling (issue #20, item 1): nothing a client sends chooses the upstream, its
credentials, its retries or a fabricated answer — on the direct path and the litellm path.

A logging "attacker" server on loopback must receive zero requests for every litellm parameter
name (read from the installed litellm) and every nested placement the allow-list lets through.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import httpx
import pytest

from proxy.config import ConfigError, load_config
from proxy.litellm_params import is_litellm_param
from proxy.protocol_fields import CHAT_COMPLETIONS, EMBEDDINGS
from proxy.upstream import import_litellm
from tests.fake_upstream import FakeUpstream
from tests.harness import UPSTREAM_KEY, write_config
from tests.security.conftest import Attacker, running_proxy, two_path_tenant

# litellm builds pydantic schemas of TypedDicts with ReadOnly items on its first calls; the warning
# is litellm's own business, not a failure of the proxy (warnings are errors in this suite).
pytestmark = pytest.mark.filterwarnings("ignore:Items? .*ReadOnly:UserWarning")

USER = [{"role": "user", "content": "hi"}]
MODELS = ("direct", "via-litellm")
# Provider request parameters litellm also accepts by name: a tenant may pass them through.
PROVIDER_PARAMS = {"thinking", "top_k"}


def installed_litellm_params() -> set[str]:
    """Every parameter name the installed litellm reads for itself (the issue's list: the
    ``completion()`` signature, ``get_litellm_params``, ``all_litellm_params`` and the
    ``kwargs.get`` names of litellm/main.py), minus the protocol's own fields."""
    litellm = import_litellm()
    from litellm.litellm_core_utils.get_litellm_params import get_litellm_params
    from litellm.types.utils import all_litellm_params

    names = set(all_litellm_params)
    for function in (litellm.completion, litellm.embedding, get_litellm_params):
        names |= set(inspect.signature(function).parameters)
    source = (Path(litellm.__file__).parent / "main.py").read_text()
    names |= set(re.findall(r'kwargs\.(?:get|pop)\(\s*"([A-Za-z_][A-Za-z0-9_]*)"', source))
    protocol = set(CHAT_COMPLETIONS.fields) | set(EMBEDDINGS.fields)
    return {n for n in names if n.isidentifier()} - protocol - PROVIDER_PARAMS - {"self", "kwargs"}


def post(proxy, body: dict, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(proxy.base_url + path, json=body, headers={"X-Session-ID": "smuggle"}, timeout=30)


def hostile_value(name: str, attacker: Attacker):
    """What an attacker would put in ``name``: its server wherever a place to call fits."""
    special = {
        "fallbacks": [{"model": "openai/m1", "api_base": attacker.url + "/v1", "api_key": "x"}],
        "model_list": [{"model_name": "direct", "litellm_params": {"model": "openai/m1", "api_base": attacker.url + "/v1"}}],
        "context_window_fallback_dict": {"openai/fake-model": "openai/m1"},
        "mock_response": "fabricated answer",
        "mock_tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "mock_timeout": True,
        "mock_delay": 5,
        "deployment_id": "nope",
        "num_retries": 3,
        "extra_body": {"api_base": attacker.url + "/v1"},
        "extra_headers": {"Authorization": "Bearer attacker"},
    }
    return special.get(name, attacker.url + "/v1")


def test_the_list_covers_every_parameter_the_installed_litellm_reads() -> None:
    missed = sorted(n for n in installed_litellm_params() if not is_litellm_param(n))
    assert missed == [], f"litellm reads parameters proxy/litellm_params.py does not list: {missed}"


def test_every_litellm_parameter_is_refused_and_nothing_reaches_the_attacker(tmp_path: Path, upstream: FakeUpstream, attacker: Attacker) -> None:
    names = sorted(installed_litellm_params())
    named_in_issue = {"fallbacks", "model_list", "deployment_id", "mock_response", "mock_tool_calls", "mock_timeout",
                      "mock_delay", "api_base", "base_url", "api_version", "custom_llm_provider", "num_retries", "timeout"}
    assert named_in_issue <= set(names)
    upstream.fail_next(500, count=10_000)  # a failing primary is what makes litellm try fallbacks
    with running_proxy(tmp_path, two_path_tenant(upstream.base_url)) as proxy, httpx.Client(timeout=30) as client:
        for model in MODELS:
            for name in names:
                for stream in (False, True) if name in named_in_issue else (False,):
                    body = {"model": model, "messages": USER, "stream": stream, name: hostile_value(name, attacker)}
                    response = client.post(proxy.base_url + "/chat/completions", json=body)
                    assert response.status_code == 400, (model, name, response.text)
                    error = response.json()["error"]
                    assert error["param"] == name and error["code"] == "forbidden_field", (model, name, error)
            body = {"model": model, "input": "hi", "fallbacks": hostile_value("fallbacks", attacker)}
            response = client.post(proxy.base_url + "/embeddings", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == "fallbacks"
    assert attacker.requests == []
    assert upstream.requests == []  # refused at the edge: no provider call at all


# Places the allow-list lets a client put arbitrary JSON: they travel as JSON only.
NESTED = {
    "message field": {"messages": [{"role": "user", "content": "hi", "api_base": "{a}", "fallbacks": [{"model": "openai/m1", "api_base": "{a}"}]}]},
    "content part": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "api_base": "{a}", "mock_response": "x"}]}]},
    "stream_options": {"stream_options": {"include_usage": True, "api_base": "{a}"}, "stream": True},
    "response_format": {"response_format": {"type": "text", "api_base": "{a}", "fallbacks": [{"model": "openai/m1", "api_base": "{a}"}]}},
    "tool": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "api_base": "{a}"}, "api_base": "{a}"}]},
    "web_search_options": {"web_search_options": {"api_base": "{a}"}},
    "prediction": {"prediction": {"type": "content", "content": "x", "api_base": "{a}"}},
    "metadata": {"metadata": {"api_base": "{a}", "fallbacks": "{a}"}},
}


def _with_attacker(value, url: str):
    if isinstance(value, str):
        return value.replace("{a}", url + "/v1")
    if isinstance(value, list):
        return [_with_attacker(v, url) for v in value]
    if isinstance(value, dict):
        return {k: _with_attacker(v, url) for k, v in value.items()}
    return value


@pytest.mark.parametrize("placement", sorted(NESTED))
def test_nested_placements_travel_as_json_and_never_redirect(tmp_path: Path, upstream: FakeUpstream, attacker: Attacker, placement: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_proxy(tmp_path, two_path_tenant(upstream.base_url)) as proxy:
        for model in MODELS:
            body = {"model": model, "messages": USER} | _with_attacker(NESTED[placement], attacker.url)
            upstream.fail_next(500)  # litellm would now try a fallback, if it had read one
            failed = post(proxy, body)
            assert failed.status_code in (500, 502), failed.text
            answered = post(proxy, body)
            assert answered.status_code == 200, answered.text
            assert "attacker answer" not in answered.text
            assert UPSTREAM_KEY not in failed.text + answered.text
    assert attacker.requests == []
    assert all(auth == f"Bearer {UPSTREAM_KEY}" for auth in upstream.auth_headers)
    assert caplog.records and UPSTREAM_KEY not in caplog.text  # logged at DEBUG, litellm's included


def test_passthrough_fields_reach_the_provider_as_json_on_both_paths(tmp_path: Path, upstream: FakeUpstream, attacker: Attacker) -> None:
    tenant = two_path_tenant(upstream.base_url, passthrough_fields=["top_k", "cache_hint"])
    with running_proxy(tmp_path, tenant) as proxy:
        for model in MODELS:
            hint = {"api_base": attacker.url + "/v1", "fallbacks": [{"model": "openai/m1", "api_base": attacker.url + "/v1"}]}
            response = post(proxy, {"model": model, "messages": USER, "top_k": 5, "cache_hint": hint})
            assert response.status_code == 200, response.text
            sent = upstream.chat_requests[-1]
            assert sent["top_k"] == 5 and sent["cache_hint"] == hint  # forwarded verbatim, as data
            refused = post(proxy, {"model": model, "messages": USER, "other_extension": 1})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "other_extension"
            assert refused.json()["error"]["code"] == "unknown_field"
    assert attacker.requests == []


@pytest.mark.parametrize("name", ["fallbacks", "api_base", "mock_response", "aws_secret_access_key", "extra_body", "temperature", "bad name"])
def test_passthrough_fields_cannot_name_a_litellm_parameter(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path, {"local": two_path_tenant("http://127.0.0.1:9/v1", passthrough_fields=[name])})
    with pytest.raises(ConfigError, match=r"local\.yaml: passthrough_fields: "):
        load_config(path)


def test_the_allow_list_has_every_field_of_the_openai_sdk() -> None:
    """Every request field the official SDK can send is forwarded (a newer SDK that adds one makes
    this fail, rather than its users' requests)."""
    from openai.types import embedding_create_params
    from openai.types.chat import completion_create_params

    chat = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert chat - set(CHAT_COMPLETIONS.fields) == set()
    assert set(embedding_create_params.EmbeddingCreateParams.__annotations__) - set(EMBEDDINGS.fields) == set()
    assert not any(is_litellm_param(name) for name in chat)
