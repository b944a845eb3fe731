"""Embedders for memory: the process-wide local MiniLM, and any embedding model the tenant routes
through the proxy's Upstream (litellm or the direct OpenAI-compatible path)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Sequence

import numpy as np

from proxy.config import ResolvedModel
from proxy.memory.minilm_model import LocalMiniLM, MiniLM
from proxy.memory.minilm_int8 import QuantizedMiniLM
from proxy.upstream import Upstream

log = logging.getLogger("agent_state_proxy.memory")

# The bundled all-MiniLM-L6-v2 by engine: ``local`` (int8 on ONNX Runtime, the default: faster)
# and ``local-exact`` (float32 numpy, exactly sentence-transformers' vectors).
LOCAL_ENGINES: dict[str, type[MiniLM]] = {"local": QuantizedMiniLM, "local-exact": LocalMiniLM}

_local: dict[str, MiniLM] = {}
_local_lock = threading.Lock()


def local_model(engine: str = "local") -> MiniLM:
    """A bundled embedder, loaded once per process (~0.4 s; call off the event loop)."""
    with _local_lock:
        if engine not in _local:
            _limit_blas_threads()
            _local[engine] = LOCAL_ENGINES[engine]()
            log.info("local embedder %s loaded", _local[engine].name)
        return _local[engine]


def _limit_blas_threads() -> None:
    # A one-query embedding is a chain of small matmuls: BLAS threads only contend with the
    # event loop and each other on a small machine (docs/MEMORY.md, Embedders).
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")


class UpstreamEmbedder:
    """An Embedder over ``Upstream.embeddings``; ``embed`` is called from a worker thread (the
    EmbeddingBatcher's) and runs the HTTP call on the proxy's event loop."""

    def __init__(self, upstream: Upstream, route: ResolvedModel, dim: int, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.upstream, self.route, self.dim, self.timeout, self.loop = upstream, route, dim, timeout, loop
        self.name = route.model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        future = asyncio.run_coroutine_threadsafe(embed_remote(self.upstream, self.route, list(texts), self.timeout), self.loop)
        vectors = future.result(self.timeout + 5)
        if vectors.shape[1] != self.dim:
            raise RuntimeError(f"embedding model {self.name} returned {vectors.shape[1]}-d vectors, expected {self.dim}")
        return vectors


async def embed_remote(upstream: Upstream, route: ResolvedModel, texts: list[str], timeout: float) -> np.ndarray:
    """Unit-normalised float32 embeddings of ``texts`` (raises UpstreamError on failure)."""
    result: dict[str, Any] = await upstream.embeddings(route, {"model": route.requested, "input": texts}, timeout)
    data = sorted(result.get("data") or [], key=lambda item: item.get("index", 0))
    if len(data) != len(texts):
        raise RuntimeError(f"embedding model returned {len(data)} vectors for {len(texts)} inputs")
    vectors = np.array([item["embedding"] for item in data], dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
