"""What integrity costs: record checksums on the hot path, chain-hash checks on a session's first
load, and the structural checks, verify and backup on a large store.

    python bench/integrity_bench.py [--sessions 10000] [--messages-per-session 100] [--store DIR]

Hot path: encode/decode of a typical ~1 KB message record with and without the CRC-32 (format 2
vs 1), and transcript.broken_chains per message. Store: built once like bench/recovery_bench.py
(direct LMDB writes of the layout the proxy writes), or reused with --store; then the start-up
edge check, the full structural scan (the proxy's background check), `verify` and `backup`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recovery_bench import build  # noqa: E402
from proxy import codec, transcript  # noqa: E402
from proxy.records import Message  # noqa: E402
from proxy.storage import maintenance  # noqa: E402
from proxy.storage.lmdb_store import LmdbStore  # noqa: E402


def _per_call(fn, number: int) -> float:
    """µs per call, one round of ``number`` calls."""
    return timeit.timeit(fn, number=number) / number * 1e6


def _side_by_side(first, second, number: int, rounds: int = 9) -> tuple[float, float]:
    """Medians of interleaved rounds (the machine's noise hits both alike)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(_per_call(first, number))
        b.append(_per_call(second, number))
    return statistics.median(a), statistics.median(b)


def hot_path() -> None:
    body = {"role": "assistant", "content": "lorem ipsum dolor sit amet " * 30}
    message = Message(seq=41, parent=40, chain="ab" * 16, role="assistant", body=body, ts=time.time(), tokens=180,
                      request_id="req-" + "0" * 32, model="gpt-4o-mini", latency_ms=812.5, finish_reason="stop")
    v2 = codec.encode(message)
    v1 = b"\x01" + orjson.dumps(message)
    print(f"record: {len(v2)} bytes")
    enc1, enc2 = _side_by_side(lambda: b"\x01" + orjson.dumps(message), lambda: codec.encode(message), 20000)
    dec1, dec2 = _side_by_side(lambda: codec.decode(v1), lambda: codec.decode(v2), 20000)
    print(f"encode  v1 (no checksum) {enc1:6.2f} µs   v2 (CRC-32) {enc2:6.2f} µs   (+{enc2 - enc1:.2f})")
    print(f"decode  v1 (no checksum) {dec1:6.2f} µs   v2 (CRC-32) {dec2:6.2f} µs   (+{dec2 - dec1:.2f})")
    messages, chain = [], transcript.ROOT_CHAIN
    for seq in range(1000):
        body = {"role": "user" if seq % 2 == 0 else "assistant", "content": f"message {seq} " + "lorem ipsum " * 20}
        chain = transcript.chain_hash(chain, body)
        messages.append(Message(seq=seq, parent=seq - 1 if seq else None, chain=chain, role=body["role"], body=body, ts=0.0))
    per_session = statistics.median(_per_call(lambda: transcript.broken_chains(messages), 3) for _ in range(7))
    print(f"chain check of a 1,000-message session (first load per process): {per_session / 1000:.2f} ms "
          f"({per_session / 1000:.2f} µs a message)")


def timed(label: str, fn):
    started = time.monotonic()
    result = fn()
    print(f"{label}: {(time.monotonic() - started) * 1000:.2f} ms")
    return result


def store_checks(path: Path) -> None:
    size = (path / "data.mdb").stat().st_size
    print(f"store: {path} ({size / 1e6:.0f} MB)")
    os.system("sync")
    store = LmdbStore.open(str(path), map_size=size * 2)
    try:
        timed("start-up edge check (before /ready)", store.check_edges)
        count = timed("full structural scan (background, every key)", store.check_structure)
        print(f"  {count} records")
    finally:
        asyncio.run(store.close())
    report = timed("verify (every record: checksum, decoding, chain hashes, checkpoints)", lambda: maintenance.verify(path))
    print(f"  {report.records} records, {report.sessions} sessions, {report.messages} messages, damaged: {report.damaged}")
    target = Path(tempfile.mkdtemp(prefix="integrity-backup-")) / "copy"
    try:
        made = timed("backup (compacting copy)", lambda: maintenance.backup(path, target))
        print(f"  {made['bytes'] / 1e6:.0f} MB written")
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--messages-per-session", type=int, default=100)
    parser.add_argument("--store", type=Path, help="an existing LMDB directory to check instead of building one")
    parser.add_argument("--hot-path-only", action="store_true")
    args = parser.parse_args()
    hot_path()
    if args.hot_path_only:
        return 0
    if args.store is not None:
        store_checks(args.store)
        return 0
    directory = Path(tempfile.mkdtemp(prefix="integrity-"))
    try:
        path = directory / "lmdb"
        timed(f"build {args.sessions} sessions x {args.messages_per_session} messages", lambda: build(path, args.sessions, args.messages_per_session))
        store_checks(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
