"""Cost of the edge validation on a typical chat request (docs/SECURITY.md).

    python -m bench.validate_bench

A 50-message and a 1,000-message agent conversation (system prompt, user/assistant turns, tool
calls and results, two tools): orjson parsing alone, then the depth bound, then the allow-list
and schema check (proxy/validate.py), each per request, best of 5 runs.
"""

from __future__ import annotations

import json
import timeit

import orjson

from proxy.config import RequestLimits
from proxy.validate import chat_body, check_depth


def typical_body(messages: int = 50) -> bytes:
    turns: list[dict] = [{"role": "system", "content": "You are a careful coding agent. " * 20}]
    while len(turns) < messages - 1:
        n = len(turns)
        turns.append({"role": "user", "content": f"Step {n}: please look at the failing test and explain what goes wrong there. " * 3})
        turns.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{n}", "type": "function", "function": {"name": "read_file", "arguments": json.dumps({"path": f"src/mod{n}.py"})}}]})
        turns.append({"role": "tool", "tool_call_id": f"call_{n}", "content": "def f(x):\n    return x + 1\n" * 15})
        turns.append({"role": "assistant", "content": f"The function in mod{n} adds one; the test expects two. " * 4})
    turns = turns[: messages - 1] + [{"role": "user", "content": "Now fix it."}]
    tool = {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository",
                                             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    return orjson.dumps({"model": "gpt-4o-mini", "messages": turns, "tools": [tool, tool | {"function": tool["function"] | {"name": "write_file"}}],
                         "temperature": 0.2, "stream": True, "stream_options": {"include_usage": True}, "metadata": {"session_id": "task-42"}})


def per_call_us(statement, number: int = 2000) -> float:
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def main() -> None:
    limits = RequestLimits()
    # 50 messages: a typical agent request; 1,000: a 500-turn session resent whole (the "full"
    # benchmark's sessions, docs/BENCHMARKS.md).
    for messages, number in ((50, 2000), (1000, 100)):
        raw = typical_body(messages)
        body = orjson.loads(raw)
        parse = per_call_us(lambda: orjson.loads(raw), number)
        depth = per_call_us(lambda: check_depth(body), number)
        schema = per_call_us(lambda: chat_body(body, limits), number)
        print(f"{messages}-message body, {len(raw)} bytes")
        print(f"  orjson.loads           {parse:8.1f} us")
        print(f"  depth bound (64)       {depth:8.1f} us")
        print(f"  allow-list + schema    {schema:8.1f} us")
        print(f"  validation total       {depth + schema:8.1f} us  ({(depth + schema) / parse:.1f}x the parse)")


if __name__ == "__main__":
    main()
