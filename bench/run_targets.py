"""The targets of bench/run.py: what each one is, the tenant config it runs with, how its store
is seeded, how it is started and when it is ready, and the checks of its state after the run.

A target may also run from another source tree (``--baseline-tree`` / ``--baseline``): its name
is then ``<target>@<label>`` and it is started with that tree as its working directory and
PYTHONPATH, so the two revisions are measured side by side in one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from run_procs import BENCH, REPO, Server, free_port, head_commit, http_json, log
ALL_TARGETS = ("direct", "passthrough", "stateless", "state", "state-sync", "full", "litellm")
EXTRA_TARGETS = ("state-tmpfs",)  # diagnostics, only when asked for by --targets
KNOWN_TARGETS = ALL_TARGETS + EXTRA_TARGETS
LABELS = {
    "direct": "direct (client → fake upstream)",
    "passthrough": "pass-through floor (bench/passthrough.py)",
    "stateless": "agent-state-proxy, stateless",
    "state": "agent-state-proxy, state only",
    "state-sync": "agent-state-proxy, state only, every turn synced",
    "state-tmpfs": "agent-state-proxy, state only, LMDB on tmpfs",
    "full": "agent-state-proxy, full (state + compression + memory)",  # + sizes: full_label()
    "litellm": "LiteLLM proxy 1.106.12",
}
LITELLM_VERSION = "1.106.12"
LITELLM_VENV = BENCH / ".venv-litellm"
UPSTREAM_KEY = "upstream-secret-key"
FULL_TURNS, FULL_MEMORIES = 500, 100_000  # the full target's seeded history (issue #6)
QUICK_FULL_TURNS, QUICK_FULL_MEMORIES = 50, 2_000
FULL_MEMORY_TIMEOUT = 420.0  # seconds for the full proxy to load its memories and build the index
SEPARATOR = "@"  # <target>@<label>: the target run from a baseline tree


def base_of(name: str) -> str:
    """The target a name stands for: ``state@fc2cb1c`` -> ``state``."""
    return name.split(SEPARATOR, 1)[0]


def is_full(name: str) -> bool:
    """The full target, or the same target run from a baseline tree."""
    return base_of(name) == "full"


def is_baseline(name: str) -> bool:
    return SEPARATOR in name


def report_order(names: Iterable[str]) -> list[str]:
    """Targets in report order; each target's baseline right after it."""
    present = set(names)
    order = []
    for name in KNOWN_TARGETS:
        if name in present:
            order.append(name)
        order += sorted(n for n in present if is_baseline(n) and base_of(n) == name)
    return order


# ------------------------------------------------------------------------- target set-up


# Every tenant builder returns (tenant, "") or (None, why the target is skipped). Each tree
# checks the config it is given (`proxy check-config`); a key it does not know skips the target.
FEATURES_OFF = {"context": {"strategy": []}, "memory": {"enabled": False}}  # both default on


def stateless_tenant(upstream_base: str) -> tuple[dict[str, Any] | None, str]:
    from tests.harness import open_tenant

    return open_tenant(upstream_base, stateless=True), ""


def state_tenant(upstream_base: str) -> tuple[dict[str, Any] | None, str]:
    """Session state only: session header, history reconciliation, LMDB recording with the
    default persistence policy; context management and memory off."""
    from tests.harness import open_tenant

    return open_tenant(upstream_base) | FEATURES_OFF, ""


def state_sync_tenant(upstream_base: str) -> tuple[dict[str, Any] | None, str]:
    """State only, every turn synced to disk before the response (``persistence.mode: sync``)."""
    tenant, _ = state_tenant(upstream_base)
    return tenant | {"persistence": {"mode": "sync"}}, ""


# With an unknown model the proxy budgets an 8k-token fallback window, and this workload's
# histories (3-4k tokens) would never need compressing. A 3k-token budget (prompt + the
# 1k-token completion reserve) makes context management compress every request.
FULL_MAX_CONTEXT_TOKENS = 3072


def full_tenant(upstream_base: str) -> tuple[dict[str, Any] | None, str]:
    """The tenant YAML for "full" mode: state + context compression + memory retrieval.

    The proxy's defaults for both (context: every strategy, extractive summaries as no
    summarizer model is set; memory: enabled, local embedder, user scope, episodic memories,
    injection into the system prompt), with ``max_context_tokens`` small enough that
    compression runs on every request. Its store is seeded (bench/seed_full.py) before it
    starts.
    """
    from tests.harness import open_tenant

    return open_tenant(upstream_base) | {
        "context": {"max_context_tokens": FULL_MAX_CONTEXT_TOKENS},
        "memory": {"enabled": True},
    }, ""


def state_tmpfs_tenant(upstream_base: str) -> tuple[dict[str, Any] | None, str]:
    return state_tenant(upstream_base)


# Proxy targets: name -> (tenant builder, LMDB on /dev/shm)
PROXY_TARGETS: dict[str, tuple[Callable[[str], tuple[dict[str, Any] | None, str]], bool]] = {
    "stateless": (stateless_tenant, False),
    "state": (state_tenant, False),
    "state-sync": (state_sync_tenant, False),
    "state-tmpfs": (state_tmpfs_tenant, True),
    "full": (full_tenant, False),
}


def write_proxy_config(directory: Path, tenant: dict[str, Any], data_dir: Path | None = None) -> Path:
    from tests.harness import write_config

    sections = {"storage": {"data_dir": str(data_dir)}} if data_dir else {}
    return write_config(directory, {"bench": tenant}, **sections)


def litellm_exe(install: bool) -> tuple[Path | None, str]:
    """bench/.venv-litellm/bin/litellm with litellm[proxy]==LITELLM_VERSION, created on first use."""
    python, exe = LITELLM_VENV / "bin" / "python", LITELLM_VENV / "bin" / "litellm"

    def installed_version() -> str | None:
        if not python.exists():
            return None
        probe = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True, text=True,
        )
        return probe.stdout.strip() if probe.returncode == 0 else None

    if installed_version() == LITELLM_VERSION and exe.exists():
        return exe, ""
    if not install:
        return None, "bench/.venv-litellm is missing and --no-install was given"
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (first use; a minute or two)")
    base_python = shutil.which("python3") or sys.executable
    try:
        if not python.exists():
            subprocess.run([base_python, "-m", "venv", str(LITELLM_VENV)], check=True, capture_output=True, text=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True, capture_output=True, text=True, timeout=1200,
        )
    except subprocess.CalledProcessError as exc:
        return None, f"installing litellm[proxy]=={LITELLM_VERSION} failed: {(exc.stderr or exc.stdout or '')[-1500:]}"
    except subprocess.TimeoutExpired:
        return None, f"installing litellm[proxy]=={LITELLM_VERSION} timed out"
    if installed_version() != LITELLM_VERSION:
        return None, f"litellm {installed_version()} installed, wanted {LITELLM_VERSION}"
    return exe, ""


@dataclass
class Target:
    name: str
    chat_url: str
    server: Server | None  # the process(es) whose CPU and memory are measured
    load: dict[str, Any] = field(default_factory=dict)  # extra loadgen command fields (workload, headers)


@dataclass
class FullSeed:
    """The full target's seeded history (bench/seed_full.py): sizes in, timings out."""

    run_id: str
    streams: int  # client streams the full target can use in this run (a few sessions each)
    turns: int
    memories: int
    report: dict[str, Any] = field(default_factory=dict)

    def sessions(self) -> list[str]:
        from seed_full import session_ids

        return session_ids(self.run_id, self.streams)

    def load(self) -> dict[str, Any]:
        """What the loadgen needs to play the full target's clients."""
        from workload import BENCH_USER

        return {"workload": "window", "stored_turns": self.turns, "extra_headers": {"X-User-ID": BENCH_USER}}


def tree_env(tree: Path | None) -> dict[str, str] | None:
    """The environment of a process that must run ``tree``'s code (None: this tree's)."""
    return None if tree is None else os.environ | {"PYTHONPATH": str(tree)}


def seed_full_store(config: Path, seed: FullSeed, tree: Path | None = None) -> None:
    """Store the long sessions and the user's memories before the full proxy starts; with a
    baseline's ``tree``, by that tree's own seeding code, in the layout its proxy reads."""
    from seed_full import seed as write_seed

    log(f"seeding full: {len(seed.sessions())} sessions ({seed.streams} client streams) x {seed.turns} turns, {seed.memories} memories")
    if tree is not None:
        done = subprocess.run([sys.executable, "bench/seed_full.py", "--config", str(config), "--run-id", seed.run_id, "--streams", str(seed.streams),
                               "--turns", str(seed.turns), "--memories", str(seed.memories)], cwd=tree, env=tree_env(tree), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"seeding from {tree} failed:\n{done.stderr[-3000:]}")
        log(f"seeded by {tree.name}: {done.stdout.strip()}")
        return  # the same seed as the full target's: reported once, there
    report = write_seed(config, "bench", seed.sessions(), seed.turns, seed.memories)
    log(f"seeded in {report['total_s']:.1f} s ({report})")
    seed.report = report
    seed.report["query_embedding_floor_ms"] = query_embedding_floor(seed)
    log(f"query embedding floor (this process, one core, nothing else running): {seed.report['query_embedding_floor_ms']} ms")


def query_embedding_floor(seed: FullSeed, repeats: int = 40) -> float:
    """Median time to embed a full-mode query as the proxy does (the local MiniLM, one BLAS
    thread, the query shortened the proxy's way), here in this process with nothing competing."""
    import statistics

    from threadpoolctl import threadpool_limits

    from workload import WindowConversation

    try:
        from proxy.memory.remote import local_model
        from proxy.memory.recall import shorten as _shorten
    except ImportError as exc:  # the memory package was laid out differently: no floor, say why
        log(f"query embedding floor not measured: {exc}")
        return float("nan")

    conversation = WindowConversation(seed.sessions()[0], seed.turns)
    _, _, query = conversation.next_request(False)
    model, text = local_model(), _shorten(query)
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        for i in range(repeats + 5):
            started = time.perf_counter()
            model.embed([text])
            if i >= 5:
                times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def wait_memory_indexed(target: Target, headers: dict[str, str], seed: FullSeed, timeout: float) -> None:
    """Block until the full proxy has loaded every seeded memory, from their stored vectors,
    and built its HNSW index: before that, retrieval is exact or lexical and measures nothing."""
    from seed_full import model_name

    url = target.chat_url.replace("/v1/chat/completions", "/admin/memory")
    assert target.server is not None
    deadline = target.server.started_at + timeout
    stats: Any = None
    while time.monotonic() < deadline:
        if target.server.proc is not None and target.server.proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited while loading its memories:\n{target.server.tail()}")
        try:
            stats = http_json(url, headers, timeout=10)
        except (OSError, ValueError) as exc:  # 503 while memory starts
            stats = {"error": str(exc)}
        index = stats.get("index") or {}
        embedder = (stats.get("embedder") or {}).get("name")
        if embedder and embedder != model_name():
            raise RuntimeError(f"full: the proxy's embedder is {embedder!r}, the seeded vectors are {model_name()!r}: it would re-embed them")
        if stats.get("ready") and index.get("unembedded"):
            raise RuntimeError(f"full: {index['unembedded']} seeded memories were loaded without their vectors")
        if stats.get("ready") and index.get("hnsw_ready") and index.get("hnsw_entries", 0) >= seed.memories:
            ready_s = round(time.monotonic() - target.server.started_at, 1)
            log(f"{target.name}: {index.get('memories')} memories loaded and indexed {ready_s:.1f} s after start")
            if target.name == "full":
                seed.report["index_ready_s"], seed.report["memories_loaded"] = ready_s, index.get("memories")
            return
        time.sleep(0.5)
    raise RuntimeError(f"full: memory not ready and indexed {timeout:.0f} s after start (last /admin/memory: {stats}):\n{target.server.tail()}")


def build_targets(names: list[str], workdir: Path, upstream: Server, upstream_origin: str, master_key: str, install_litellm: bool, cleanup: list[Path], started: list[Server], full: FullSeed,
                  baselines: dict[str, Path] | None = None) -> tuple[list[Target], dict[str, str]]:
    """Start every requested server (in parallel) and wait until each is ready.

    The full target's store is seeded before it starts, and it is ready only once its
    memories are loaded and indexed. Every server started is appended to ``started`` at once,
    so the caller stops it however this ends; every directory to delete afterwards goes to
    ``cleanup``. ``baselines``: the source tree of each baseline target (``<target>@<label>``),
    whose check, seeding and server run that tree's code (its working directory and PYTHONPATH)."""
    baselines = baselines or {}
    upstream_base = upstream_origin + "/v1"
    skipped: dict[str, str] = {}
    pending: list[tuple[str, Server, float, dict[str, str] | None]] = []
    targets: list[Target] = []
    for name in names:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        logfile = workdir / f"{name}.log"
        if name == "direct":
            targets.append(Target(name, upstream_base + "/chat/completions", upstream))
            continue
        if name == "passthrough":
            server = Server(name, [sys.executable, str(BENCH / "passthrough.py"), "--port", str(port), "--upstream", upstream_origin, "--api-key", UPSTREAM_KEY], origin + "/health", logfile)
            pending.append((name, server, 30, None))
        elif base_of(name) in PROXY_TARGETS:
            builder, on_tmpfs = PROXY_TARGETS[base_of(name)]
            tree = baselines.get(name)
            cwd = tree or REPO
            tenant, why = builder(upstream_base)
            if tenant is None:
                skipped[name] = why
                continue
            data_dir = None
            if on_tmpfs:
                if not Path("/dev/shm").is_dir():
                    skipped[name] = "no /dev/shm on this machine"
                    continue
                data_dir = Path(tempfile.mkdtemp(prefix="asp-bench-lmdb-", dir="/dev/shm"))
                cleanup.append(data_dir)
            config = write_proxy_config(workdir / name, tenant, data_dir)
            check = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(config)], cwd=cwd, env=tree_env(tree), capture_output=True, text=True)
            if check.returncode != 0:
                skipped[name] = f"tenant config rejected: {check.stderr.strip() or check.stdout.strip()}"
                continue
            if is_full(name):
                seed_full_store(config, full, tree)
            env = {"PYTHONPATH": str(tree)} if tree else {}
            server = Server(name, [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)], origin + "/ready", logfile, env=env, cwd=cwd)
            pending.append((name, server, 60, None))
        elif name == "litellm":
            exe, why = litellm_exe(install_litellm)
            if exe is None:
                skipped[name] = why
                log(f"litellm skipped: {why}")
                continue
            cfg = {
                "model_list": [{
                    "model_name": "fake-model",
                    "litellm_params": {"model": "openai/fake-model", "api_base": upstream_base, "api_key": UPSTREAM_KEY},
                }],
                "general_settings": {"master_key": master_key},
            }
            cfg_path = workdir / "litellm-config.yaml"
            cfg_path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
            env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": master_key}
            server = Server(name, [str(exe), "--config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port)], origin + "/health/readiness", logfile, env=env, cwd=workdir, tree=True)
            pending.append((name, server, 180, None))
        else:
            raise SystemExit(f"unknown target {name!r} (known: {', '.join(KNOWN_TARGETS)})")
        targets.append(Target(name, origin + "/v1/chat/completions", server, full.load() if is_full(name) else {}))
    for name, server, _, _ in pending:
        log(f"starting {name}")
        started.append(server)
        server.start()
    for name, server, timeout, headers in pending:
        try:
            server.wait_ready(timeout, headers)
        except RuntimeError as exc:
            if name == "litellm":
                skipped[name] = f"LiteLLM proxy did not start: {exc}"
                log(skipped[name])
                server.stop()
                targets = [t for t in targets if t.name != name]
                continue
            raise
    for target in targets:
        if is_full(target.name):
            wait_memory_indexed(target, {"Authorization": f"Bearer {master_key}"}, full, FULL_MEMORY_TIMEOUT)
    return targets, skipped


# ------------------------------------------------------------------------------ baselines


def checkout_baseline(revision: str, workdir: Path) -> Path:
    """A detached worktree of ``revision`` (a commit of this repository) in the run's workdir."""
    found = subprocess.run(["git", "rev-parse", "--short=7", "--verify", revision + "^{commit}"], cwd=REPO, capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"--baseline {revision}: not a commit of this repository ({found.stderr.strip()})")
    short = found.stdout.strip()
    tree = workdir / f"baseline-{short}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), short], cwd=REPO, check=True, capture_output=True)
    return tree


def baseline_tree(path: str) -> Path:
    """A checkout given by --baseline-tree: it must hold the proxy and the bench's seeder."""
    tree = Path(path).expanduser().resolve()
    for needed in ("proxy/__main__.py", "bench/seed_full.py"):
        if not (tree / needed).is_file():
            raise SystemExit(f"--baseline-tree {path}: no {needed} there (not a checkout of this project)")
    if tree == REPO:
        log("--baseline-tree is this checkout: both sides run the same code (a noise check)")
    return tree


def prepare_baseline(tree: Path) -> str:
    """The label of a baseline tree's targets (its commit, else its directory name). Copies the
    seed's sentence vectors (git-ignored, minutes to embed) into its cache when it lacks them."""
    cache = tree / "bench" / "results"
    cache.mkdir(parents=True, exist_ok=True)
    for cached in (BENCH / "results").glob("seed-sentences-*.npy"):
        if not (cache / cached.name).exists():
            shutil.copy2(cached, cache / cached.name)
    commit = head_commit(tree)
    return commit[:7] if commit != "unknown" else tree.name


def add_baselines(names: list[str], paired: list[str], label: str) -> list[str]:
    """Insert ``<target>@<label>`` right after each paired target (at the end if it is not run):
    the pairs are measured back to back in every round. Returns the baseline names."""
    added = []
    for base in paired:
        if base not in PROXY_TARGETS:
            raise SystemExit(f"--baseline-targets: {base!r} is not a proxy target ({', '.join(PROXY_TARGETS)})")
        name = base + SEPARATOR + label
        names.insert(names.index(base) + 1 if base in names else len(names), name)
        added.append(name)
    return added


def check_state_sessions(target: Target, headers: dict[str, str]) -> dict[str, Any]:
    """Did reconciliation recognise every resent history? (no branches means yes)"""
    admin = target.chat_url.replace("/v1/chat/completions", "/admin/sessions")
    sessions: list[dict[str, Any]] = []
    url = admin + "?limit=1000"
    try:
        while url:  # the listing is paged: follow next_cursor to the end
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
                page = json.loads(response.read())
            sessions += page["data"]
            url = admin + "?limit=1000&after=" + page["next_cursor"] if page.get("has_more") else ""
    except (OSError, ValueError, KeyError) as exc:
        return {"error": str(exc)}
    return {
        "sessions": len(sessions),
        "turns": sum(s.get("turns", 0) for s in sessions),
        "branches": sum(s.get("branches", 0) for s in sessions),
        "messages": sum(s.get("next_seq", 0) for s in sessions),
    }


def check_full(target: Target, headers: dict[str, str], seed: FullSeed, restored: list[int]) -> dict[str, Any]:
    """Did the full target work as designed? Every request had its stored history restored
    (X-History-Restored), one seeded session is still one unbranched line, and memory recalls ran."""
    base = target.chat_url.replace("/v1/chat/completions", "")
    check: dict[str, Any] = {"restored_requests": restored[0], "requests": restored[1]}
    try:
        first = seed.sessions()[0]
        detail = http_json(f"{base}/admin/sessions/{first}", headers, timeout=60)
        messages = detail["messages"]
        check["first_session"] = {
            "id": first, "messages": len(messages), "active": sum(1 for m in messages if m["active"]),
            "branches": detail["session"]["branches"], "seeded": 1 + 2 * seed.turns,
        }
        memory = http_json(f"{base}/admin/memory", headers)
        check["memory"] = {"memories": memory["index"]["memories"], "hnsw_entries": memory["index"]["hnsw_entries"],
                           "counters": memory["counters"], "recall_latency_ms": memory["recall_latency_ms"],
                           "query_embedding_ms": memory.get("query_embedding_ms") or {},
                           "pending_jobs": memory["index"].get("pending_jobs")}
    except (OSError, ValueError, KeyError, IndexError) as exc:
        check["full_error"] = str(exc)
    return check

