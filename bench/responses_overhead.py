"""Added latency of /v1/responses over /v1/chat/completions through the proxy, same conversation.

    python bench/responses_overhead.py [--requests 200] [--rounds 3] [--baseline REV] [--reply-words N]

The proxy runs as a real process (`agent-state-proxy serve`), the fake upstream as another,
both on free local ports. Each request is the same conversation (a system prompt, 20 turns,
one function tool) sent as a Chat Completions body or as the equivalent Responses body (with
``store: false``, as Codex sends, and with the default ``store: true``, whose response id is
written durably before the response completes), each to a fresh session (so every request
does the same work: new session, reconcile, record). For the pass-through question, the same
Responses body also goes to the fake upstream's own ``/v1/responses`` directly and through
a raw forwarder (bench/responses_forwarder.py: bytes in, bytes out, no state). With
``--baseline REV`` a second proxy runs that revision's tree (``git archive``) in the same run.
All variants rotate request by request, JSON and SSE (timed to the last byte); reported: the
median over rounds of each round's p50 and p90, the serving process's CPU per request (ms,
from /proc/PID/task/*/schedstat: all its threads, attributed to the request it ran during), and
the differences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import REPO, ProxyProcess, free_port, open_tenant, write_config  # noqa: E402

SYSTEM = "You are a benchmark assistant. " * 10
TURNS = [(f"question {i}: " + "words " * 30, f"answer {i}: " + "more words " * 20) for i in range(10)]
TOOL = {"name": "lookup", "description": "Look a thing up", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def last_question(reply_words: int) -> str:
    # The fake upstream echoes the last user message: N more words, N more streamed deltas.
    return "last question" + " word" * reply_words


def chat_body(stream: bool, reply_words: int = 0) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in TURNS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": last_question(reply_words)})
    body = {"model": "fake-model", "messages": messages, "tools": [{"type": "function", "function": TOOL}]}
    return body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})


def responses_body(stream: bool, store: bool = True, reply_words: int = 0) -> dict:
    items = []
    for question, answer in TURNS:
        items += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    items.append({"role": "user", "content": last_question(reply_words)})
    body = {"model": "fake-model", "instructions": SYSTEM, "input": items, "tools": [{"type": "function", **TOOL}], "store": store}
    return body | ({"stream": True} if stream else {})


def cpu_ms(pid: int) -> float:
    """CPU time of all the process's threads so far (ns-precise scheduler accounting)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
    return total / 1e6


def timed(client: httpx.Client, url: str, body: dict, pid: int) -> tuple[float, float]:
    """(ms to the last byte, ms of the serving process's CPU meanwhile)."""
    cpu = cpu_ms(pid)
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers={"X-Session-ID": "bench-" + uuid.uuid4().hex}) as response:
        for _ in response.iter_bytes():
            pass
        response.raise_for_status()
    return (time.perf_counter() - started) * 1000, cpu_ms(pid) - cpu


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited with {process.returncode} (logs in {tempfile.gettempdir()}/asp-responses-bench-*)")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url}: not ready after {timeout}s")


def baseline_tree(revision: str, workdir: Path) -> Path:
    """That revision's files, unpacked with ``git archive`` (no worktree, nothing to clean up in git)."""
    tree = workdir / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run(requests: int, rounds: int, baseline: str | None, reply_words: int) -> dict:
    port, forwarder_port = free_port(), free_port()
    processes: list[subprocess.Popen] = []
    directory = Path(tempfile.mkdtemp(prefix="asp-responses-bench-"))
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(fake)
    forwarder = subprocess.Popen([sys.executable, str(REPO / "bench" / "responses_forwarder.py"), "--port", str(forwarder_port),
                                  "--upstream", f"http://127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(forwarder)
    tenant = open_tenant(f"http://127.0.0.1:{port}/v1", memory={"enabled": False})
    tenant["models"]["*"]["api_key"] = "x"
    config = write_config(directory, {"bench": tenant})
    proxy = ProxyProcess(config).start()
    servers = {"": (proxy.url, proxy.process.pid)}
    results: dict[str, dict[str, list[float]]] = {}
    try:
        if baseline:
            other_port = free_port()
            # `python -m` puts the working directory first on sys.path: the baseline runs its own tree.
            (directory / "other").mkdir()  # a store of its own
            other_config = write_config(directory / "other", {"bench": tenant})
            with open(directory / "baseline.log", "wb") as log:
                other = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(other_config), "--port", str(other_port)],
                                         cwd=baseline_tree(baseline, directory), stdout=log, stderr=subprocess.STDOUT)
            processes.append(other)
            servers["baseline "] = (f"http://127.0.0.1:{other_port}", other.pid)
            wait_ready(f"http://127.0.0.1:{other_port}/ready", other)
        wait_ready(f"http://127.0.0.1:{port}/v1/models", fake)
        wait_ready(f"http://127.0.0.1:{forwarder_port}/", forwarder)

        def variants(stream: bool) -> dict[str, tuple[str, dict, int]]:
            found = {}
            for prefix, (url, pid) in servers.items():
                found |= {prefix + "chat": (url + "/v1/chat/completions", chat_body(stream, reply_words), pid),
                          prefix + "responses store=false": (url + "/v1/responses", responses_body(stream, False, reply_words), pid),
                          prefix + "responses": (url + "/v1/responses", responses_body(stream, True, reply_words), pid)}
            plain = responses_body(stream, False, reply_words)
            return found | {"pass-through forwarder": (f"http://127.0.0.1:{forwarder_port}/v1/responses", plain, forwarder.pid),
                            "upstream /v1/responses": (f"http://127.0.0.1:{port}/v1/responses", plain, fake.pid)}

        with httpx.Client(timeout=30) as client:
            for stream in (False, True):  # warm every path (imports, tokenizer, pools)
                for _ in range(20):
                    for target in variants(stream).values():
                        timed(client, *target)
            for _ in range(rounds):
                for stream in (False, True):
                    bodies = variants(stream)
                    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in bodies}
                    for index in range(requests):
                        order = list(bodies)
                        shift = index % len(order)
                        for name in order[shift:] + order[:shift]:  # each position as often
                            samples[name].append(timed(client, *bodies[name]))
                    kind = "SSE" if stream else "JSON"
                    for name, pairs in samples.items():
                        values = [ms for ms, _ in pairs]
                        row = results.setdefault(f"{name} {kind}", {"p50": [], "p90": [], "cpu": []})
                        row["p50"].append(statistics.median(values))
                        row["p90"].append(percentile(values, 0.9))
                        row["cpu"].append(statistics.fmean(cpu for _, cpu in pairs))
    finally:
        proxy.stop()
        for process in reversed(processes):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()
                process.wait()
        if sys.exc_info()[0] is None:
            shutil.rmtree(directory, ignore_errors=True)
    return {key: {stat: round(statistics.median(v), 3) for stat, v in row.items()} for key, row in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per variant and mode in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="also run this revision's proxy (a commit or branch) in the same run")
    parser.add_argument("--reply-words", type=int, default=0, help="words added to the last question (the reply echoes them)")
    args = parser.parse_args()
    summary = run(args.requests, args.rounds, args.baseline, args.reply_words)
    prefixes = ["", "baseline "] if args.baseline else [""]
    for kind in ("JSON", "SSE"):
        for prefix in prefixes:
            chat = summary[f"{prefix}chat {kind}"]
            for name in ("responses store=false", "responses"):
                summary[f"{prefix}added by {name} {kind}"] = {
                    stat: round(summary[f"{prefix}{name} {kind}"][stat] - chat[stat], 3) for stat in ("p50", "p90", "cpu")}
        hop = summary[f"upstream /v1/responses {kind}"]
        summary[f"added by the pass-through forwarder {kind}"] = {
            stat: round(summary[f"pass-through forwarder {kind}"][stat] - hop[stat], 3) for stat in ("p50", "p90")}
        summary[f"added by the proxy's translation path over the upstream {kind}"] = {
            stat: round(summary[f"responses store=false {kind}"][stat] - hop[stat], 3) for stat in ("p50", "p90")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
