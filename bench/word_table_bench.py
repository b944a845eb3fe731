"""Gathering the embedder's word-table rows from the read-only mapping of the weights file.

    python bench/word_table_bench.py

Microseconds per batch for a query-sized (1×32) and an indexing-sized (16×128) batch of
zipf-distributed token ids (min of 5 passes over 300 batches). The numbers of the CLOCK-cached
``pread`` table it replaced are in docs/BENCHMARKS.md (Storage and interpreter tuning).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.memory.minilm_model import MiniLMWeights, default_model_dir  # noqa: E402


def main() -> None:
    word = MiniLMWeights(default_model_dir(), 0).word
    rng = np.random.default_rng(0)
    vocab = rng.zipf(1.3, 200_000) % word.shape[0]
    for label, (b, t) in (("query 1x32", (1, 32)), ("index 16x128", (16, 128))):
        data = [vocab[rng.integers(0, len(vocab), b * t)].reshape(b, t) for _ in range(300)]
        for ids in data[:50]:
            np.asarray(word[ids])
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for ids in data:
                np.asarray(word[ids])
            best = min(best, (time.perf_counter() - started) / len(data) * 1e6)
        print(f"{label:14s} {best:8.1f} us/batch")


if __name__ == "__main__":
    main()
