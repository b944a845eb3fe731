"""The rules extractor on LoCoMo: what it extracts from real conversations, and how fast.

Each conversation of /work/shared/data/locomo/locomo-dev.json is read as one user's sessions (the
first speaker's turns are the user's messages, as bench/memory_locomo.py replays them), and
``from_rules`` runs over each session. Reports the candidates per kind, how many carry a subject
key (and could supersede), the time per message (median of 5 passes), and a sample.

    python bench/extract_rules_bench.py
    python bench/extract_rules_bench.py --sample 20
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.memory.extract_rules import from_rules  # noqa: E402
from proxy.records import Message  # noqa: E402

DATA = Path("/work/shared/data/locomo/locomo-dev.json")


def sessions() -> list[list[Message]]:
    found = []
    for sample in json.loads(DATA.read_text()):
        conversation = sample["conversation"]
        first = conversation["speaker_a"]
        for key in sorted(k for k in conversation if k.startswith("session_") and not k.endswith("date_time")):
            turns = conversation[key]
            found.append([Message(seq=i, parent=i - 1 if i else None, chain="", role="user" if t["speaker"] == first else "assistant",
                                  body={"role": "user" if t["speaker"] == first else "assistant", "content": t["text"]}, ts=0.0)
                          for i, t in enumerate(turns)])
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", type=int, default=12)
    args = parser.parse_args()
    data = sessions()
    messages = sum(len(s) for s in data)
    users = sum(1 for s in data for m in s if m.role == "user")
    times = []
    for _ in range(5):
        started = time.perf_counter()
        found = [c for s in data for c in from_rules(s)]
        times.append((time.perf_counter() - started) / messages * 1e6)
    kinds = collections.Counter(c.kind for c in found)
    subjects = collections.Counter(c.subject for c in found if c.subject)
    print(f"{len(data)} sessions, {messages} messages ({users} of the user): {len(found)} candidates "
          f"({len(found) / max(users, 1):.2f} per user message)")
    print("by kind:", dict(kinds.most_common()))
    print(f"with a subject: {sum(subjects.values())}:", dict(subjects.most_common(10)))
    print(f"time per message: median {statistics.median(times):.1f} µs (5 passes)")
    for candidate in random.Random(7).sample(found, min(args.sample, len(found))):
        print(f"  [{candidate.kind}{' ' + candidate.subject if candidate.subject else ''}] {candidate.text}")


if __name__ == "__main__":
    main()
