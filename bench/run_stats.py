"""Statistics of bench/run.py: percentiles of one measurement step, the per-target summary over
rounds (added latency is a target's percentile minus direct's in the same round, then the median
over rounds), and the same-run comparison of each target with its baseline."""

from __future__ import annotations

import statistics
from typing import Any

from run_targets import base_of, is_baseline, report_order

P99_LIMIT_MS = 50.0
# A target's sweep stops once this many consecutive steps were over the p99 limit (or had
# errors) and the last one did not raise requests/s by more than 5 % over the best so far:
# past saturation, more concurrency only adds queueing delay.
SWEEP_STOP_AFTER = 2
SWEEP_GAIN = 1.05


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation; NaN for no data."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or a != a or b != b or b == 0:
        return float("nan")
    return a / b


def summarise_latency(res: dict[str, Any]) -> dict[str, Any]:
    n = res["n"]
    return {
        "n": n, "errors": res["errors"],
        "ttlb_p50": pct(res["ttlb_ms"], 50), "ttlb_p99": pct(res["ttlb_ms"], 99),
        "ttfb_p50": pct(res["ttfb_ms"], 50), "ttfb_p99": pct(res["ttfb_ms"], 99),
        "cpu_s": res["cpu_s"], "cpu_per_1k": res["cpu_s"] / n * 1000 if n else float("nan"),
        # In the order sent: a tail's causes show in where its requests fall (the first ones
        # after a sweep, a stretch mid-step, or scattered).
        "ttlb_ms": res["ttlb_ms"],
        "memory_mb": res.get("memory_mb"),
    }


def summarise_step(res: dict[str, Any], concurrency: int) -> dict[str, Any]:
    n = res["n"]
    return {
        "c": concurrency, "n": n, "errors": res["errors"],
        "rps": n / res["elapsed"] if res["elapsed"] > 0 else 0.0,
        "p50_ms": pct(res["ttlb_ms"], 50), "p99_ms": pct(res["ttlb_ms"], 99),
        "cpu_per_1k": res["cpu_s"] / n * 1000 if n else float("nan"),
        "memory_mb": res.get("memory_mb"),
    }


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    targets = results["targets"]
    if "direct" not in targets:
        return {}
    direct = targets["direct"]
    rounds = len(direct["latency"]["json"])
    summary: dict[str, Any] = {}
    for name, entry in targets.items():
        s: dict[str, Any] = {}
        for mode, metrics in (("json", ("ttlb",)), ("sse", ("ttfb", "ttlb"))):
            for metric in metrics:
                for q in ("p50", "p99"):
                    key = f"{metric}_{q}"
                    own = [r[key] for r in entry["latency"][mode]]
                    base = [r[key] for r in direct["latency"][mode]]
                    s[f"{mode}_{key}"] = median(own)
                    s[f"{mode}_{key}_added"] = median([a - b for a, b in zip(own, base)])
                    s[f"{mode}_{key}_added_rounds"] = [a - b for a, b in zip(own, base)]
            s[f"{mode}_cpu_per_1k"] = median([r["cpu_per_1k"] for r in entry["latency"][mode]])
            s[f"{mode}_errors"] = sum(r["errors"] for r in entry["latency"][mode])
        best_per_round = []
        for sweep in entry["sweep"]:
            ok = [p for p in sweep if p["p99_ms"] < P99_LIMIT_MS and not p["errors"] and p["n"]]
            best_per_round.append(max(ok, key=lambda p: p["rps"]) if ok else None)
        s["max_rps"] = median([b["rps"] if b else 0.0 for b in best_per_round])
        s["max_rps_rounds"] = [b["rps"] if b else 0.0 for b in best_per_round]
        s["max_rps_at_c"] = [b["c"] if b else None for b in best_per_round]
        peaks = [max(sweep, key=lambda p: p["rps"]) for sweep in entry["sweep"] if sweep]
        s["peak_rps"] = median([p["rps"] for p in peaks])
        s["peak_rps_at_c"] = [p["c"] for p in peaks]
        s["sweep_errors"] = sum(p["errors"] for sweep in entry["sweep"] for p in sweep)
        per_c: dict[int, dict[str, float]] = {}
        for c in sorted({p["c"] for sweep in entry["sweep"] for p in sweep}):
            points = [p for sweep in entry["sweep"] for p in sweep if p["c"] == c]
            per_c[c] = {
                "rps": median([p["rps"] for p in points]), "p50_ms": median([p["p50_ms"] for p in points]),
                "p99_ms": median([p["p99_ms"] for p in points]), "cpu_per_1k": median([p["cpu_per_1k"] for p in points]),
                "rounds": len(points),
            }
        s["sweep"] = per_c
        s["peak_rss_mb"] = entry.get("peak_rss_mb")
        s["peak_anon_mb"] = entry.get("peak_anon_mb")
        s["peak_pss_mb"] = entry.get("peak_pss_mb")
        s["rounds"] = rounds
        summary[name] = s
    return summary


# What the comparison of a target with its baseline reports: (summary key, label, better).
COMPARED = (
    ("json_ttlb_p50_added", "added p50 JSON, c=1 (ms)", "lower"),
    ("json_ttlb_p99_added", "added p99 JSON, c=1 (ms)", "lower"),
    ("sse_ttlb_p50_added", "added TTLB p50 SSE, c=1 (ms)", "lower"),
    ("max_rps", f"req/s (p99 < {P99_LIMIT_MS:g} ms)", "higher"),
    ("peak_rps", "peak req/s (any p99)", "higher"),
    ("json_cpu_per_1k", "CPU s / 1k req JSON", "lower"),
    ("peak_anon_mb", "peak RssAnon (MB)", "lower"),
    ("peak_pss_mb", "peak PSS (MB)", "lower"),
    ("peak_rss_mb", "VmHWM (MB)", "lower"),
)


def compare(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target run from a baseline tree beside the same target from this tree, same run:
    per metric (this tree, baseline, this ÷ baseline), and for the added p50 also the median of
    the per-round ratios (each round's pair measured back to back: the least noisy figure)."""
    pairs = []
    for name in report_order(summary):
        if not is_baseline(name) or base_of(name) not in summary:
            continue
        own, base = summary[base_of(name)], summary[name]
        rows = {key: [own.get(key), base.get(key), ratio(own.get(key), base.get(key))] for key, _, _ in COMPARED}
        per_round = [ratio(a, b) for a, b in zip(own["json_ttlb_p50_added_rounds"], base["json_ttlb_p50_added_rounds"])]
        pairs.append({"target": base_of(name), "baseline": name, "metrics": rows,
                      "added_p50_round_ratios": per_round, "added_p50_round_ratio": median(per_round)})
    return pairs
