"""LoCoMo retrieval benchmark of long-term memory, through the real proxy.

Each LoCoMo conversation is replayed into the proxy as one user's sessions (the fake upstream
plays the other speaker, message by message), then every question that has evidence is asked
in a new session of that user, and the memories the proxy injected (X-Memory-Ids, in rank
order) are mapped back to dialogue turns. R@k is the fraction of a question's evidence turns
among the first k injected, averaged over questions (the LoCoMo paper's Table 3 metric).

    python bench/memory_locomo.py                         # the real thing, ~5-10 min on 2 cores
    python bench/memory_locomo.py --conversations 1       # one conversation, ~2 min
    python bench/memory_locomo.py --offline               # retrieval only, no HTTP (ablations)
    python bench/memory_locomo.py --offline --variant dense|lexical|hybrid
    python bench/memory_locomo.py --loo                   # constants chosen on 4, measured on the 5th, ~2 min

Data: /work/shared/data/locomo/locomo-dev.json (CC BY-NC 4.0, see its README); --data PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_DATA = Path("/work/shared/data/locomo/locomo-dev.json")
KS = (5, 10, 25)
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def turn_text(turn: dict[str, Any]) -> str:
    text = turn["text"]
    if turn.get("blip_caption"):
        text += f" [shares an image: {turn['blip_caption']}]"
    return text


def sessions_of(sample: dict[str, Any]) -> list[tuple[int, str, list[dict[str, Any]]]]:
    conversation = sample["conversation"]
    numbers = sorted(int(k.split("_")[1]) for k in conversation if re.fullmatch(r"session_\d+", k))
    return [(n, conversation.get(f"session_{n}_date_time", ""), conversation[f"session_{n}"]) for n in numbers if conversation[f"session_{n}"]]


def evidence_of(qa: dict[str, Any]) -> list[str]:
    found = []
    for item in qa.get("evidence") or []:
        found += [part.strip() for part in re.split(r"[;,]", str(item)) if re.fullmatch(r"D\d+:\d+", part.strip())]
    return list(dict.fromkeys(found))


def recall_at(ranked: list[Any], evidence: list[str], k: int) -> float:
    """``ranked``: dialogue turn ids, or lists of them (an extracted fact and the turns it came from)."""
    top = {turn for entry in ranked[:k] for turn in ([entry] if isinstance(entry, str) else entry)}
    return sum(1 for e in evidence if e in top) / len(evidence)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_category[CATEGORIES.get(row["category"], str(row["category"]))].append(row)
    table: dict[str, Any] = {}
    for name, group in [("overall", rows)] + sorted(by_category.items()):
        table[name] = {"questions": len(group)} | {f"R@{k}": round(100 * statistics.fmean(r[f"R@{k}"] for r in group), 1) for k in KS}
        table[name]["tokens"] = round(statistics.fmean(r["tokens"] for r in group), 1)
    return table


def print_table(table: dict[str, Any], title: str) -> None:
    print(f"\n{title}")
    print(f"{'category':<14}{'questions':>10}" + "".join(f"{'R@' + str(k):>8}" for k in KS) + f"{'tokens':>9}")
    for name, row in table.items():
        print(f"{name:<14}{row['questions']:>10}" + "".join(f"{row[f'R@{k}']:>8}" for k in KS) + f"{row['tokens']:>9}")


# -- through the proxy ---------------------------------------------------------------------


def run_proxy(samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import openai

    from proxy.config import load_config
    from proxy.server import keys
    from tests.fake_upstream import FakeUpstream
    from tests.harness import ProxyThread, open_tenant, write_config

    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="asp-locomo-") as tmp, FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key") as fake:
        memory = {"top_k": args.top_k, "max_inject_tokens": args.max_inject_tokens, "latency_budget_ms": args.budget_ms,
                  "extract": args.extract}
        if args.min_score is not None:
            memory["min_score"] = args.min_score
        path = write_config(Path(tmp), {"bench": open_tenant(fake.base_url, memory=memory)})
        with ProxyThread(load_config(path)) as proxy:
            sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=120)
            while proxy.app[keys.PIPELINE].memory is None:  # memory starts in the background
                time.sleep(0.01)
            service = proxy.app[keys.PIPELINE].memory
            started = time.perf_counter()
            turns = 0
            id_to_dia: dict[str, Any] = {}  # memory id -> its dialogue turn (an extracted fact: its source turns)
            for sample in samples:
                user = f"locomo-{sample['sample_id']}"
                for number, _, session in sessions_of(sample):
                    sid = f"{sample['sample_id']}-session-{number}"
                    first = session[0]["speaker"]
                    history: list[dict[str, Any]] = []
                    sent: list[str] = []  # dia_id of each recorded message, in order
                    i = 0
                    while i < len(session):
                        turn = session[i]
                        message = {"role": "user", "content": turn_text(turn), "name": re.sub(r"[^A-Za-z0-9_-]", "_", turn["speaker"])}
                        reply_turn = session[i + 1] if i + 1 < len(session) and session[i + 1]["speaker"] != first else None
                        if reply_turn is None:
                            # The session ends on this speaker: the provider fails, so the message is
                            # recorded (outcome error) without an invented reply.
                            fake.fail_next(503, "no reply in the dataset")
                            with contextlib.suppress(openai.APIStatusError):
                                sdk.chat.completions.create(model="fake-model", messages=history + [message],
                                                            extra_headers={"X-User-ID": user, "X-Session-ID": sid})
                            sent.append(turn["dia_id"])
                            turns += 1
                            break
                        fake.script_reply(turn_text(reply_turn))
                        answer = sdk.chat.completions.create(model="fake-model", messages=history + [message],
                                                             extra_headers={"X-User-ID": user, "X-Session-ID": sid})
                        history += [message, {"role": "assistant", "content": answer.choices[0].message.content}]
                        sent += [turn["dia_id"], reply_turn["dia_id"]]
                        turns += 2
                        i += 2
                    proxy.call(service.drain(), timeout=600)
                    listed = httpx.get(f"{proxy.url}/v1/memories", params={"session_id": sid, "limit": 1000}).json()["data"]
                    for item in listed:
                        if item["seq"] is not None and item["seq"] < len(sent) and sent[item["seq"]]:
                            id_to_dia[item["id"]] = sent[item["seq"]]
                        elif "extracted" in item:
                            id_to_dia[item["id"]] = [sent[seq] for source in item["extracted"]["sources"]
                                                     for seq in source.get("seqs") or () if seq < len(sent)]
                print(f"  replayed {sample['sample_id']}: {len(id_to_dia)} memories so far", file=sys.stderr)
            timings["replay_s"] = round(time.perf_counter() - started, 1)
            timings["turns"] = turns
            proxy.call(service.drain(), timeout=600)
            stats_before = httpx.get(f"{proxy.url}/admin/memory").json()
            started = time.perf_counter()
            for sample in samples:
                user = f"locomo-{sample['sample_id']}"
                for j, qa in enumerate(sample["qa"]):
                    evidence = evidence_of(qa)
                    if not evidence:
                        continue
                    sid = f"{sample['sample_id']}-question-{j}"
                    raw = sdk.chat.completions.with_raw_response.create(
                        model="fake-model", messages=[{"role": "user", "content": qa["question"]}],
                        extra_headers={"X-User-ID": user, "X-Session-ID": sid},
                    )
                    ids = [i for i in (raw.headers.get("x-memory-ids") or "").split(",") if i]
                    ranked = [id_to_dia.get(i, "") for i in ids]
                    row = {"sample": sample["sample_id"], "category": qa["category"], "evidence": evidence, "ranked": ranked,
                           "tokens": int(raw.headers.get("x-memory-tokens") or 0), "status": raw.headers.get("x-memory-status")}
                    row |= {f"R@{k}": recall_at(ranked, evidence, k) for k in KS}
                    rows.append(row)
                    # The question itself must not become a memory the next question finds; and
                    # its indexing must not compete with the next question's retrieval.
                    httpx.delete(f"{proxy.url}/admin/sessions/{sid}")
                    proxy.call(service.drain(), timeout=600)
            timings["questions_s"] = round(time.perf_counter() - started, 1)
            stats = httpx.get(f"{proxy.url}/admin/memory").json()
    misses = sum(1 for r in rows if r["status"] == "budget-exceeded")
    return {"rows": rows, "timings": timings, "budget_misses": misses, "stats": stats, "stats_after_replay": stats_before}


# -- offline: the same retrieval code without HTTP (for ablations) -------------------------


def build_offline(samples: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each conversation indexed as the proxy indexes it (one user, one session per LoCoMo
    session), and its questions embedded: built once, searched under any fusion constants."""
    from proxy.memory.model import EPISODIC, Memory
    from proxy.memory.remote import local_model
    from proxy.memory.tenant import TenantMemory, index_text

    model = local_model(args.embedder)
    built = []
    for sample in samples:
        mem = TenantMemory("offline")
        memories = []
        for number, _, session in sessions_of(sample):
            first = session[0]["speaker"]
            for seq, turn in enumerate(session):
                user_side = turn["speaker"] == first
                previous = session[seq - 1] if seq else None
                context = None
                if previous is not None:  # what the proxy indexes with a message: the one before it
                    context = (f"{previous['speaker']}: " if not user_side else "") + turn_text(previous)
                memories.append(Memory(id=turn["dia_id"], type=EPISODIC, text=turn_text(turn), ts=0.0, key=len(memories), user="u",
                                       session=f"s{number}", session_created=0.0, seq=seq, context=context,
                                       role="user" if user_side else "assistant", name=turn["speaker"] if user_side else None))
        vectors = model.embed([index_text(m) for m in memories])
        for memory, vector in zip(memories, vectors):
            memory.vector = vector
            mem.insert(memory)
        questions = [qa for qa in sample["qa"] if evidence_of(qa)]
        built.append({"sample": sample["sample_id"], "mem": mem, "questions": questions,
                      "vectors": model.embed([qa["question"] for qa in questions])})
        print(f"  {sample['sample_id']}: {len(memories)} turns, {len(questions)} questions", file=sys.stderr)
    return built


def search_offline(conversation: dict[str, Any], args: argparse.Namespace, fusion: Any) -> list[dict[str, Any]]:
    from proxy.memory.model import Scope

    mem, rows = conversation["mem"], []
    scope = Scope("user", "u", "q")
    for qa, qvec in zip(conversation["questions"], conversation["vectors"]):
        if args.variant == "dense":
            slots, _ = mem.dense(qvec, scope, mem.admit(scope), max(KS))
            ranked = [mem.ids[s] for s in slots]
        else:
            query = None if args.variant == "lexical" else qvec
            ranked = [h.id for h in mem.search(qa["question"], query, scope, top_k=max(KS), min_score=args.min_score, fusion=fusion)]
        evidence = evidence_of(qa)
        row = {"sample": conversation["sample"], "category": qa["category"], "evidence": evidence, "ranked": ranked, "tokens": 0}
        rows.append(row | {f"R@{k}": recall_at(ranked, evidence, k) for k in KS})
    return rows


def run_offline(samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from proxy.memory.tenant import FUSION

    built = build_offline(samples, args)
    return {"rows": [row for conversation in built for row in search_offline(conversation, args, FUSION)]}


# Leave-one-conversation-out: every constant is chosen on four conversations and the figure is
# read on the fifth, so it predicts conversations the constants never saw. The grid spans the
# usual range of each constant (RRF's k from a top-heavy 2 to the customary 60).
GRID = {"rrf_k": (2, 5, 10, 20, 60), "lexical_weight": (1.0, 2.0, 3.0, 4.0), "neighbour_share": (0.0, 0.25, 0.5, 0.75),
        "by_score": (False, True)}


def run_leave_one_out(samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import itertools

    from proxy.memory.tenant import FUSION

    built = build_offline(samples, args)
    candidates = [FUSION._replace(**dict(zip(GRID, values))) for values in itertools.product(*GRID.values())]
    # rows[c][i]: conversation i's rows under candidate c (searched once, reused by every fold)
    rows = [[search_offline(conversation, args, candidate) for conversation in built] for candidate in candidates]
    held_out: list[dict[str, Any]] = []
    chosen = []
    for fold, conversation in enumerate(built):
        def score(c: int) -> float:
            train = [r for i, part in enumerate(rows[c]) if i != fold for r in part]
            return statistics.fmean(r["R@10"] for r in train)
        best = max(range(len(candidates)), key=score)
        chosen.append({"held_out": conversation["sample"], "fusion": candidates[best]._asdict(), "train R@10": round(100 * score(best), 1)})
        held_out += rows[best][fold]
    default = candidates.index(FUSION) if FUSION in candidates else None
    return {"rows": held_out, "chosen": chosen,
            "default_rows": [r for part in rows[default] for r in part] if default is not None else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--conversations", type=int, default=0, help="only the first N conversations")
    parser.add_argument("--offline", action="store_true", help="retrieval code only, no proxy")
    parser.add_argument("--embedder", default="local", choices=("local", "local-exact"), help="offline only: the local engine")
    parser.add_argument("--loo", action="store_true", help="offline, leave-one-conversation-out choice of the fusion constants")
    parser.add_argument("--variant", default="hybrid", choices=("hybrid", "dense", "lexical"), help="offline only")
    parser.add_argument("--budget-ms", type=int, default=1000,
                        help="memory.latency_budget_ms (default 1000: measure retrieval quality, not this machine's load; "
                             "the product default is 30)")
    parser.add_argument("--min-score", type=float, default=None, help="memory.min_score (default: the product default)")
    parser.add_argument("--top-k", type=int, default=max(KS), help="memory.top_k (default 25: rank quality; the product default injects fewer)")
    parser.add_argument("--max-inject-tokens", type=int, default=8000, help="memory.max_inject_tokens (default 8000: no cap)")
    parser.add_argument("--extract", action="store_true",
                        help="memory.extract: true (rules; an extracted fact counts for the turns it came from)")
    parser.add_argument("--json", type=Path, help="write per-question rows and the summary here")
    args = parser.parse_args()
    samples = json.loads(args.data.read_text())
    if args.conversations:
        samples = samples[: args.conversations]
    args.offline = args.offline or args.loo
    if args.offline and args.min_score is None:
        from proxy.config import MemorySettings

        args.min_score = MemorySettings().min_score
    if args.loo:
        result = run_leave_one_out(samples, args)
        for fold in result["chosen"]:
            print(f"  fold {fold['held_out']}: chose {fold['fusion']} (R@10 {fold['train R@10']} on the other four)")
        if result["default_rows"]:
            print_table(summarise(result["default_rows"]), "the shipped constants on all conversations (tuned there: optimistic)")
    else:
        result = run_offline(samples, args) if args.offline else run_proxy(samples, args)
    table = summarise(result["rows"])
    mode = "leave-one-conversation-out, each figure on a conversation the constants were not chosen on" if args.loo else (
        "offline " + args.variant if args.offline else "through the proxy")
    print_table(table, f"LoCoMo retrieval ({mode}), {len(samples)} conversations")
    if not args.offline:
        print(f"\nreplay {result['timings']}; questions {result['timings']['questions_s']} s; budget misses {result['budget_misses']}")
        print("recall latency (proxy stats):", json.dumps(result["stats"]["recall_latency_ms"]))
        print("counters:", json.dumps(result["stats"]["counters"]))
    if args.json:
        args.json.write_text(json.dumps({"summary": table} | {k: v for k, v in result.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
