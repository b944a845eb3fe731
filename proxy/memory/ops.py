"""The changes the index worker applies to a tenant's usearch index, one at a time, in order.

Small frozen values instead of tuples: what an op carries is named, and the worker matches on
the type (``proxy/memory/index_worker.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AddVectors:
    tenant: str
    keys: np.ndarray  # uint64 usearch keys
    vectors: np.ndarray  # one row per key


@dataclass(frozen=True)
class RemoveVectors:
    tenant: str
    keys: tuple[int, ...]


@dataclass(frozen=True)
class OpenIndex:
    """Start-up: use the saved index if it is intact and fits its manifest, else rebuild."""

    tenant: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class SaveIndex:
    tenant: str
    when_quiet: bool = False  # skip it if a request came in meanwhile (still dirty: saved later)


@dataclass(frozen=True)
class RebuildIndex:
    tenant: str


IndexOp = AddVectors | RemoveVectors | OpenIndex | SaveIndex | RebuildIndex
