"""Smoke run of the side-by-side benchmark (bench/run.py --quick) so it never rots.

No timing assertions: only that every target runs and produces numbers. LiteLLM is skipped
(its own virtualenv takes minutes to build); "full" mode may be skipped by the bench itself
until the proxy has its config keys, and then it must say why.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["direct", "passthrough", "stateless", "state", "full"]


def test_bench_quick_produces_numbers_for_every_target(tmp_path: Path) -> None:
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable, "bench/run.py", "--quick", "--no-install",
            "--targets", ",".join(TARGETS),
            "--latency-seconds", "0.25", "--step-seconds", "0.25", "--warmup-seconds", "0.1",
            "--concurrency", "1,4", "--out", str(out), "--json", str(raw),
            "--baseline", "HEAD",  # the full target again, from a worktree of the last commit
        ],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(raw.read_text())
    summary, skipped = results["summary"], results["skipped"]
    for name in TARGETS:
        if name == "full" and name in skipped:
            assert skipped[name], "a skipped target must say why"
            continue
        assert name in summary, f"{name}: no results ({skipped.get(name)})"
        s = summary[name]
        for key in ("json_ttlb_p50", "json_ttlb_p99", "sse_ttfb_p50", "sse_ttlb_p50", "max_rps", "peak_rps", "json_cpu_per_1k"):
            assert isinstance(s[key], (int, float)) and math.isfinite(s[key]), (name, key, s[key])
        assert s["peak_rps"] > 0, name
        assert s["json_errors"] == s["sse_errors"] == s["sweep_errors"] == 0, (name, s)
        if name != "direct":
            assert s["peak_rss_mb"] and s["peak_rss_mb"] > 0, name
    baseline = results["meta"]["baseline"]["target"]
    assert baseline.startswith("full@") and baseline in summary, summary.keys()
    assert summary[baseline]["json_errors"] == summary[baseline]["sweep_errors"] == 0
    assert summary[baseline]["json_ttlb_p50_added"] > 0
    # The stateful target recognised every resent history (nothing recorded twice).
    check = results["state_check"]["state"]
    assert check["branches"] == 0 and check["turns"] > 0, check
    text = out.read_text()
    assert "Added latency over direct" in text and "Machine" in text and "(baseline)" in text
    # The report rebuilt from the raw results (--render) is the one written by the run.
    again = tmp_path / "again.md"
    rendered = subprocess.run([sys.executable, "bench/run.py", "--render", str(raw), "--out", str(again)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert again.read_text() == text


def test_full_probe_runs_a_seeded_proxy_and_reports(tmp_path: Path) -> None:
    from tests.harness import free_port

    proc = subprocess.run(
        [sys.executable, "bench/full_probe.py", "--requests", "10", "--memories", "500", "--burst", "18",
         "--workdir", str(tmp_path), "--port", str(free_port()), "--upstream-port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["requests"] == 10 and 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["anon_mb"] > 0 and report["memory_counters"]["recalls"] == 48  # 20 warm-up + 18 burst + 10


def test_cache_cost_bench_runs_and_the_proxys_accounting_matches_the_provider(tmp_path: Path) -> None:
    """bench/cache_cost.py on a short conversation (no LoCoMo): numbers for memory on and off,
    and the proxy's cached tokens equal to what the fake upstream billed, request by request."""
    raw = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, "bench/cache_cost.py", "--turns", "40", "--locomo", "", "--json", str(raw)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(raw.read_text())
    assert set(results) == {"synthetic-40, memory on", "synthetic-40, memory off"}
    for result in results.values():
        assert result["accounting_matches"] and result["decision_at_end"]
        assert len(result["quarters"]) == 4 and result["all"]["requests"] == 40
        assert result["all"]["client@0.1"] > 0 and result["all"]["proxy@0.1"] > 0
