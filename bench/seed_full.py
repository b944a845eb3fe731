#!/usr/bin/env python
"""Seed the full target's store before its proxy starts: long sessions and 100k user memories.

What the "full" target of bench/run.py measures is a proxy at work for a user with a history:

* a few sessions per client stream (workload.window_sessions), each already holding ``turns`` turns (system prompt + 2 × turns
  messages, bench/workload.py ``long_history``), whose tail the client resends;
* ``memories`` long-term memories of that user (``workload.BENCH_USER``), enough to make
  user-scope retrieval search the HNSW index rather than the exact path (≤ 8192 vectors).

Everything is written through the proxy's own storage code (LmdbStore, Write, Record, the
record dataclasses, ``Memory.records``), as the proxy records it, in a few large
transactions. Memories are synthesised as bench/memory_latency.py does (1-3 LoCoMo sentences,
vector = normalised sum of their cached MiniLM vectors + a little noise): embedding 100k
texts would take ~15 min. They carry the local embedder's model name, so the proxy loads
them without re-embedding, and each seeded session gets its memory mark, so the proxy does
not re-index its seeded messages in the background: the memories stand in for that history.

    python bench/seed_full.py --config DIR/proxy.yaml --run-id r1 --streams 64
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from memory_latency import DATA, locomo_sentences, synthesise  # noqa: E402
from workload import BENCH_USER, MODEL, SYSTEM, filler, long_history, window_sessions  # noqa: E402

from proxy import tokens  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.context.importance import tag_message  # noqa: E402
from proxy.memory.remote import LOCAL_ENGINES  # noqa: E402
from proxy.memory.model import SEMANTIC, Memory  # noqa: E402
from proxy.memory.indexer import MARK_KEY, MARK_KIND  # noqa: E402
from proxy.records import Message, Session  # noqa: E402
from proxy.storage.base import Record, Write  # noqa: E402
from proxy.storage.lmdb_store import LmdbStore  # noqa: E402
from proxy.transcript import ROOT_CHAIN, chain_hash  # noqa: E402

CACHE_DIR = BENCH / "results"  # git-ignored
MESSAGES_PER_TXN = 20_000
MEMORIES_PER_TXN = 25_000
MEMORY_SPAN_DAYS = 90  # memories' timestamps spread over this past
TURN_SECONDS = 30.0  # seeded turns are this far apart


def model_name() -> str:
    """The name the proxy gives the default local embedder's vectors (MemoryService._model_name)."""
    return f"local/{LOCAL_ENGINES['local'].name}"


def session_ids(run_id: str, streams: int) -> list[str]:
    """The full target's sessions: a few per client stream (workload.window_sessions), named as
    bench/loadgen.py's clients will use them."""
    return [session for i in range(streams) for session in window_sessions(run_id, i)]


def seed(config_path: Path, tenant: str, sessions: list[str], turns: int, memories: int, cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """Write the sessions and memories into the store the proxy of ``config_path`` will open.

    Call before that proxy starts. Returns counts and timings (seconds)."""
    return asyncio.run(_seed(config_path, tenant, sessions, turns, memories, cache_dir))


async def _seed(config_path: Path, tenant: str, sessions: list[str], turns: int, memories: int, cache_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    config = load_config(config_path)
    settings = config.tenants[tenant]
    if not settings.memory.enabled or settings.memory.embedder != "local":
        raise ValueError(f"tenant {tenant!r}: seeding needs memory enabled with the local embedder")
    encoding = tokens.encoding_for(settings.route(MODEL).model)
    timings: dict[str, Any] = {"sessions": len(sessions), "turns": turns, "memories": memories}

    t0 = time.perf_counter()
    sentences, vectors = sentence_vectors(max(64, memories // 8), cache_dir)
    texts, matrix = synthesise(memories, sentences, vectors, np.random.default_rng(7))
    timings["synthesise_s"] = round(time.perf_counter() - t0, 2)

    # The proxy opens config.data_dir / "lmdb" (proxy/server/app.py).
    store = LmdbStore.open(str(config.data_dir / "lmdb"), map_size=config.map_size)
    try:
        t0 = time.perf_counter()
        now = time.time()
        batch: list[Write] = []
        for sid in sessions:
            batch.append(_session_write(tenant, sid, turns, encoding, now))
            if sum(len(w.messages) for w in batch) >= MESSAGES_PER_TXN:
                await store.apply(batch)
                batch = []
        if batch:
            await store.apply(batch)
        timings["sessions_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        name, span = model_name(), MEMORY_SPAN_DAYS * 86400 / max(memories, 1)
        for start in range(0, memories, MEMORIES_PER_TXN):
            records = [
                record
                for memory in (
                    Memory(id=_memory_id(i), type=SEMANTIC, text=texts[i], ts=now - (memories - i) * span, key=i,
                           user=BENCH_USER, model=name, vector=matrix[i])
                    for i in range(start, min(memories, start + MEMORIES_PER_TXN))
                )
                for record in memory.records()
            ]
            await store.apply([Write(tenant, records=records)])
        timings["memories_s"] = round(time.perf_counter() - t0, 2)
    finally:
        await store.close()
    timings["total_s"] = round(time.perf_counter() - started, 2)
    return timings


def _session_write(tenant: str, session_id: str, turns: int, encoding: str, now: float) -> Write:
    """One long session as pipeline._record would have recorded it turn by turn, with the memory
    mark saying every message is indexed (the seeded memories stand in for them)."""
    created = now - turns * TURN_SECONDS
    messages: list[Message] = []
    parent, chain = None, ROOT_CHAIN
    for seq, body in enumerate([SYSTEM] + long_history(session_id, turns)):
        chain = chain_hash(chain, body)
        assistant = body["role"] == "assistant"
        messages.append(Message(
            seq=seq, parent=parent, chain=chain, role=body["role"], body=body,
            ts=created + (seq + 1) // 2 * TURN_SECONDS, request_id=f"req-seed-{(seq + 1) // 2}",
            tokens=tokens.count_message(body, encoding), tokenizer=encoding, tags=tag_message(body),
            model=MODEL if assistant else None, finish_reason="stop" if assistant else None,
        ))
        parent = seq
    session = Session(tenant=tenant, id=session_id, created_at=created, last_active=messages[-1].ts, user_id=BENCH_USER,
                      head=parent, next_seq=len(messages), turns=turns)
    mark = Record(MARK_KIND, MARK_KEY, {"next": session.next_seq, "created": created}, session_id)
    return Write(tenant, session, messages, [mark])


def _memory_id(i: int) -> str:
    return "mem_" + hashlib.blake2b(f"seed-full\0{i}".encode(), digest_size=10).hexdigest()


def sentence_vectors(limit: int, cache_dir: Path) -> tuple[list[str], np.ndarray]:
    """Up to ``limit`` LoCoMo sentences and their MiniLM vectors, embedded once and cached.

    Without the LoCoMo file (e.g. in CI) deterministic filler sentences stand in."""
    if DATA.exists():
        sentences = locomo_sentences()[0][:limit]
    else:
        sentences = [filler(1000 + i, 80) for i in range(min(limit, 512))]
    digest = hashlib.blake2b((model_name() + "\n" + "\n".join(sentences)).encode(), digest_size=8).hexdigest()
    cache = cache_dir / f"seed-sentences-{len(sentences)}-{digest}.npy"
    if cache.exists():
        vectors = np.load(cache)
        if vectors.shape[0] == len(sentences):
            return sentences, vectors
    from proxy.memory.remote import local_model

    vectors = local_model().embed(sentences)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return sentences, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="proxy.yaml of the proxy that will serve the seeded store (not running yet)")
    parser.add_argument("--tenant", default="bench")
    parser.add_argument("--run-id", required=True, help="bench/run.py's run id: sessions are named <run-id>-full-c<i>")
    parser.add_argument("--streams", type=int, default=64, help="client streams (default 64; sessions: workload.window_sessions)")
    parser.add_argument("--turns", type=int, default=500, help="stored turns per session (default 500)")
    parser.add_argument("--memories", type=int, default=100_000, help="memories of the user (default 100000)")
    args = parser.parse_args()
    print(seed(args.config, args.tenant, session_ids(args.run_id, args.streams), args.turns, args.memories))


if __name__ == "__main__":
    main()
