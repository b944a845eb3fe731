"""Latency the proxy adds on /v1/messages (the direct Anthropic path) beside /v1/chat/completions
(the direct OpenAI path), same run, interleaved rounds.

Each fake upstream is called directly and through the proxy (a real `agent-state-proxy serve`
process, sessions recorded), with one growing conversation per round, c=1:

    python -m bench.messages_overhead --requests 200 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.fake_anthropic import FakeAnthropic
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, write_config

KEY = "bench-upstream-key"


def _timed(client: httpx.Client, url: str, body: dict, headers: dict[str, str]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(url, json=body, headers=headers)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000, response


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]


def _anthropic_reply(response: httpx.Response, stream: bool) -> list[dict]:
    """The assistant content as the client will resend it (so the proxy matches its history)."""
    if not stream:
        return response.json()["content"]
    text = "".join(e["delta"].get("text", "") for e in _events(response) if e.get("type") == "content_block_delta")
    return [{"type": "text", "text": text}]


def _chat_reply(response: httpx.Response, stream: bool) -> str:
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in _events(response) if c.get("choices"))


def _messages_round(client: httpx.Client, base: str, requests: int, session: str, stream: bool) -> list[float]:
    history: list[dict] = []
    times = []
    for turn in range(requests):
        history.append({"role": "user", "content": f"question {turn}: what changed since the last one?"})
        body = {"model": "claude-bench", "max_tokens": 64, "stream": stream, "messages": history}
        took, response = _timed(client, base + "/messages", body, {"x-api-key": KEY, "anthropic-version": "2023-06-01", "X-Session-ID": session})
        times.append(took)
        history.append({"role": "assistant", "content": _anthropic_reply(response, stream)})
    return times


def _chat_round(client: httpx.Client, base: str, requests: int, session: str, stream: bool) -> list[float]:
    history: list[dict] = []
    times = []
    for turn in range(requests):
        history.append({"role": "user", "content": f"question {turn}: what changed since the last one?"})
        body = {"model": "fake-model", "max_tokens": 64, "stream": stream, "messages": history}
        took, response = _timed(client, base + "/chat/completions", body, {"Authorization": f"Bearer {KEY}", "X-Session-ID": session})
        times.append(took)
        history.append({"role": "assistant", "content": _chat_reply(response, stream)})
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with FakeAnthropic.run_in_thread(api_key=KEY) as anthropic_fake, FakeUpstream.run_in_thread(expected_api_key=KEY) as chat_fake, \
            tempfile.TemporaryDirectory() as tmp:
        tenant = {"allow_unauthenticated": True, "context": {"strategy": []}, "models": {
            "claude-bench": {"model": "anthropic/claude-bench", "api_base": anthropic_fake.base_url, "api_key": KEY},
            "fake-model": {"model": "openai/fake-model", "api_base": chat_fake.base_url, "api_key": KEY}}}
        proxy = ProxyProcess(write_config(Path(tmp), {"local": tenant})).start()
        added: dict[str, list[float]] = {}
        try:
            with httpx.Client(timeout=60) as client:
                # Warm-up, discarded: the proxy imports litellm in the background at start
                # (the tenant has a non-direct route for chat), which takes seconds of CPU.
                time.sleep(10)
                for run, direct in ((_messages_round, anthropic_fake.base_url), (_chat_round, chat_fake.base_url)):
                    for target in (direct, proxy.base_url):
                        run(client, target, 20, "warm-up", False)
                for round_ in range(args.rounds):
                    for name, run, direct in (("messages", _messages_round, anthropic_fake.base_url), ("chat", _chat_round, chat_fake.base_url)):
                        for stream in (False, True):
                            label = f"{name} {'stream' if stream else 'json'}"
                            base = run(client, direct, args.requests, f"d-{round_}-{label}", stream)
                            through = run(client, proxy.base_url, args.requests, f"p-{round_}-{label}", stream)
                            added.setdefault(label + " p50", []).append(statistics.median(through) - statistics.median(base))
                            added.setdefault(label + " p99", []).append(_pct(through, 0.99) - _pct(base, 0.99))
        finally:
            proxy.stop()
    print(f"added latency, ms (median of {args.rounds} rounds of {args.requests} requests, c=1)")
    for label, values in added.items():
        print(f"  {label:22} {statistics.median(values):+7.2f}   rounds: {', '.join(f'{v:+.2f}' for v in values)}")


if __name__ == "__main__":
    main()
