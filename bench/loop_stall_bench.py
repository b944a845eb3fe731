"""Latency of a normal request, to check the loop-stall work (docs/SECURITY.md) costs it nothing.

    python -m bench.loop_stall_bench [--repo PATH] [--requests 300]

A real proxy process (``python -m proxy serve``, from the checkout at ``--repo``: compare two
commits) and the fake upstream; an agent session grows by one turn per request and each
request resends its newest 20 messages (system prompt first), non-streaming. Prints the median
and p90 of the client-measured latency and of the proxy's own ``added_ms`` (access log).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.fake_upstream import FakeUpstream
from tests.harness import free_port, open_tenant, write_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with FakeUpstream.run_in_thread() as upstream, tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), {"local": open_tenant(upstream.base_url)})
        port, log_path = free_port(), Path(tmp) / "proxy.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
                                       cwd=args.repo, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=60) as client:
                for _ in range(300):
                    try:
                        if client.get(url + "/ready").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
                system = {"role": "system", "content": "You are a careful coding agent. " * 20}
                history: list[dict] = []
                waits = []
                for i in range(args.requests):
                    history.append({"role": "user", "content": f"Step {i}: look at module {i} and tell me what parse_{i} returns."})
                    body = {"model": "fake-model", "messages": [system, *history[-19:]]}
                    started = time.perf_counter()
                    response = client.post(url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "bench"})
                    waits.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
                    history.append(response.json()["choices"][0]["message"])
        finally:
            process.terminate()
            process.wait(30)
        added = [float(m) for m in re.findall(r"added_ms=([\d.]+)", log_path.read_text())]
    waits = waits[len(waits) // 10:]  # warm-up
    added = added[len(added) // 10:]
    print(f"{args.repo}: {len(waits)} requests of 20 messages; client latency median {statistics.median(waits) * 1000:.2f} ms, "
          f"p90 {statistics.quantiles(waits, n=10)[-1] * 1000:.2f} ms; proxy added_ms median {statistics.median(added):.2f}, "
          f"p90 {statistics.quantiles(added, n=10)[-1]:.2f}")


if __name__ == "__main__":
    main()
