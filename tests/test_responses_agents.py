"""The OpenAI Agents SDK in its default (Responses) mode through the proxy, over a chat upstream."""

from __future__ import annotations

import httpx
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from tests.fake_upstream import FakeUpstream

set_tracing_disabled(True)  # the SDK would export traces to api.openai.com


@function_tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return f"sunny in {city}"


def make_agent(proxy) -> Agent:
    model = OpenAIResponsesModel(model="fake-model", openai_client=AsyncOpenAI(base_url=proxy.base_url, api_key="any", max_retries=0))
    return Agent(name="helper", instructions="You answer weather questions.", tools=[get_weather], model=model)


def test_agent_with_a_tool_runs_then_continues_by_previous_response_id(proxy, upstream: FakeUpstream) -> None:
    agent = make_agent(proxy)
    upstream.script_tool_call("get_weather", {"city": "Lisbon"})
    upstream.script_reply("Lisbon is sunny.")
    first = Runner.run_sync(agent, "What's the weather in Lisbon?")
    assert first.final_output == "Lisbon is sunny."
    tool_turn = upstream.chat_requests[-1]["messages"]
    assert tool_turn[-1] == {"role": "tool", "tool_call_id": tool_turn[-2]["tool_calls"][0]["id"], "content": "sunny in Lisbon"}

    upstream.script_reply("Yes, take sunglasses.")
    second = Runner.run_sync(agent, "Should I take sunglasses?", previous_response_id=first.last_response_id)
    assert second.final_output == "Yes, take sunglasses."
    sent = upstream.chat_requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[4]["content"] == "Lisbon is sunny." and sent[5]["content"] == "Should I take sunglasses?"

    [session] = httpx.get(proxy.url + "/admin/sessions").json()["data"]  # both runs: one session
    assert session["head"] == 6
