"""Process control for bench/run.py: start, ready-check, measure and stop the servers under test
and the load generator, and read what /proc says about them (CPU, RssAnon, PSS, VmHWM)."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc readers


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def status_kb(pid: int, key: str) -> int:
    """One field of /proc/PID/status in kB (VmHWM, VmRSS, RssAnon); 0 once the process is gone."""
    return status_like(f"/proc/{pid}/status", key)


def rollup_kb(pid: int, key: str) -> int:
    """One field of /proc/PID/smaps_rollup (e.g. ``Pss``: resident pages, shared ones divided
    among the processes that map them); 0 once the process is gone."""
    return status_like(f"/proc/{pid}/smaps_rollup", key)


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = status_like("/proc/meminfo", "MemTotal")
    import aiohttp

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "embedder": _embedder_versions(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "commit": head_commit(),
    }


def _embedder_versions() -> str:
    """The full target's local embedder and the runtime it runs on."""
    import importlib.metadata

    try:
        from proxy.memory.remote import LOCAL_ENGINES
    except ImportError:  # a tree whose memory package is laid out differently
        return "unknown"
    try:
        runtime = f"onnxruntime {importlib.metadata.version('onnxruntime')}"
    except importlib.metadata.PackageNotFoundError:
        runtime = "onnxruntime not installed"
    return f"{LOCAL_ENGINES['local'].name} ({runtime})"


def head_commit(tree: Path = REPO) -> str:
    """The HEAD commit of a checkout, read from .git (no git command needed); a worktree's
    .git is a file naming its git directory."""
    git = tree / ".git"
    try:
        if git.is_file():
            git = (tree / git.read_text().split(":", 1)[1].strip()).resolve()
            common = git / "commondir"
            refs = (git / common.read_text().strip()).resolve() if common.exists() else git
        else:
            refs = git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (refs / ref).exists():
            return (refs / ref).read_text().strip()[:12]
        for line in (refs / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def status_like(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 1.0, headers: dict[str, str] | None = None) -> int | None:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def http_json(url: str, headers: dict[str, str], timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Server:
    name: str
    cmd: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    tree: bool = False  # measure the whole process tree (LiteLLM), not just the process
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)
    max_anon_kb: int = 0  # largest RssAnon seen by sample_memory()
    max_pss_kb: int = 0  # largest PSS seen by sample_memory()
    started_at: float = 0.0  # time.monotonic() at start()

    def start(self) -> Server:
        self.started_at = time.monotonic()
        logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.environment(),
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        logfile.close()
        return self

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ASP_CONFIG")}
        return env | {"PYTHONUNBUFFERED": "1"} | self.env

    def wait_ready(self, timeout: float, headers: dict[str, str] | None = None) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if http_status(self.ready_url, headers=headers) == 200:
                self.pids = process_tree(self.proc.pid) if self.tree else [self.proc.pid]
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def peak_rss_mb(self) -> float:
        return sum(status_kb(pid, "VmHWM") for pid in self.pids) / 1024

    def rss_mb(self) -> float:
        return sum(status_kb(pid, "VmRSS") for pid in self.pids) / 1024

    def anon_mb(self) -> float:
        return sum(status_kb(pid, "RssAnon") for pid in self.pids) / 1024

    def pss_mb(self) -> float:
        return sum(rollup_kb(pid, "Pss") for pid in self.pids) / 1024

    def sample_memory(self) -> None:
        """Track the peaks of anonymous memory (heap), which VmHWM mixes with mapped files, and
        of PSS (what the process costs the machine, shared pages divided among their users)."""
        self.max_anon_kb = max(self.max_anon_kb, sum(status_kb(pid, "RssAnon") for pid in self.pids))
        self.max_pss_kb = max(self.max_pss_kb, sum(rollup_kb(pid, "Pss") for pid in self.pids))

    def terminate(self) -> None:
        """SIGTERM the process group this server leads (it was started in its own session)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, wait, then SIGKILL the group if it is still there."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for {timeout:g}s: SIGKILL")
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def stop_all(servers: list[Server]) -> None:
    """Stop servers in parallel: TERM to all, then wait for each."""
    started = time.monotonic()
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop(max(1.0, 15 - (time.monotonic() - started)))


class LoadGen:
    """The client process (bench/loadgen.py), one JSON line per step each way."""

    def __init__(self, log_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "loadgen.py")], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(log_path, "ab"), start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator failed to start: {log_path.read_text()[-2000:]}")

    def run(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": "run", **cmd}).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load generator died")
        result = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"load generator: {result['fatal']}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
