"""Load generator process: aiohttp clients driven by JSON-line commands on stdin.

bench/run.py starts one of these and keeps it for the whole run, so the client never
shares a process (or an event loop) with any server. Each command runs one measurement
step against one target and answers one JSON line on stdout:

    {"op": "run", "target": "state", "url": "http://127.0.0.1:PORT/v1/chat/completions",
     "stream": false, "concurrency": 4, "duration": 3.0, "max_requests": 100000,
     "headers": {"Authorization": "Bearer x"}}
    -> {"n": 1234, "errors": 0, "error_sample": null, "elapsed": 3.01,
        "ttfb_ms": [...], "ttlb_ms": [...]}

``concurrency`` client streams run closed-loop (each sends its next request when the
previous one finished) until ``duration`` has passed and at least ``min_requests`` were
sent (never more than ``max_requests``). Conversations (bench/workload.py)
persist per target across steps, so sessions keep growing like a real agent's.

Optional fields: ``"urls": [...]`` spreads the requests over several replicas, round-robin;
``"workload": "window"`` with ``"stored_turns": N`` plays
RotatingWindows clients (the full target: a few long seeded sessions per stream);
``"extra_headers"`` are added to this target's requests. Each answer also counts the
requests whose response carried ``X-History-Restored`` (``"restored"``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Conversation, RotatingWindows, expected_reply, stream_prefix, window_sessions  # noqa: E402

_sessions: dict[str, aiohttp.ClientSession] = {}
_conversations: dict[str, list[Conversation | RotatingWindows]] = {}


def _http(target: str) -> aiohttp.ClientSession:
    if target not in _sessions:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        _sessions[target] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
    return _sessions[target]


async def _one(http: aiohttp.ClientSession, url: str, conv: Conversation | RotatingWindows, stream: bool, headers: dict[str, str]) -> tuple[float, float, bool] | str:
    """One chat request; (ttfb, ttlb in seconds, history restored), or an error description."""
    session_id, body, user_text = conv.next_request(stream)
    request_headers = {**headers, "Content-Type": "application/json", "X-Session-ID": session_id}
    reply = expected_reply(user_text)
    started = time.perf_counter()
    try:
        async with http.post(url, data=body, headers=request_headers) as response:
            restored = "X-History-Restored" in response.headers
            if response.status != 200:
                text = (await response.read())[:300].decode("utf-8", "replace")
                conv.abandon()
                return f"HTTP {response.status}: {text}"
            if stream:
                first: float | None = None
                tail = b""
                async for chunk in response.content.iter_any():
                    if first is None:
                        first = time.perf_counter()
                    tail = (tail + chunk)[-64:]
                done = time.perf_counter()
                if b"[DONE]" not in tail:
                    conv.abandon()
                    return f"stream ended without [DONE]: {tail!r}"
            else:
                raw = await response.read()
                first = done = time.perf_counter()
                content = orjson.loads(raw)["choices"][0]["message"]["content"]
                if content != reply:
                    conv.abandon()
                    return f"unexpected reply: {content[:120]!r}"
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError) as exc:
        conv.abandon()
        return f"{type(exc).__name__}: {exc}"
    conv.record_reply(user_text, reply)
    return (first or done) - started, done - started, restored


async def run_step(cmd: dict[str, Any]) -> dict[str, Any]:
    target, url, stream = cmd["target"], cmd["url"], bool(cmd.get("stream"))
    urls = list(cmd.get("urls") or [url])
    concurrency = int(cmd.get("concurrency", 1))
    duration = float(cmd.get("duration", 1.0))
    max_requests = int(cmd.get("max_requests", 10**9))
    min_requests = int(cmd.get("min_requests", 0))
    headers = dict(cmd.get("headers") or {}) | dict(cmd.get("extra_headers") or {})
    http = _http(target)
    convs = _conversations.setdefault(target, [])
    while len(convs) < concurrency:
        if cmd.get("workload") == "window":
            convs.append(RotatingWindows(window_sessions(cmd.get("run_id", "bench"), len(convs)), int(cmd["stored_turns"])))
        else:
            convs.append(Conversation(stream_prefix(cmd.get("run_id", "bench"), target, len(convs))))
    ttfb: list[float] = []
    ttlb: list[float] = []
    errors: list[str] = []
    restored = 0
    issued = 0
    started = time.perf_counter()
    deadline = started + duration

    async def stream_loop(conv: Conversation | RotatingWindows) -> None:
        nonlocal issued, restored
        while issued < max_requests and (time.perf_counter() < deadline or issued < min_requests):
            issued += 1
            # ``urls``: several replicas of one fleet, round-robin per request like a load balancer.
            result = await _one(http, urls[issued % len(urls)], conv, stream, headers)
            if isinstance(result, str):
                errors.append(result)
            else:
                ttfb.append(round(result[0] * 1000, 4))
                ttlb.append(round(result[1] * 1000, 4))
                restored += result[2]

    await asyncio.gather(*(stream_loop(convs[i]) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "n": len(ttlb),
        "errors": len(errors),
        "error_sample": errors[0] if errors else None,
        "elapsed": elapsed,
        "restored": restored,
        "ttfb_ms": ttfb,
        "ttlb_ms": ttlb,
    }


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    try:
        while line := await reader.readline():
            cmd = orjson.loads(line)
            if cmd.get("op") == "quit":
                break
            try:
                result = await run_step(cmd)
            except Exception as exc:  # report, never die silently mid-run
                result = {"fatal": f"{type(exc).__name__}: {exc}"}
            out.write(orjson.dumps(result) + b"\n")
            out.flush()
    finally:
        for http in _sessions.values():
            await http.close()


if __name__ == "__main__":
    asyncio.run(main())
