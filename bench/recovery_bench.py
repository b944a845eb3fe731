"""Recovery time: process start → first served request, with 10k sessions and 1M messages stored.

    python bench/recovery_bench.py [--sessions 10000] [--messages-per-session 100] [--rounds 5]

Builds the store once (through the proxy's own LMDB store), then repeatedly
starts `agent-state-proxy serve` on it, SIGKILLs it, and measures from spawn to /ready and to the
first chat answer for a stored session whose history must be restored (the lazy per-session
recovery path). Prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import transcript  # noqa: E402
from proxy.records import Message, Session  # noqa: E402
from proxy.storage.base import Write  # noqa: E402
from proxy.storage.lmdb_store import LmdbStore  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402


def build(path: Path, sessions: int, per_session: int) -> None:
    asyncio.run(_build(path, sessions, per_session))


async def _build(path: Path, sessions: int, per_session: int) -> None:
    """Write the sessions through the store's own interface, many sessions per transaction."""
    store = LmdbStore.open(str(path), map_size=4 << 30)
    now = time.time()
    batch: list[Write] = []
    for s in range(sessions):
        sid = f"session-{s}"
        chain, parent = transcript.ROOT_CHAIN, None
        messages = []
        for seq in range(per_session):
            role = "user" if seq % 2 == 0 else "assistant"
            body = {"role": role, "content": f"message {seq} of {sid}: " + "lorem ipsum dolor sit amet " * 6}
            chain = transcript.chain_hash(chain, body)
            messages.append(Message(seq=seq, parent=parent, chain=chain, role=role, body=body, ts=now, tokens=40))
            parent = seq
        session = Session(tenant="local", id=sid, created_at=now, last_active=now, head=per_session - 1, next_seq=per_session, turns=per_session // 2)
        batch.append(Write("local", session, messages))
        if len(batch) * per_session >= 50_000:
            await store.apply(batch)
            batch.clear()
    await store.apply(batch)
    await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--messages-per-session", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="recovery-"))
    with FakeUpstream.run_in_thread() as upstream:
        # Memory off: the store is written directly, without the memory index marks the proxy keeps,
        # so a memory-enabled proxy would (rightly) start re-indexing all 1M messages in the background.
        config = write_config(directory, {"local": open_tenant(upstream.base_url, memory={"enabled": False})})
        started = time.monotonic()
        build(directory / "data" / "lmdb", args.sessions, args.messages_per_session)
        build_seconds = time.monotonic() - started
        ready, first = [], []
        for round_ in range(args.rounds):
            proxy = ProxyProcess(config)
            spawn = time.monotonic()
            proxy.start(timeout=60)
            ready.append(time.monotonic() - spawn)
            sid = f"session-{(round_ * 7919) % args.sessions}"
            answer = httpx.post(f"{proxy.base_url}/chat/completions", headers={"X-Session-ID": sid},
                                json={"model": "fake-model", "messages": [{"role": "user", "content": "where were we?"}]}, timeout=30)
            answer.raise_for_status()
            first.append(time.monotonic() - spawn)
            # Restored from the store (and then fitted to the token budget by context management).
            assert answer.headers["X-History-Restored"] == str(args.messages_per_session), "history not restored"
            proxy.kill()
    size = sum(f.stat().st_size for f in (directory / "data" / "lmdb").iterdir())
    print(json.dumps({
        "sessions": args.sessions,
        "messages": args.sessions * args.messages_per_session,
        "store_bytes": size,
        "build_seconds": round(build_seconds, 1),
        "spawn_to_ready_p50_s": round(statistics.median(ready), 3),
        "spawn_to_first_answer_p50_s": round(statistics.median(first), 3),
        "spawn_to_first_answer_max_s": round(max(first), 3),
        "rounds": args.rounds,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
