"""Process-wide interpreter settings of the server: when the GIL changes hands, when CPython collects.

Both are set once, by ``serve`` (proxy/cli.py), before the event loop starts; nothing else in
the proxy changes them. Each is kept because a benchmark showed its gain (docs/BENCHMARKS.md,
"Interpreter tuning"); the numbers live there, not here, so they can be measured again.
"""

from __future__ import annotations

import sys

from proxy import idle_gc

# Seconds a thread may hold the GIL while another waits for it (CPython's default is 0.005).
# Embedding and LMDB-writer threads take the GIL back several times per job; each take waits up
# to this long while the event loop runs Python (docs/BENCHMARKS.md: Interpreter tuning).
SWITCH_INTERVAL = 0.0001


def configure_server() -> None:
    """The settings of a long-running server process (not of tests or tools)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    # A full (generation 2) collection traverses the whole long-lived heap; it runs while no
    # request is in flight instead (proxy/idle_gc.py; docs/BENCHMARKS.md: Interpreter tuning).
    idle_gc.disable_automatic_full_collection()
