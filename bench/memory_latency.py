"""Latency and size of long-term memory retrieval with 100k memories in one tenant.

Builds a tenant's memory (BM25, float32 copies, usearch HNSW f16) of N memories, then times
what the request path does for each query: embed it (the local MiniLM through the
EmbeddingBatcher, as the proxy does), search dense + lexical, fuse. Reports p50/p99 per scope
layout, HNSW build throughput, save/load time, memory per 100k memories and HNSW recall
against exact search.

    python bench/memory_latency.py                # 100k memories, ~5-8 min on 2 cores
    python bench/memory_latency.py --memories 20000 --queries 200

Memories are synthetic but realistic: 1-3 sentences drawn from the LoCoMo conversations, the
vector of a memory the normalised sum of its sentences' MiniLM vectors plus a little noise
(embedding 100k texts would take ~15 min and measure the embedder, not retrieval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.memory.embedder import EmbeddingBatcher  # noqa: E402
from proxy.memory.model import EPISODIC, Memory, Scope  # noqa: E402
from proxy.memory.remote import local_model  # noqa: E402
from proxy.memory.tenant import TenantMemory  # noqa: E402
from proxy.memory.vectors import VectorIndex  # noqa: E402

DATA = Path("/work/shared/data/locomo/locomo-dev.json")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def locomo_sentences() -> tuple[list[str], list[str]]:
    """The distinct sentences (over 12 characters) of every LoCoMo conversation, and its questions."""
    samples = json.loads(DATA.read_text())
    sentences, questions = [], []
    for sample in samples:
        conversation = sample["conversation"]
        for key, value in conversation.items():
            if re.fullmatch(r"session_\d+", key):
                for turn in value:
                    sentences += [s for s in re.split(r"(?<=[.!?])\s+", turn["text"]) if len(s) > 12]
        questions += [qa["question"] for qa in sample["qa"]]
    return list(dict.fromkeys(sentences)), questions


def corpus(model, cache: Path) -> tuple[list[str], np.ndarray, list[str]]:
    sentences, questions = locomo_sentences()
    if cache.exists():
        vectors = np.load(cache)
        if len(vectors) == len(sentences):
            return sentences, vectors, questions
    started = time.perf_counter()
    vectors = model.embed(sentences)
    print(f"embedded {len(sentences)} sentences in {time.perf_counter() - started:.1f} s "
          f"({len(sentences) / (time.perf_counter() - started):.0f} texts/s, batched, one thread)", file=sys.stderr)
    np.save(cache, vectors)
    return sentences, vectors, questions


def synthesise(n: int, sentences: list[str], vectors: np.ndarray, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    texts, out = [], np.empty((n, vectors.shape[1]), dtype=np.float32)
    for i in range(n):
        parts = rng.integers(0, len(sentences), size=int(rng.integers(1, 4)))
        vector = vectors[parts].sum(axis=0) + rng.standard_normal(vectors.shape[1]).astype(np.float32) * 0.02
        out[i] = vector / np.linalg.norm(vector)
        texts.append(" ".join(sentences[p] for p in parts))
    return texts, out


def build(users: int, texts: list[str], all_vectors: np.ndarray) -> TenantMemory:
    mem = TenantMemory("bench")
    for i, text in enumerate(texts):
        user = f"user-{i % users}"
        mem.insert(Memory(id=f"m{i}", type=EPISODIC, text=text, ts=time.time() - i, key=i, user=user,
                          session=f"{user}-s{i // 50}", session_created=0.0, seq=i % 50,
                          role="user" if i % 2 == 0 else "assistant", vector=all_vectors[i]))
    return mem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "asp-memory-bench-sentences.npy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    model = local_model()
    sentences, vectors, questions = corpus(model, args.cache)
    questions = [questions[i] for i in rng.permutation(len(questions))[: args.queries]]
    results: dict[str, object] = {"memories": args.memories, "queries": len(questions)}

    texts, all_vectors = synthesise(args.memories, sentences, vectors, rng)
    base = rss_bytes()
    started = time.perf_counter()
    single = build(1, texts, all_vectors)
    results["ingest_structures_per_s"] = round(args.memories / (time.perf_counter() - started))
    results["rss_structures_per_100k_mb"] = round((rss_bytes() - base) / 2**20 * 100_000 / args.memories, 1)

    index = VectorIndex(vectors.shape[1], "f16")
    keys = np.arange(args.memories, dtype=np.uint64)
    started = time.perf_counter()
    index.add(keys, all_vectors)  # one writer thread, one vector per lock hold, as the proxy does
    seconds = time.perf_counter() - started
    results["hnsw_build_per_s"] = round(args.memories / seconds)
    results["hnsw_build_s"] = round(seconds, 1)
    results["mirror_bytes_per_100k_mb"] = round(single.mirror.nbytes() / args.memories * 100_000 / 2**20, 1)
    results["rss_total_per_100k_mb"] = round((rss_bytes() - base) / 2**20 * 100_000 / args.memories, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.usearch"
        started = time.perf_counter()
        digest = index.save(path)
        results["save_s"] = round(time.perf_counter() - started, 2)
        results["file_mb"] = round(path.stat().st_size / 2**20, 1)
        started = time.perf_counter()
        VectorIndex.load(path, digest, vectors.shape[1], "f16")
        results["load_s"] = round(time.perf_counter() - started, 2)
    single.vectors, single.hnsw_ready = index, True

    # Same memories, spread over users: user scopes are small enough for exact search.
    spread = build(100, texts, all_vectors)
    spread.vectors, spread.hnsw_ready = index, True

    async def timed(mem: TenantMemory, scope_of) -> dict[str, float]:
        async with EmbeddingBatcher(model, max_batch=16) as batcher:
            await batcher.embed("warm up")
            total, embed, search = [], [], []
            for i, question in enumerate(questions):
                t0 = time.perf_counter()
                vector = await batcher.embed(question)
                t1 = time.perf_counter()
                mem.search(question, vector, scope_of(i), top_k=args.top_k, min_score=0.25)
                t2 = time.perf_counter()
                total.append((t2 - t0) * 1000)
                embed.append((t1 - t0) * 1000)
                search.append((t2 - t1) * 1000)
        return {"p50": round(percentile(total, 50), 2), "p99": round(percentile(total, 99), 2),
                "embed_p50": round(percentile(embed, 50), 2), "embed_p99": round(percentile(embed, 99), 2),
                "search_p50": round(percentile(search, 50), 2), "search_p99": round(percentile(search, 99), 2)}

    n = f"{args.memories // 1000}k"
    layouts = {
        f"one user holding all {n} (user scope, HNSW)": (single, lambda i: Scope("user", "user-0", "q")),
        f"100 users x {args.memories // 100} (user scope, exact)": (spread, lambda i: Scope("user", f"user-{i % 100}", "q")),
        f"tenant scope over all {n} (HNSW)": (spread, lambda i: Scope("tenant", "user-0", "q")),
    }
    results["latency_ms"] = {name: asyncio.run(timed(mem, scope)) for name, (mem, scope) in layouts.items()}

    # HNSW quality: overlap of its top 10 with exact search.
    overlap = []
    qvecs = model.embed(questions[:100])
    for q in qvecs:
        exact = set(np.argsort(-(all_vectors @ q))[:10].tolist())
        found, _ = index.search(q, 10)
        overlap.append(len(exact & set(int(k) for k in found)) / 10)
    results["hnsw_recall_at_10"] = round(statistics.fmean(overlap), 3)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
