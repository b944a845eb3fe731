"""The embedding models of the tenants: one slot per model, loaded (local) or probed (remote
through the upstream) in the background, with two batchers each."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from proxy import priority
from proxy.config import LOCAL_EMBEDDERS, MemorySettings, TenantConfig
from proxy.memory.embedder import EmbeddingBatcher
from proxy.memory.remote import LOCAL_ENGINES, UpstreamEmbedder, embed_remote, local_model
from proxy.upstream import Upstream

log = logging.getLogger("agent_state_proxy.memory")

_EMBED_CHUNK = 16


class EmbedderSlot:
    """One embedding model with two batchers: queries never wait behind indexing batches."""

    def __init__(self, key: str, model_name: str) -> None:
        self.key, self.model_name = key, model_name
        self.query: EmbeddingBatcher | None = None
        self.index: EmbeddingBatcher | None = None
        self.dim: int | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()

    @property
    def local(self) -> bool:
        return self.key in LOCAL_EMBEDDERS

    def set(self, embedder: Any) -> None:
        self.dim = int(embedder.dim)
        self.query = EmbeddingBatcher(embedder, max_batch=16)
        self.index = EmbeddingBatcher(embedder, max_batch=_EMBED_CHUNK, background=priority.requests.pause_for_requests,
                                      worker_initializer=priority.background_thread)
        self.error = None
        self.ready.set()

    async def close(self) -> None:
        for batcher in (self.query, self.index):
            if batcher is not None:
                await batcher.aclose()


def embedder_key(tenant: str, settings: MemorySettings) -> str:
    """Tenants share a local model; a remote one is per tenant (its route is the tenant's)."""
    alias = settings.embedder
    return alias if alias in LOCAL_EMBEDDERS else f"{tenant}:{alias}"


def model_name(config: TenantConfig) -> str:
    alias = config.memory.embedder
    if alias in LOCAL_EMBEDDERS:
        return f"local/{LOCAL_ENGINES[alias].name}"
    route = config.route(alias)
    return route.model if route else alias


async def init_embedder(slot: EmbedderSlot, config: TenantConfig, upstream: Upstream, on_ready: Callable[[EmbedderSlot], None]) -> None:
    """Load the local model, or probe the remote one until it answers; ``on_ready`` once up."""
    alias = config.memory.embedder
    if alias in LOCAL_EMBEDDERS:
        try:
            slot.set(await asyncio.to_thread(local_model, alias))
        except Exception as exc:
            slot.error = str(exc)
            log.error("memory: the local embedder could not load (%s); memory is lexical only", exc)
        else:
            on_ready(slot)
        return
    route = config.route(alias)
    timeout = min(config.upstream_timeout, 30.0)
    delay = 1.0
    while True:
        try:
            probe = await embed_remote(upstream, route, ["dimension probe"], timeout)
            slot.set(UpstreamEmbedder(upstream, route, int(probe.shape[1]), timeout, asyncio.get_running_loop()))
            log.info("memory: embedder %s ready (%d dimensions)", slot.model_name, slot.dim)
            on_ready(slot)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            slot.error = str(exc)[:300]
            log.warning("memory: embedder %s unavailable (%s); retrying in %.0fs", slot.model_name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
