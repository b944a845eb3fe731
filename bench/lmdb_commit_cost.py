"""What a durable turn + response id costs in LMDB on this disk, by parts.

    python bench/lmdb_commit_cost.py [--dir /tmp] [--repeat 60]

Raw LMDB with the proxy's durable flags (sync + metasync: two fdatasyncs a commit, data then
meta page), records the size of the Responses benchmark's (bench/responses_overhead.py): a
fresh session's turn is 22 messages (~300 B each) and the session (~1 KB); a response id's
record is ~3.5 KB (it keeps the request's input items). Medians in ms, durable and not, and
one 4 KiB write + fdatasync as the disk's floor. The question it answers: is it the response
id, the turn made durable with it, or the routine writes queued before it (the write-behind
commits its queue first, in order) that a `store: true` request pays for?
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid

import lmdb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where the scratch store goes (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=60)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="asp-commit-", dir=args.dir)
    try:
        for durable in (True, False):
            env = lmdb.open(directory, map_size=1 << 30, sync=durable, metasync=durable, readahead=False, writemap=False, max_dbs=4)
            messages, records = env.open_db(b"messages"), env.open_db(b"records")

            def turn(txn: lmdb.Transaction) -> None:
                session = uuid.uuid4().hex.encode()
                for seq in range(22):
                    txn.put(session + b"%06d" % seq, os.urandom(150) + b"x" * 150, db=messages)
                txn.put(b"session:" + session, b"y" * 1000, db=records)

            def pointer(txn: lmdb.Transaction) -> None:
                txn.put(b"resp_" + uuid.uuid4().hex.encode(), b"z" * 3500, db=records)

            cases = {"response id alone": [pointer], "turn alone": [turn], "turn + response id": [turn, pointer],
                     "turn + response id + 2 queued turns": [turn] * 3 + [pointer],
                     "turn + response id + 7 queued turns": [turn] * 8 + [pointer]}
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.repeat):
                for name, parts in cases.items():  # interleaved: the disk's mood hits every case alike
                    started = time.perf_counter()
                    with env.begin(write=True) as txn:
                        for part in parts:
                            part(txn)
                    samples[name].append((time.perf_counter() - started) * 1000)
            env.close()
            print("durable" if durable else "not synced", {name: round(statistics.median(v), 2) for name, v in samples.items()})
        fd = os.open(os.path.join(directory, "floor"), os.O_WRONLY | os.O_CREAT)
        floor = []
        for _ in range(args.repeat):
            os.pwrite(fd, b"a" * 4096, 0)
            started = time.perf_counter()
            os.fdatasync(fd)
            floor.append((time.perf_counter() - started) * 1000)
        os.close(fd)
        print("one 4 KiB write + fdatasync", round(statistics.median(floor), 2))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
