"""Prompt-cache cost of long conversations: the client alone vs through the proxy.

Providers bill the prefix a prompt shares with the session's previous one at a discount
(cached price 0.1 for Anthropic and newer OpenAI models, 0.5 for older OpenAI ones). Each
request is billed ``cached × price + (prompt − cached) × 1`` token-equivalents, with ``prompt``
and ``cached`` exactly as the fake upstream reports them (tests/fake_upstream.py:
characters ÷ 4; cached = the longest common prefix with the previous request of the same
prompt cache). The client resends its whole history every turn, once straight to the fake
upstream and once through the proxy (in-process, LMDB in a temporary directory, default
context configuration: the model is unknown to litellm, so an 8192-token window and a
5120-token prompt budget), with long-term memory on and off, in the same run.

Conversations:
- ``synthetic-400``: 400 turns of ~60 words (user ~25, assistant ~35), an early decision at
  turn 3 ("we will use PostgreSQL 16 for the billing ledger");
- ``locomo-<id>``: a LoCoMo dev conversation (/work/shared/data/locomo/locomo-dev.json, see its
  README), its sessions back to back, speaker A as the user, the other speaker's lines scripted.

Reports per quarter of each conversation: billed token-equivalents at cached prices 0.1 and 0.5
(client, proxy, proxy ÷ client), the median prefix-reuse share (cached ÷ prompt), the mean
forwarded prompt; at the end, the last forwarded prompt against the full history and whether
the early decision is still in it.

    PYTHONPATH=. python bench/cache_cost.py [--turns 400] [--locomo conv-41] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.context_bench import DATA, dialogue  # noqa: E402
from proxy.server import keys  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import context_settled, open_tenant, start_thread, write_config  # noqa: E402

MODEL = "fake-model"
PRICES = (0.1, 0.5)
DECISION = "Decision: we will use PostgreSQL 16 for the billing ledger, and that is final."
_WORDS = ("invoice ledger account balance report export schedule retry queue worker tenant region latency cache index "
          "shard replica backup restore migration schema column table metric alert budget forecast vendor contract "
          "review release branch deploy rollback feature flag customer support ticket refund payment currency rate").split()


def synthetic(turns: int, seed: int = 7) -> tuple[dict[str, str], list[dict[str, str]]]:
    """A long agent conversation: ~60 words a turn, one decision early on."""
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are a careful engineering assistant for the billing team."}
    messages: list[dict[str, str]] = []
    for t in range(turns):
        topic = " ".join(rng.choice(_WORDS) for _ in range(20))
        user = DECISION if t == 3 else f"Turn {t}: about the {rng.choice(_WORDS)} work, {topic}?"
        answer = " ".join(rng.choice(_WORDS) for _ in range(33))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f"Answer {t}: {answer}."}]
    return system, messages


def converse(client: httpx.Client, url: str, fake: FakeUpstream, session: str, system: dict[str, str],
             messages: list[dict[str, str]], proxy: Any = None) -> list[dict[str, Any]]:
    """Every user turn with the whole history so far; per request the fake's usage and what it received."""
    history: list[dict[str, str]] = [system]
    rows = []
    for index, message in enumerate(messages):
        if message["role"] != "user":
            continue
        reply = messages[index + 1]["content"] if index + 1 < len(messages) and messages[index + 1]["role"] == "assistant" else "ok"
        fake.script_reply(reply)
        history.append(message)
        response = client.post(f"{url}/chat/completions", json={"model": MODEL, "messages": history},
                               headers={"X-Session-ID": session})
        response.raise_for_status()
        answer = response.json()
        history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        usage = answer["usage"]
        forwarded = fake.chat_requests[-1]
        rows.append({
            "prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"],
            "proxy_cached": int(response.headers.get("x-context-cached-tokens", "-1")),
            "decision": any(DECISION[10:45] in str(m.get("content")) for m in forwarded["messages"]),
        })
        fake.requests.clear()
        if proxy is not None:
            # A model takes seconds to answer: the proxy's background work (summaries, memory
            # indexing) is done before the agent's next turn.
            pipeline = proxy.app[keys.PIPELINE]
            context_settled(proxy)
            if pipeline.memory is not None:
                proxy.call(pipeline.memory.drain(), timeout=120)
    return rows


def cost(rows: list[dict[str, Any]], price: float) -> float:
    return sum(r["cached"] * price + (r["prompt"] - r["cached"]) for r in rows)


def quarters(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    n = len(rows)
    return [rows[n * q // 4:n * (q + 1) // 4] for q in range(4)]


def compare(client_rows: list[dict[str, Any]], proxy_rows: list[dict[str, Any]]) -> dict[str, Any]:
    def part(c: list[dict[str, Any]], p: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": len(p)}
        for price in PRICES:
            out[f"client@{price}"] = round(cost(c, price))
            out[f"proxy@{price}"] = round(cost(p, price))
            out[f"ratio@{price}"] = round(cost(p, price) / cost(c, price), 3)
        out["reuse_client"] = round(statistics.median(r["cached"] / r["prompt"] for r in c), 3)
        out["reuse_proxy"] = round(statistics.median(r["cached"] / r["prompt"] for r in p), 3)
        out["prompt_proxy_mean"] = round(statistics.mean(r["prompt"] for r in p))
        out["prompt_client_mean"] = round(statistics.mean(r["prompt"] for r in c))
        return out

    result = {"all": part(client_rows, proxy_rows)}
    result["quarters"] = [part(c, p) for c, p in zip(quarters(client_rows), quarters(proxy_rows))]
    result["final_prompt"] = proxy_rows[-1]["prompt"]
    result["final_history"] = client_rows[-1]["prompt"]
    result["final_share"] = round(proxy_rows[-1]["prompt"] / client_rows[-1]["prompt"], 3)
    result["decision_at_end"] = proxy_rows[-1]["decision"] if any(r["decision"] for r in client_rows) else None
    result["accounting_matches"] = all(r["proxy_cached"] == r["cached"] for r in proxy_rows)
    return result


def run(conversations: dict[str, tuple[dict[str, str], list[dict[str, str]]]], context: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir, FakeUpstream.run_in_thread() as fake, httpx.Client(timeout=120) as client:
        baseline = {}
        for name, (system, messages) in conversations.items():
            started = time.perf_counter()
            baseline[name] = converse(client, fake.base_url, fake, f"client-{name}", system, messages)
            print(f"# client alone, {name}: {len(baseline[name])} requests, {time.perf_counter() - started:.1f} s", flush=True)
        for memory in (True, False):
            tenant = open_tenant(fake.base_url, memory={"enabled": memory}, context={"prompt_cache_key": True, **context})
            directory = Path(workdir) / ("memory" if memory else "plain")
            directory.mkdir()
            with start_thread(write_config(directory, {"bench": tenant})) as proxy:
                if memory:
                    from tests.memory_helpers import drain

                    drain(proxy)
                for name, (system, messages) in conversations.items():
                    started = time.perf_counter()
                    rows = converse(client, proxy.base_url, fake, name, system, messages, proxy)
                    key = f"{name}, memory {'on' if memory else 'off'}"
                    results[key] = compare(baseline[name], rows)
                    results[key]["seconds"] = round(time.perf_counter() - started, 1)
                    print(f"# {key}: {json.dumps(results[key]['all'])}", flush=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| conversation | part | requests | client @0.1 | proxy @0.1 | proxy ÷ client @0.1 | proxy ÷ client @0.5 "
             "| prefix reuse client / proxy | mean prompt client / proxy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, result in results.items():
        parts = [("all", result["all"])] + [(f"Q{q + 1}", part) for q, part in enumerate(result["quarters"])]
        for label, part in parts:
            lines.append(
                f"| {key} | {label} | {part['requests']} | {part['client@0.1']:,} | {part['proxy@0.1']:,} | {part['ratio@0.1']:.2f} "
                f"| {part['ratio@0.5']:.2f} | {part['reuse_client']:.0%} / {part['reuse_proxy']:.0%} "
                f"| {part['prompt_client_mean']:,} / {part['prompt_proxy_mean']:,} |")
    lines += ["", "| conversation | final prompt (proxy) | full history | share | early decision kept | proxy's cached-token accounting = upstream's | seconds |",
              "|---|---:|---:|---:|---|---|---:|"]
    for key, result in results.items():
        lines.append(f"| {key} | {result['final_prompt']:,} | {result['final_history']:,} | {result['final_share']:.0%} "
                     f"| {_yes(result['decision_at_end'])} | {'yes' if result['accounting_matches'] else 'no'} | {result['seconds']} |")
    return "\n".join(lines)


def _yes(value: bool | None) -> str:
    return "—" if value is None else "yes" if value else "no"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=400, help="turns of the synthetic conversation")
    parser.add_argument("--locomo", default="conv-41", help="LoCoMo dev conversation id ('' to skip)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--context", default="{}", help="extra tenant context settings, JSON (e.g. '{\"low_water\": 0.4}')")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    conversations = {f"synthetic-{args.turns}": synthetic(args.turns)}
    if args.locomo:
        sample = next(s for s in json.loads(args.data.read_text()) if s["sample_id"] == args.locomo)
        conversations[f"locomo-{args.locomo}"] = dialogue(sample)
    results = run(conversations, json.loads(args.context))
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
