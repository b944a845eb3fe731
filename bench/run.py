#!/usr/bin/env python
"""Side-by-side benchmark: agent-state-proxy vs a pass-through floor vs LiteLLM proxy.

One command, all targets in one run, interleaved round-robin against the same local fake
upstream (tests/fake_upstream.py)::

    python bench/run.py                      # the full run (~12 min), raw JSON only
    python bench/run.py --out docs/BENCHMARKS.md
    python bench/run.py --quick              # smoke run, a few seconds, no thresholds
    python bench/run.py --targets direct,passthrough,state --rounds 3

Targets (``--targets``, comma separated, default all):

  direct       client -> fake upstream: the rig's own floor
  passthrough  bench/passthrough.py: minimal aiohttp forwarder, one pooled ClientSession
  stateless    agent-state-proxy, tenant with ``stateless: true``
  state        agent-state-proxy, session state only: session header, history reconciliation,
               LMDB recording with the default persistence policy; context management and
               long-term memory turned off
  state-sync   the same with ``persistence: {mode: sync}``: every turn fsynced before the reply
  full         state + context compression + memory retrieval (``full_tenant``) for a user
               with a history: before it starts, bench/seed_full.py stores one long session
               per client stream (--full-turns, default 500 turns) and the user's memories
               (--full-memories, default 100k); its clients send only the tail of their
               session (workload.WindowConversation). Skipped while the proxy lacks the keys
  state-tmpfs  (only when named) "state" with LMDB on /dev/shm, where fsync costs nothing
  litellm      LiteLLM proxy (``litellm[proxy]==1.106.12``) in its own virtualenv,
               bench/.venv-litellm, created on first use

Every server and the load generator (bench/loadgen.py) are separate processes. Each round
runs, for every target in a rotated order: concurrency-1 latency (JSON, then SSE), then a
JSON throughput sweep over the concurrency levels. Results are medians over rounds; "added"
latency is a target's percentile minus direct's in the same round.

Two source trees side by side (``--baseline-tree DIR``, or ``--baseline REV`` for a commit of this
repository): each proxy target also runs from the other checkout, as ``<target>@<its commit>``,
measured right after this tree's in every round; the report compares each pair (added latency,
req/s, RssAnon, PSS, VmHWM and their ratios).

The pieces: run_procs.py (processes and /proc), run_targets.py (what each target is and how it
starts), run_stats.py (summaries over rounds), run_report.py (Markdown and console report).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from run_procs import REPO, LoadGen, Server, free_port, log, machine, stop_all  # noqa: E402
from run_report import print_summary, write_report  # noqa: E402
from run_stats import P99_LIMIT_MS, SWEEP_GAIN, SWEEP_STOP_AFTER, compare, summarise, summarise_latency, summarise_step  # noqa: E402
from run_targets import (  # noqa: E402
    ALL_TARGETS, EXTRA_TARGETS, FULL_MEMORIES, FULL_TURNS, KNOWN_TARGETS, LITELLM_VERSION, PROXY_TARGETS, QUICK_FULL_MEMORIES,
    QUICK_FULL_TURNS, FullSeed, Target, add_baselines, base_of, baseline_tree, build_targets, check_full, check_state_sessions,
    checkout_baseline, prepare_baseline,
)

CONCURRENCIES = (1, 2, 4, 8, 16, 32, 64)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if "direct" not in names:
        names.insert(0, "direct")  # every added latency is measured against it
    workdir = Path(tempfile.mkdtemp(prefix="asp-bench-"))
    run_id = "r" + secrets.token_hex(3)
    master_key = "sk-bench-" + secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {master_key}"}
    meta = machine() | {
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/run.py " + " ".join(args.argv),
        "rounds": args.rounds, "latency_seconds": args.latency_seconds, "step_seconds": args.step_seconds,
        "concurrencies": args.concurrency, "upstream_latency": args.upstream_latency, "quick": args.quick,
        "workdir": str(workdir), "full_turns": args.full_turns, "full_memories": args.full_memories,
    }
    upstream_port = free_port()
    upstream_origin = f"http://127.0.0.1:{upstream_port}"
    upstream = Server("fake-upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port), "--latency", str(args.upstream_latency)], upstream_origin + "/v1/models", workdir / "upstream.log")
    servers: list[Server] = [upstream]
    cleanup: list[Path] = [workdir]
    loadgen: LoadGen | None = None
    results: dict[str, Any] = {"meta": meta, "targets": {}, "skipped": {}}
    # One seeded session per client stream the full target can use: the warm-up runs 2 streams.
    full = FullSeed(run_id, max(args.concurrency + [2]), args.full_turns, args.full_memories)
    baselines: dict[str, Path] = {}  # baseline target -> the source tree it runs
    worktrees: list[Path] = []  # made for --baseline REV, removed at the end
    if args.baseline or args.baseline_tree:
        if args.baseline:
            tree = checkout_baseline(args.baseline, workdir)
            worktrees.append(tree)
        else:
            tree = baseline_tree(args.baseline_tree)
        label = prepare_baseline(tree)
        if args.baseline_targets:
            paired = [n.strip() for n in args.baseline_targets.split(",") if n.strip()]
        else:  # --baseline REV has always meant the full target; a tree, every proxy target run
            paired = ["full"] if args.baseline else [n for n in names if n in PROXY_TARGETS]
        added = add_baselines(names, paired, label)
        baselines = dict.fromkeys(added, tree)
        meta["baseline"] = {"target": added[0] if added else None, "targets": added, "tree": str(tree),
                            "commit": label, "revision": args.baseline}
    restored: dict[str, list[int]] = {}  # target -> [requests with X-History-Restored, requests]
    started = time.monotonic()
    try:
        upstream.start().wait_ready(30)
        targets, skipped = build_targets(names, workdir, upstream, upstream_origin, master_key, not args.no_install, cleanup, servers, full, baselines)
        if full.report:
            results["full_setup"] = full.report
        results["skipped"] = skipped
        for name, why in skipped.items():
            log(f"{name}: skipped: {why}")
        loadgen = LoadGen(workdir / "loadgen.log")
        if "litellm" in (t.name for t in targets):
            meta["litellm"] = LITELLM_VERSION
        log(f"targets: {', '.join(t.name for t in targets)}; workdir {workdir}")

        def step(target: Target, stream: bool, concurrency: int, duration: float, min_requests: int = 0, max_requests: int = 10**9) -> dict[str, Any]:
            before = target.server.cpu() if target.server else 0.0
            res = loadgen.run(target=target.name, url=target.chat_url, stream=stream, concurrency=concurrency,
                              duration=duration, min_requests=min_requests, max_requests=max_requests,
                              headers=headers, run_id=run_id, **target.load)
            res["cpu_s"] = (target.server.cpu() if target.server else 0.0) - before
            counts = restored.setdefault(target.name, [0, 0])
            counts[0] += res.get("restored", 0)
            counts[1] += res["n"]
            if target.server:
                target.server.sample_memory()
                # Where in the run the peak is reached (the summary keeps only the peak).
                res["memory_mb"] = {"hwm": round(target.server.peak_rss_mb()), "rss": round(target.server.rss_mb()),
                                    "anon": round(target.server.anon_mb())}
            if res["errors"]:
                log(f"{target.name} c={concurrency} stream={stream}: {res['errors']} errors, e.g. {res['error_sample']}")
            return res

        # Warm-up: connections, imports, caches, the JIT-less Python's first-call costs.
        for target in targets:
            for stream in (False, True):
                step(target, stream, 2, args.warmup_seconds)
        data = {t.name: {"latency": {"json": [], "sse": []}, "sweep": []} for t in targets}
        for rnd in range(args.rounds):
            shift = rnd % len(targets)
            order = targets[shift:] + targets[:shift]
            log(f"round {rnd + 1}/{args.rounds}: {' '.join(t.name for t in order)}")
            for mode, stream in (("json", False), ("sse", True)):
                for target in order:
                    res = step(target, stream, 1, args.latency_seconds, args.latency_min_requests, args.latency_max_requests)
                    data[target.name]["latency"][mode].append(summarise_latency(res))
            failures = {t.name: 0 for t in targets}
            stopped: set[str] = set()
            sweep: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
            for concurrency in args.concurrency:
                for target in order:
                    if target.name in stopped:
                        continue
                    res = step(target, False, concurrency, args.step_seconds)
                    point = summarise_step(res, concurrency)
                    best = max((p["rps"] for p in sweep[target.name]), default=0.0)
                    sweep[target.name].append(point)
                    ok = point["p99_ms"] < P99_LIMIT_MS and not point["errors"] and point["n"] > 0
                    failures[target.name] = 0 if ok else failures[target.name] + 1
                    if failures[target.name] >= SWEEP_STOP_AFTER and point["rps"] <= best * SWEEP_GAIN:
                        stopped.add(target.name)
            for name in sweep:
                data[name]["sweep"].append(sweep[name])
            log(f"round {rnd + 1} done at {time.monotonic() - started:.0f}s")
        for target in targets:
            entry = data[target.name]
            if target.server is not None:
                entry["peak_rss_mb"] = target.server.peak_rss_mb()
                entry["peak_anon_mb"] = target.server.max_anon_kb / 1024
                entry["peak_pss_mb"] = target.server.max_pss_kb / 1024
                entry["rss_end_mb"] = target.server.rss_mb()
                entry["processes"] = len(target.server.pids)
            results["targets"][target.name] = entry
        results["state_check"] = {
            t.name: check_state_sessions(t, headers) for t in targets if base_of(t.name) in PROXY_TARGETS and base_of(t.name) != "stateless"
        }
        for target in targets:
            if base_of(target.name) == "full" and target.name in results["state_check"]:
                results["state_check"][target.name] |= check_full(target, headers, full, restored.get(target.name, [0, 0]))
        meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        meta["duration_s"] = round(time.monotonic() - started, 1)
    finally:
        if loadgen is not None:
            loadgen.close()
        stop_all(servers)
        for tree in worktrees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        if not args.keep_workdir:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)
    results["summary"] = summarise(results)
    results["comparison"] = compare(results["summary"])
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Side-by-side benchmark of agent-state-proxy, a pass-through floor and LiteLLM proxy.")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few seconds, 1 round, no thresholds")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 1 with --quick)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma-separated, from {','.join(KNOWN_TARGETS)} (default: all but {','.join(EXTRA_TARGETS)})")
    parser.add_argument("--out", help="write the Markdown report here (e.g. docs/BENCHMARKS.md)")
    parser.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="raw results (default bench/results/latest.json)")
    parser.add_argument("--upstream-latency", type=float, default=0.0, help="fixed fake-upstream latency in seconds (default 0)")
    parser.add_argument("--latency-seconds", type=float, help="c=1 latency measurement per target, mode and round (default 2)")
    parser.add_argument("--latency-min-requests", type=int, help="at least this many c=1 requests per step (default 100; 10 with --quick)")
    parser.add_argument("--latency-max-requests", type=int, default=2000, help="at most this many c=1 requests per step")
    parser.add_argument("--step-seconds", type=float, help="duration of each throughput step (default 2.5)")
    parser.add_argument("--warmup-seconds", type=float, help="warm-up per target and mode (default 1)")
    parser.add_argument("--concurrency", help="comma-separated concurrency levels (default 1,2,4,8,16,32,64)")
    parser.add_argument("--full-turns", type=int, help=f"stored turns of each full-target session (default {FULL_TURNS}; {QUICK_FULL_TURNS} with --quick)")
    parser.add_argument("--full-memories", type=int, help=f"memories of the full target's user (default {FULL_MEMORIES}; {QUICK_FULL_MEMORIES} with --quick)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", metavar="REV", help="also run the full target from git revision REV (a worktree), as full@REV, interleaved with the others: a change's before/after in one run")
    baseline.add_argument("--baseline-tree", metavar="DIR", help="also run every proxy target of --targets from the checkout DIR (its own code on PYTHONPATH), as <target>@<its commit>, "
                          "each measured right after this tree's: two source trees compared in one run")
    parser.add_argument("--baseline-targets", metavar="LIST", help="the proxy targets to run from the baseline (default: full with --baseline, every proxy target with --baseline-tree)")
    parser.add_argument("--no-install", action="store_true", help="never create bench/.venv-litellm (skip LiteLLM if missing)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and LMDB data of the run")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite --out from these raw results (after a change to the report)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.render:
        results = json.loads(Path(args.render).read_text())
        print_summary(results)
        write_report(results, args.out)
        return 0

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Clean up (stop every server started) on SIGTERM too, and on SIGINT even when started in
    # the background, where the shell makes the process ignore SIGINT.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 5)
    args.latency_seconds = args.latency_seconds or (0.4 if quick else 2.0)
    args.latency_min_requests = args.latency_min_requests or (10 if quick else 100)
    args.step_seconds = args.step_seconds or (0.4 if quick else 2.5)
    args.warmup_seconds = args.warmup_seconds or (0.2 if quick else 1.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else ([1, 4] if quick else list(CONCURRENCIES))
    args.full_turns = args.full_turns or (QUICK_FULL_TURNS if quick else FULL_TURNS)
    args.full_memories = args.full_memories if args.full_memories is not None else (QUICK_FULL_MEMORIES if quick else FULL_MEMORIES)

    results = run(args)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str))
        log(f"raw results: {path}")
    print_summary(results)
    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
