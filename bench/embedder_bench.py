"""The local embedder's engines side by side: ``local-exact`` (float32 numpy, the baseline) and
``local`` (int8 on ONNX Runtime, the default), in interleaved rounds in one process.

Per round and engine: the median time of a single query (short and long, shortened the way
the proxy embeds it), of indexing 32 message-length texts, and of one 256-word-piece text;
the report is the median over rounds and the ratio baseline / int8. One BLAS thread (as the
proxy runs it). Agreement: cosine between the two engines' vectors of the same texts.

    python bench/embedder_bench.py [--rounds 5]

Reports only; nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from proxy.memory.remote import local_model  # noqa: E402
from proxy.memory.recall import shorten as _shorten  # noqa: E402

ENGINES = ("local-exact", "local")
SHORT_QUERY = "What did Caroline say about the adoption agency?"
LONG_QUERY = ("Can you go back over everything we decided about the release plan last week, including who owns "
              "the migration, what the rollback procedure is if the canary fails, and which customers we promised "
              "early access to, then draft the announcement?")
MESSAGES = [f"Message {i}: I went hiking near the lake with my sister on Sunday, then we cooked dinner and talked about "
            f"her new job in Paris and the trip we are planning for the {i}th of next month." for i in range(32)]
LONG_TEXT = "word pieces keep coming " * 80  # truncated to 256 word pieces


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(model, repeat: int) -> dict[str, float]:
    short, long = _shorten(SHORT_QUERY), _shorten(LONG_QUERY)
    return {
        f"query, {len(model.tokenize([short])[0])} word pieces": median_ms(lambda: model.embed([short]), repeat),
        f"query, {len(model.tokenize([long])[0])} word pieces (shortened)": median_ms(lambda: model.embed([long]), repeat),
        "index 32 messages": median_ms(lambda: model.embed(MESSAGES), max(3, repeat // 20)),
        "one 256-word-piece text": median_ms(lambda: model.embed([LONG_TEXT]), max(3, repeat // 10)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=60, help="repetitions of a query per round")
    args = parser.parse_args()

    started = {}
    for engine in ENGINES:
        t0 = time.perf_counter()
        local_model(engine)
        started[engine] = (time.perf_counter() - t0) * 1000
    rounds: dict[str, list[dict[str, float]]] = {engine: [] for engine in ENGINES}
    for _ in range(args.rounds):
        for engine in ENGINES:
            rounds[engine].append(measure(local_model(engine), args.repeat))

    exact, quant = (local_model(engine) for engine in ENGINES)
    texts = [SHORT_QUERY, _shorten(LONG_QUERY), *MESSAGES[:8], LONG_TEXT]
    cosines = np.sum(exact.embed(texts) * quant.embed(texts), axis=1)

    print(f"| measure (ms, median of {args.rounds} rounds) | local-exact (numpy f32) | local (int8 ORT) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| load (once) | {started['local-exact']:.0f} | {started['local']:.0f} | |")
    for key in rounds["local"][0]:
        base = statistics.median(r[key] for r in rounds["local-exact"])
        fast = statistics.median(r[key] for r in rounds["local"])
        print(f"| {key} | {base:.2f} | {fast:.2f} | {base / fast:.2f}× |")
    print(f"\nagreement: cosine(exact, int8) over {len(texts)} texts: min {cosines.min():.4f}, median {np.median(cosines):.4f}")


if __name__ == "__main__":
    main()
