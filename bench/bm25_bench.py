"""BM25.search per query at 100k memories: the term-by-term algorithm it replaced against the current one.

Builds a real TenantMemory of N memories (1-3 LoCoMo sentences each, as bench/memory_latency.py
synthesises them; no vectors), most of them one user's sessionless semantic memories as
bench/seed_full.py seeds the full target, with a few other users' and tenant-wide ones and ~1%
removed, then times ``BM25.search`` with that user's ``TenantMemory.admit`` predicate and scope
size (what ``TenantMemory.lexical`` does) on queries of 20-40 distinct terms made of LoCoMo
questions and sentences. The old algorithm (a verbatim copy below, with the admit of then) and
the new one run interleaved on the same queries in the same process, after checking that they
return the same scores bit for bit and the same slots up to the order of equal scores (the old
one ordered equal scores arbitrarily once more than ``limit`` slots matched; the new one by slot).

    python bench/bm25_bench.py                      # 100k memories, 300 queries, ~20 s on 2 cores
    python bench/bm25_bench.py --memories 20000 --queries 100
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from memory_latency import locomo_sentences, percentile  # noqa: E402

from proxy.memory import lexical  # noqa: E402
from proxy.memory.model import EPISODIC, SEMANTIC, TYPES, Memory, Scope  # noqa: E402
from proxy.memory.columns import NONE as _NONE  # noqa: E402
from proxy.memory.tenant import _TYPE_CODE, CANDIDATES, TenantMemory  # noqa: E402

USER = "bench-user"


def old_per_term_search(self: lexical.BM25, terms: Iterable[str], admit: Callable[[np.ndarray], np.ndarray], limit: int,
                        docs: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """BASELINE: BM25.search as it was before the one-pass version (one admit call and a
    scatter-add into a full-size score array per query term), verbatim."""
    empty = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), 0.0
    if self.docs <= 0:
        return empty
    total = max(docs if docs is not None else self.docs, 1)
    avg = max(self._total / self.docs, 1e-6)
    scores: np.ndarray | None = None
    ideal = 0.0
    for term in set(terms):
        postings = self._postings.get(term)
        if postings is None:
            continue
        slots = postings.slots[: postings.n]
        keep = admit(slots)
        df = int(np.count_nonzero(keep))
        if df == 0:
            continue
        slots, tf = slots[keep], postings.tfs[: postings.n][keep]
        idf = math.log(1.0 + max(total - df + 0.5, 0.5) / (df + 0.5))
        ideal += idf * (self.k1 + 1.0)
        norm = tf + self.k1 * (1.0 - self.b + self.b * self._length[slots] / avg)
        if scores is None:
            scores = np.zeros(len(self._length), dtype=np.float32)
        scores[slots] += (idf * (self.k1 + 1.0)) * tf / norm
    if scores is None:
        return empty
    found = np.flatnonzero(scores)
    if len(found) > limit:
        part = np.argpartition(-scores[found], limit - 1)[:limit]
        found = found[part]
    order = np.argsort(-scores[found], kind="stable")
    found = found[order]
    return found, scores[found], ideal


def old_admit(mem: TenantMemory, scope: Scope, types: Iterable[str] = (EPISODIC, SEMANTIC)):
    """BASELINE: TenantMemory.admit as it was (user and tenant scopes), verbatim."""
    cols = mem.cols
    type_ok = np.zeros(len(TYPES), dtype=bool)  # a lookup table: np.isin is slow on small arrays
    type_ok[[_TYPE_CODE[t] for t in types]] = True
    user = mem.user_code(scope.user)
    assert scope.kind in ("user", "tenant")

    def check(slots: np.ndarray) -> np.ndarray:
        ok = cols.alive[slots] & type_ok[cols.kind[slots]]
        if scope.kind == "tenant":
            return ok
        owner, session = cols.user[slots], cols.session[slots]
        visible = (owner == _NONE) & (session == _NONE)  # tenant-wide
        visible |= owner == user
        return ok & visible

    return check


def build(n: int, sentences: list[str], rng: np.random.Generator) -> TenantMemory:
    mem = TenantMemory("bench")
    now = time.time()
    for i in range(n):
        parts = rng.integers(0, len(sentences), size=int(rng.integers(1, 4)))
        text = " ".join(sentences[p] for p in parts)
        r = i % 100
        if r < 95:  # the queried user's memories (bench/seed_full.py: sessionless, semantic)
            user, session, kind, seq = USER, None, SEMANTIC, None
        elif r < 98:  # other users' conversations
            user, session, kind, seq = f"user-{i % 7}", f"s{i // 500}", EPISODIC, i % 500
        else:  # tenant-wide documents
            user, session, kind, seq = None, None, SEMANTIC, None
        mem.insert(Memory(id=f"m{i}", type=kind, text=text, ts=now - n + i, key=i, user=user, session=session,
                          session_created=0.0 if session else None, seq=seq))
    for i in rng.choice(n, size=n // 100, replace=False).tolist():
        mem.remove(f"m{i}")
    return mem


def queries(count: int, sentences: list[str], questions: list[str], rng: np.random.Generator) -> list[list[str]]:
    """Token lists of 20-40 distinct terms: a question, then LoCoMo sentences until long enough."""
    found = []
    while len(found) < count:
        want = int(rng.integers(20, 41))
        terms = lexical.tokenize(questions[int(rng.integers(len(questions)))])
        while len(set(terms)) < want:
            terms += lexical.tokenize(sentences[int(rng.integers(len(sentences)))])
        distinct = list(dict.fromkeys(terms))[:want]
        found.append([t for t in terms if t in set(distinct)])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries (each algorithm, interleaved)")
    args = parser.parse_args()
    rng = np.random.default_rng(11)
    sentences, questions = locomo_sentences()
    started = time.perf_counter()
    mem = build(args.memories, sentences, rng)
    built = time.perf_counter() - started
    qs = queries(args.queries, sentences, questions, rng)
    bm25 = mem.bm25
    entries = [sum(bm25._postings[t].n for t in set(q) if t in bm25._postings) for q in qs]
    print(f"{args.memories} memories ({mem.alive} alive) built in {built:.1f} s; {len(qs)} queries of "
          f"{statistics.median(len(set(q)) for q in qs):.0f} distinct terms and "
          f"{statistics.median(entries):.0f} postings entries (medians); {args.rounds} rounds, limit {CANDIDATES}")
    scopes = {f"{USER} (the one user holding most)": Scope("user", USER, "q"),
              "user-3 (a small user scope)": Scope("user", "user-3", "q")}
    for label, scope in scopes.items():
        size = mem.scope_size(scope)
        admit, before = mem.admit(scope), old_admit(mem, scope)
        algorithms = {  # what TenantMemory.lexical costs, less tokenising
            "old search, old admit (baseline)": lambda q: old_per_term_search(bm25, q, before, CANDIDATES, size),
            "old search, new admit": lambda q: old_per_term_search(bm25, q, admit, CANDIDATES, size),
            "new search, new admit": lambda q: bm25.search(q, admit, CANDIDATES, size),
        }
        same = {"same slots, same order": 0, "same slots, equal scores reordered": 0, "other equal-scored slots at the cut": 0}
        for q in qs:  # the same results, up to which of equal scores come first or make the cut; warms up
            old, new = old_per_term_search(bm25, q, before, CANDIDATES, size), bm25.search(q, admit, CANDIDATES, size)
            if not np.array_equal(old[1], new[1]) or old[2] != new[2]:
                raise SystemExit(f"scores differ for {q!r}")
            cut = old[1][-1] if len(old[1]) else 0.0
            if np.array_equal(old[0], new[0]):
                same["same slots, same order"] += 1
            elif set(old[0].tolist()) == set(new[0].tolist()):
                same["same slots, equal scores reordered"] += 1
            elif set(old[0][old[1] > cut].tolist()) == set(new[0][new[1] > cut].tolist()):
                same["other equal-scored slots at the cut"] += 1
            else:
                raise SystemExit(f"slots differ for {q!r}")
        times: dict[str, list[float]] = {name: [] for name in algorithms}
        gc.disable()
        for _ in range(args.rounds):
            for q in qs:
                for name, f in algorithms.items():
                    t0 = time.perf_counter()
                    f(q)
                    times[name].append((time.perf_counter() - t0) * 1000)
        gc.enable()
        print(f"\nscope {label}: {size} memories; the same scores (bit for bit) for every query, and "
              + ", ".join(f"{v} x {k}" for k, v in same.items()))
        print(f"  {'BM25.search per query':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>6}")
        base = statistics.median(times["old search, old admit (baseline)"])
        for name, values in times.items():
            print(f"  {name:<34} {statistics.median(values):>10.3f} {percentile(values, 90):>8.3f} "
                  f"{base / statistics.median(values):>5.1f}x")


if __name__ == "__main__":
    main()
