"""Small real parts for unit tests of the memory service's modules: a tenant's state over the
in-memory store, memories with unit vectors."""

from __future__ import annotations

import asyncio

import numpy as np

from proxy.config import MemorySettings, TenantConfig
from proxy.memory.embedder_slots import EmbedderSlot
from proxy.memory.model import SEMANTIC, Memory, new_id
from proxy.memory.ops import IndexOp
from proxy.memory.state import TenantState

DIM = 16


def tenant_state(name: str = "t", ops: asyncio.Queue[IndexOp] | None = None, **memory: object) -> TenantState:
    settings = MemorySettings(**memory)  # type: ignore[arg-type]
    config = TenantConfig(name=name, api_key_hashes=frozenset(), allow_unauthenticated=True, allowed_clients=(), models={},
                          session_ttl=3600.0, history="client", concurrency="queue", upstream_timeout=30.0, memory=settings)
    return TenantState(name, settings, config, EmbedderSlot("local", "local/test"), ops if ops is not None else asyncio.Queue())


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def memory(state: TenantState, text: str, vector: np.ndarray | None = None, type: str = SEMANTIC, user: str | None = "u") -> Memory:
    return Memory(id=new_id(), type=type, text=text, ts=0.0, key=state.allocate_key(), user=user,
                  vector=vector, model="local/test" if vector is not None else None)
