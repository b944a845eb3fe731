"""Crash harness: kill -9 the proxy under concurrent SDK load, restart, audit what was acknowledged.

    python bench/crash_harness.py --kills 100 --mode sync
    python bench/crash_harness.py --kills 100 --mode hybrid

Each client thread runs its own conversations through the official openai SDK, resending its
full history like a real agent, and logs every acknowledged answer with the time it arrived.
After every restart the audit reads each session's active path from the admin API and checks:
every acknowledged turn is there (in hybrid mode: every critical one — tool calls — and the
routine ones except those acknowledged within the loss window before a kill), no user message
appears twice, and the path alternates user → assistant with the right answers (no interleaving).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "pay", "parameters": {"type": "object", "properties": {}}}}]


@dataclass
class Ack:
    session: str
    user: str
    answer: str | None
    critical: bool
    at: float


@dataclass
class Report:
    mode: str
    kills: int = 0
    acknowledged: int = 0
    critical_acknowledged: int = 0
    lost_critical: list[str] = field(default_factory=list)
    lost_routine_in_window: int = 0
    lost_routine_max_age_s: float = 0.0  # the oldest acknowledgement among the lost routine turns
    lost_routine_outside_window: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    interleaved: list[str] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost_critical or self.lost_routine_outside_window or self.duplicates or self.interleaved)


class Client(threading.Thread):
    def __init__(self, index: int, base_url: str, acks: list[Ack], stop: threading.Event, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.index, self.acks, self.stop, self.lock = index, acks, stop, lock
        self.sdk = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=5)
        self.conversation = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.conversation += 1
            session = f"c{self.index}-{self.conversation}"
            history: list[dict] = []
            for turn in range(random.randint(3, 8)):
                critical = turn % 3 == 2
                content = f"{session} turn {turn}" + (" CALL_TOOL:pay" if critical else "")
                history.append({"role": "user", "content": content})
                reply = self._ask(session, history, critical)
                if reply is None:
                    return
                message = reply.choices[0].message
                answer = {"role": "assistant", "content": message.content}
                if message.tool_calls:
                    answer["tool_calls"] = [c.model_dump() for c in message.tool_calls]
                with self.lock:
                    self.acks.append(Ack(session, content, message.content, critical, time.monotonic()))
                history.append(answer)
                if message.tool_calls:
                    history.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "paid"})

    def _ask(self, session: str, history: list[dict], critical: bool):
        while not self.stop.is_set():
            try:
                return self.sdk.chat.completions.create(
                    model="fake-model", messages=history, tools=TOOLS if critical else openai.NOT_GIVEN,
                    extra_headers={"X-Session-ID": session},
                )
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(0.05)  # the proxy is down (or restarting): retry the same turn
        return None


def audit(url: str, acks: list[Ack], kill_times: list[float], window: float, report: Report) -> None:
    sessions: dict[str, list[Ack]] = {}
    for ack in acks:
        sessions.setdefault(ack.session, []).append(ack)
    for session, session_acks in sessions.items():
        view = httpx.get(f"{url}/admin/sessions/{session}", timeout=10).json()
        path = [m for m in view.get("messages", []) if m.get("active")]
        users = [m["body"]["content"] for m in path if m["role"] == "user"]
        if len(users) != len(set(users)):
            report.duplicates.append(session)
        for previous, message in zip(path, path[1:]):
            if message["role"] == "assistant" and previous["role"] != "user":
                report.interleaved.append(session)
                break
            if message["role"] == "assistant" and message["body"].get("content") not in (None, f"echo: {previous['body']['content']}"):
                report.interleaved.append(session)
                break
        recorded = set(users)
        for ack in session_acks:
            if ack.user in recorded:
                continue
            if ack.critical or report.mode == "sync":
                report.lost_critical.append(ack.user)
            elif any(0 <= kill - ack.at <= window for kill in kill_times):
                report.lost_routine_in_window += 1
                age = min(kill - ack.at for kill in kill_times if kill >= ack.at)
                report.lost_routine_max_age_s = round(max(report.lost_routine_max_age_s, age), 4)
            else:
                report.lost_routine_outside_window.append(ack.user)


def run(kills: int, mode: str, clients: int = 4, directory: Path | None = None, window: float = 0.5, seed: int = 1) -> Report:
    random.seed(seed)
    report = Report(mode)
    directory = directory or Path(tempfile.mkdtemp(prefix="crash-"))
    with FakeUpstream.run_in_thread() as upstream:
        config = write_config(directory, {"local": open_tenant(upstream.base_url, persistence={"mode": mode})})
        proxy = ProxyProcess(config).start()
        acks: list[Ack] = []
        stop, lock = threading.Event(), threading.Lock()
        threads = [Client(i, proxy.base_url, acks, stop, lock) for i in range(clients)]
        for thread in threads:
            thread.start()
        kill_times: list[float] = []
        try:
            for _ in range(kills):
                time.sleep(random.uniform(0.2, 1.0))
                proxy.kill()
                kill_times.append(time.monotonic())
                started = time.monotonic()
                proxy.start()
                report.restart_seconds.append(time.monotonic() - started)
                report.kills += 1
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        with lock:
            final = list(acks)
        report.acknowledged = len(final)
        report.critical_acknowledged = sum(a.critical for a in final)
        audit(proxy.url, final, kill_times, window, report)
        assert proxy.stop() == 0, proxy.log()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--mode", choices=["sync", "hybrid", "async"], default="hybrid")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=float, default=0.5, help="loss window allowed for routine turns (s)")
    args = parser.parse_args()
    report = run(args.kills, args.mode, args.clients, window=args.window)
    restarts = sorted(report.restart_seconds)
    summary = {k: v for k, v in report.__dict__.items() if k != "restart_seconds"}
    summary["restart_to_ready_p50_s"] = round(restarts[len(restarts) // 2], 3) if restarts else None
    summary["restart_to_ready_max_s"] = round(restarts[-1], 3) if restarts else None
    summary["ok"] = report.ok
    print(json.dumps(summary, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
