"""Profile one benchmark target under the benchmark's workload with py-spy.

    pip install py-spy          # into the project's virtualenv
    python bench/profile_target.py --target state --concurrency 4 --seconds 20 [--stream]

Starts the fake upstream and the target exactly as bench/run.py does, drives it with the
load generator, samples the target's process with ``py-spy record`` (all threads, idle
excluded) and prints the functions with the most samples: self time and inclusive time.
The collapsed stacks are kept (``--out``, default bench/results/profile-<target>.txt) for
a flame graph (e.g. ``flamegraph.pl`` or speedscope.app).
"""

from __future__ import annotations

import argparse
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def top(collapsed: Path, limit: int) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_counts[frames[-1]] += n
        for frame in set(frames):
            incl_counts[frame] += n
    lines = [f"{total} samples", "", f"top {limit} by self time:"]
    for frame, n in self_counts.most_common(limit):
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    lines += ["", f"top {limit} by inclusive time:"]
    for frame, n in incl_counts.most_common(limit):
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="state", choices=[t for t in bench.KNOWN_TARGETS if t != "direct"])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--stream", action="store_true", help="SSE requests instead of JSON")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--out", help="collapsed stacks file")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    out = Path(args.out or bench.BENCH / "results" / f"profile-{args.target}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="asp-profile-"))
    cleanup = [workdir]
    port = bench.free_port()
    origin = f"http://127.0.0.1:{port}"
    upstream = bench.Server("fake-upstream", [sys.executable, str(bench.BENCH / "upstream.py"), "--port", str(port)], origin + "/v1/models", workdir / "upstream.log")
    servers = [upstream]
    master_key = "sk-bench-" + secrets.token_hex(16)
    loadgen = None
    try:
        upstream.start().wait_ready(30)
        full = bench.FullSeed("prof", max(args.concurrency, 2), bench.QUICK_FULL_TURNS, bench.QUICK_FULL_MEMORIES)
        targets, skipped = bench.build_targets([args.target], workdir, upstream, origin, master_key, True, cleanup, servers, full)
        if not targets:
            print(f"{args.target} skipped: {skipped.get(args.target)}", file=sys.stderr)
            return 1
        target = targets[0]
        loadgen = bench.LoadGen(workdir / "loadgen.log")
        headers = {"Authorization": f"Bearer {master_key}"}
        common = dict(target=target.name, url=target.chat_url, stream=args.stream, headers=headers, run_id="prof")
        loadgen.run(concurrency=2, duration=2.0, **common)  # warm-up
        pid = target.server.pids[0]
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                                "--output", str(out), "--duration", str(int(args.seconds)), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(loadgen.run(concurrency=args.concurrency, duration=args.seconds + 1, **common)))
        worker.start()
        spy.wait()
        worker.join()
        print(f"{target.name}: {result.get('n')} requests in {result.get('elapsed', 0):.1f}s, "
              f"p50 {bench.pct(result.get('ttlb_ms', []), 50):.2f} ms, errors {result.get('errors')}")
        if spy.returncode != 0:
            print(spy.stderr.read().decode(errors="replace"), file=sys.stderr)
            return 1
        print(top(out, args.limit))
        print(f"\ncollapsed stacks: {out}")
    finally:
        if loadgen is not None:
            loadgen.close()
        bench.stop_all(servers)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
