"""RssAnon of loading a tiktoken encoding, with and without its Python copy of the BPE ranks.

    python bench/tokenizer_memory.py keep|drop [cl100k_base|o200k_base]

What proxy/tokens.py saves by dropping ``_mergeable_ranks`` (docs/BENCHMARKS.md: Storage and
interpreter tuning). Run each mode in its own process; prints the RssAnon growth in MB.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import sys
from pathlib import Path


def rss_anon_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    mode, name = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cl100k_base"
    spec = importlib.util.find_spec("litellm")  # the encodings litellm ships, as the proxy loads them
    os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers")
    import tiktoken

    base = rss_anon_mb()
    encoding = tiktoken.get_encoding(name)
    if mode == "drop":
        encoding._mergeable_ranks = {}
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    encoding.encode("hello world " * 100)
    print(f"{name} {mode}: RssAnon +{rss_anon_mb() - base:.1f} MB")


if __name__ == "__main__":
    main()
