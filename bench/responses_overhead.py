"""Added latency of /v1/responses over /v1/chat/completions through the proxy, same conversation.

    python bench/responses_overhead.py [--requests 200] [--rounds 3]

The proxy runs as a real process (`agent-state-proxy serve`), the fake upstream as another,
both on free local ports. Each request is the same conversation (a system prompt, 20 turns,
one function tool) sent as a Chat Completions body or as the equivalent Responses body (with
``store: false``, as Codex sends, and with the default ``store: true``, whose response id is
written durably before the response completes), each to a fresh session (so every request
does the same work: new session, reconcile, record). The three rotate request by request, JSON and SSE (timed to the last byte);
reported: the median over rounds of each round's p50 and p90, and the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import REPO, ProxyProcess, free_port, open_tenant, write_config  # noqa: E402

SYSTEM = "You are a benchmark assistant. " * 10
TURNS = [(f"question {i}: " + "words " * 30, f"answer {i}: " + "more words " * 20) for i in range(10)]
TOOL = {"name": "lookup", "description": "Look a thing up", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def chat_body(stream: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in TURNS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": "last question"})
    body = {"model": "fake-model", "messages": messages, "tools": [{"type": "function", "function": TOOL}]}
    return body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})


def responses_body(stream: bool, store: bool = True) -> dict:
    items = []
    for question, answer in TURNS:
        items += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    items.append({"role": "user", "content": "last question"})
    body = {"model": "fake-model", "instructions": SYSTEM, "input": items, "tools": [{"type": "function", **TOOL}], "store": store}
    return body | ({"stream": True} if stream else {})


def timed(client: httpx.Client, path: str, body: dict) -> float:
    started = time.perf_counter()
    with client.stream("POST", path, json=body, headers={"X-Session-ID": "bench-" + uuid.uuid4().hex}) as response:
        for _ in response.iter_bytes():
            pass
        response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(requests: int, rounds: int) -> dict:
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    directory = Path(tempfile.mkdtemp(prefix="asp-responses-bench-"))
    tenant = open_tenant(f"http://127.0.0.1:{port}/v1", memory={"enabled": False})
    tenant["models"]["*"]["api_key"] = "x"
    proxy = ProxyProcess(write_config(directory, {"bench": tenant})).start()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            for stream in (False, True):  # warm both paths (imports, tokenizer, pools)
                for _ in range(20):
                    timed(client, "/v1/chat/completions", chat_body(stream))
                    timed(client, "/v1/responses", responses_body(stream))
            for _ in range(rounds):
                for stream in (False, True):
                    samples: dict[str, list[float]] = {"chat": [], "responses store=false": [], "responses": []}
                    bodies = {"chat": ("/v1/chat/completions", chat_body(stream)),
                              "responses store=false": ("/v1/responses", responses_body(stream, store=False)),
                              "responses": ("/v1/responses", responses_body(stream))}
                    for index in range(requests):
                        order = list(bodies)
                        order = order[index % 3:] + order[:index % 3]  # each position as often
                        for name in order:
                            samples[name].append(timed(client, *bodies[name]))
                    kind = "SSE" if stream else "JSON"
                    for name, values in samples.items():
                        row = results.setdefault(f"{name} {kind}", {"p50": [], "p90": []})
                        row["p50"].append(statistics.median(values))
                        row["p90"].append(percentile(values, 0.9))
    finally:
        proxy.stop()
        fake.terminate()
        fake.wait(10)
    return {key: {stat: round(statistics.median(v), 3) for stat, v in row.items()} for key, row in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint and mode in each round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    summary = run(args.requests, args.rounds)
    for kind in ("JSON", "SSE"):
        chat = summary[f"chat {kind}"]
        for name in ("responses store=false", "responses"):
            summary[f"added by {name} {kind}"] = {stat: round(summary[f"{name} {kind}"][stat] - chat[stat], 3) for stat in ("p50", "p90")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
