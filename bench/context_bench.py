"""Context management on LoCoMo: tokens sent vs the full history, pinned facts kept, assembly latency.

Replays the LoCoMo dev conversations (/work/shared/data/locomo/locomo-dev.json) through the
real proxy (in-process, LMDB in a temporary directory) against the fake upstream, which plays
the other speaker. The client is an agent that resends its whole history every turn, so the
proxy's context management is what keeps each request within ``--budget`` prompt tokens.
No summarizer model is configured: summaries are the extractive fallback (no LLM offline).

Reports per conversation, at its last request: prompt tokens sent vs the full history, the
share of importance-pinned messages still present in what was sent (verbatim, or quoted in a
summary), and the largest request; then the latency of context assembly on a 500-turn
session whose summaries already exist (the ``assemble`` function alone, and the whole context
stage ``ContextManager.shape``).

    PYTHONPATH=. /work/venv/bin/python bench/context_bench.py [--budget 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import tokens  # noqa: E402
from proxy.context import importance  # noqa: E402
from proxy.context.assemble import assemble  # noqa: E402
from proxy.context.budget import request_overhead  # noqa: E402
from proxy.context.manager import policy_for  # noqa: E402
from proxy.context.units import build_view  # noqa: E402
from proxy.server import keys  # noqa: E402
from proxy.sessions import SessionRef  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import context_settled, open_tenant, start_thread, write_config  # noqa: E402

DATA = Path("/work/shared/data/locomo/locomo-dev.json")
MODEL = "fake-model"
ENCODING = tokens.encoding_for("openai/" + MODEL)
RESERVE = 512
LATENCY_TURNS = 500


def prompt_tokens(body: dict[str, Any], encoding: str) -> int:
    """Prompt tokens of a whole chat request as the context budget counts them."""
    return request_overhead(body, encoding) + sum(tokens.count_message(m, encoding) for m in body.get("messages") or ())



def dialogue(sample: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(system prompt, alternating user/assistant messages): speaker_a is the user."""
    conversation = sample["conversation"]
    user, other = conversation["speaker_a"], conversation["speaker_b"]
    sessions = sorted((int(k.split("_")[1]) for k in conversation if re.fullmatch(r"session_\d+", k)))
    messages: list[dict[str, str]] = []
    for number in sessions:
        date = conversation.get(f"session_{number}_date_time", "")
        for position, turn in enumerate(conversation[f"session_{number}"]):
            text = turn["text"] + (f" [shares an image: {turn['blip_caption']}]" if turn.get("blip_caption") else "")
            if position == 0 and date:
                text = f"[{date}] {text}"
            role = "user" if turn["speaker"] == user else "assistant"
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
    if messages and messages[0]["role"] == "assistant":
        messages.insert(0, {"role": "user", "content": f"Hi {other}!"})
    system = {"role": "system", "content": f"You are {other}, chatting with your friend {user}. Stay in character."}
    return system, messages


def replay(client: httpx.Client, proxy_url: str, fake: FakeUpstream, session: str, system: dict[str, str],
           messages: list[dict[str, str]], budget: int) -> dict[str, Any]:
    """Send every user turn with the whole history so far; the fake answers with the script."""
    history: list[dict[str, str]] = [system]
    sent, full, counted = [], [], []
    last_forwarded: dict[str, Any] = {}
    for index, message in enumerate(messages):
        if message["role"] != "user":
            continue
        reply = messages[index + 1]["content"] if index + 1 < len(messages) else "ok"
        fake.script_reply(reply)
        history.append(message)
        response = client.post(f"{proxy_url}/v1/chat/completions", json={"model": MODEL, "messages": history},
                               headers={"X-Session-ID": session})
        response.raise_for_status()
        history.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
        last_forwarded = fake.chat_requests[-1]
        counted.append(prompt_tokens(last_forwarded, ENCODING))  # recounted from what the fake received
        sent.append(int(response.headers["x-context-tokens"]))
        full.append(sent[-1] + int(response.headers["x-context-tokens-saved"]))
        fake.requests.clear()
    return {"sent": sent, "full": full, "counted": counted, "last": last_forwarded, "requests": len(sent),
            "over_budget": sum(c > budget for c in counted), "history": history}


def pinned_share(view: dict[str, Any], forwarded: dict[str, Any]) -> tuple[int, float, float]:
    """(pinned messages, share sent verbatim, share sent verbatim or quoted in a summary)."""
    pinned = [m["body"] for m in view["messages"] if m["active"] and m.get("tags")]
    contents = {str(m.get("content")) for m in forwarded["messages"]}
    summary_text = " ".join(str(m.get("content")) for m in forwarded["messages"] if str(m.get("content")).startswith("<context-"))
    summary_text = " ".join(summary_text.split())
    verbatim = quoted = 0
    for body in pinned:
        text = str(body.get("content"))
        if text in contents:
            verbatim += 1
            quoted += 1
            continue
        sentences = [" ".join(s.split()) for s in re.findall(r"[^.!?\n]+[.!?]*", text)]
        if any(len(s) >= 20 and s[:200] in summary_text for s in sentences):
            quoted += 1
    n = len(pinned) or 1
    return len(pinned), verbatim / n, quoted / n


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency(proxy: Any, fake: FakeUpstream, client: httpx.Client, samples: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """A 500-turn session (LoCoMo conversations back to back), then time the context stage on it."""
    system, messages = dialogue(samples[0])
    for sample in samples[1:]:
        for message in dialogue(sample)[1]:
            if messages[-1]["role"] == message["role"]:  # keep turns alternating across conversations
                messages[-1] = {"role": message["role"], "content": messages[-1]["content"] + "\n" + message["content"]}
            else:
                messages.append(message)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    messages = messages[:users[LATENCY_TURNS - 1] + 2] if len(users) >= LATENCY_TURNS else messages
    history = replay(client, proxy.url, fake, "latency", system, messages, budget)["history"]
    pipeline = proxy.app[keys.PIPELINE]
    manager = pipeline.context
    context_settled(proxy)  # every background summary exists
    tenant = proxy.config.tenants["bench"]
    route = tenant.route(MODEL)
    ref = SessionRef("latency", False, None, "header")
    body = {"model": MODEL, "messages": [*history, {"role": "user", "content": "What did we talk about first?"}]}

    async def prepared():
        pipeline.context = None  # the turn as it is before the context stage
        try:
            return await pipeline.prepare(tenant, ref, dict(body), route)
        finally:
            pipeline.context = manager

    async def shaped() -> float:
        turn = await prepared()
        start = time.perf_counter()
        await manager.shape(turn)
        return (time.perf_counter() - start) * 1000

    shape_ms = [proxy.call(shaped()) for _ in range(100)]

    turn = proxy.call(prepared())
    settings = tenant.context
    items = manager._items(turn, turn.body["messages"], ENCODING, None)
    view = build_view(items, settings.segment_turns, importance.PRIORITY)
    available = proxy.call(manager._summaries_of(turn_ref(turn)))
    hint = (turn.session.extra.get("context") or {}).get("frontier")
    policy = policy_for(settings, budget)
    result = assemble(view, available, budget, policy, encoding=ENCODING, hint_seq=hint)

    async def timed() -> tuple[list[float], list[float]]:
        # On the proxy's own loop thread, so no other thread of this process competes for the GIL.
        assemble_ms, view_ms = [], []
        for _ in range(500):
            start = time.perf_counter()
            assemble(view, available, budget, policy, encoding=ENCODING, hint_seq=hint)
            assemble_ms.append((time.perf_counter() - start) * 1000)
        for _ in range(100):
            start = time.perf_counter()
            build_view(items, settings.segment_turns, importance.PRIORITY)
            view_ms.append((time.perf_counter() - start) * 1000)
        return assemble_ms, view_ms

    assemble_ms, view_ms = proxy.call(timed())
    return {
        "turns": sum(m["role"] == "user" for m in body["messages"]),
        "messages": len(body["messages"]),
        "summaries_available": len(available),
        "summaries_used": len(result.used),
        "missing": len(result.missing),
        "assemble_p50_ms": statistics.median(assemble_ms),
        "assemble_p95_ms": percentile(assemble_ms, 0.95),
        "view_p50_ms": statistics.median(view_ms),
        "shape_p50_ms": statistics.median(shape_ms),
        "shape_p95_ms": percentile(shape_ms, 0.95),
    }


def turn_ref(turn: Any) -> Any:
    from proxy.context.manager import _ref

    return _ref(turn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=1024, help="prompt-token budget (max_context_tokens minus the 512 reserve)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    samples = json.loads(args.data.read_text())
    results: dict[str, Any] = {"budget": args.budget, "conversations": []}
    with tempfile.TemporaryDirectory() as workdir, FakeUpstream.run_in_thread() as fake:
        tenant = open_tenant(fake.base_url) | {"context": {"max_context_tokens": args.budget + RESERVE, "reserve_completion_tokens": RESERVE}}
        with start_thread(write_config(Path(workdir), {"bench": tenant})) as proxy, httpx.Client(timeout=60) as client:
            for sample in samples:
                system, messages = dialogue(sample)
                session = sample["sample_id"]
                started = time.perf_counter()
                run = replay(client, proxy.url, fake, session, system, messages, args.budget)
                elapsed = time.perf_counter() - started
                context_settled(proxy)
                view = client.get(f"{proxy.url}/admin/sessions/{session}").json()
                pins, verbatim, quoted = pinned_share(view, run["last"])
                row = {
                    "conversation": session,
                    "requests": run["requests"],
                    "full_tokens_end": run["full"][-1],
                    "sent_tokens_end": run["sent"][-1],
                    "reduction_end": 1 - run["sent"][-1] / run["full"][-1],
                    "reduction_all": 1 - sum(run["sent"]) / sum(run["full"]),
                    "max_sent": max(run["counted"]),
                    "over_budget": run["over_budget"],
                    "pinned": pins,
                    "pinned_verbatim": verbatim,
                    "pinned_kept": quoted,
                    "summaries": len(view["summaries"]),
                    "seconds": elapsed,
                }
                results["conversations"].append(row)
                print(json.dumps(row), flush=True)
            if not args.skip_latency:
                results["latency"] = latency(proxy, fake, client, samples, args.budget)
                print(json.dumps(results["latency"]), flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Budget: {results['budget']} prompt tokens per request.",
        "",
        "| conversation | requests | full history at end | sent at end | reduction at end | reduction, all requests | largest request | over budget | pinned msgs | pinned sent verbatim | pinned kept (verbatim or in a summary) | summaries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["conversations"]:
        lines.append(
            f"| {r['conversation']} | {r['requests']} | {r['full_tokens_end']} | {r['sent_tokens_end']} | {r['reduction_end']:.1%} | "
            f"{r['reduction_all']:.1%} | {r['max_sent']} | {r['over_budget']} | {r['pinned']} | {r['pinned_verbatim']:.0%} | "
            f"{r['pinned_kept']:.0%} | {r['summaries']} |"
        )
    if "latency" in results:
        lat = results["latency"]
        lines += [
            "",
            f"Latency on a {lat['turns']}-turn session ({lat['messages']} messages, {lat['summaries_available']} summaries stored, "
            f"{lat['summaries_used']} sent): `assemble` p50 {lat['assemble_p50_ms']:.3f} ms, p95 {lat['assemble_p95_ms']:.3f} ms; "
            f"building the view p50 {lat['view_p50_ms']:.3f} ms; the whole context stage (`ContextManager.shape`) "
            f"p50 {lat['shape_p50_ms']:.2f} ms, p95 {lat['shape_p95_ms']:.2f} ms.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
