"""The aiohttp application factory: every resource the process owns is opened and closed here."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from typing import AsyncIterator

from aiohttp import web

from proxy import idle_gc, janitor, priority, tokens
from proxy.config import Config
from proxy.context.manager import ContextManager
from proxy.pipeline import Pipeline
from proxy.server import keys
from proxy.server.http import errors_middleware
from proxy.server.memory_routes import setup_memory_routes
from proxy.server.messages_routes import setup_messages_routes
from proxy.server.routes import setup_routes
from proxy.storage.base import Store
from proxy.storage.write_behind import WriteBehindStore
from proxy.upstream import Upstream, import_litellm

log = logging.getLogger("agent_state_proxy")


def create_app(config: Config, store: Store | None = None) -> web.Application:
    """Build the app; ``store`` overrides the LMDB store (tests pass an in-memory one)."""
    app = web.Application(middlewares=[_in_flight(priority.activity), errors_middleware], client_max_size=config.max_body_bytes)
    app[keys.CONFIG] = config
    app[keys.READY] = False
    app[keys.STARTED] = time.time()
    app.cleanup_ctx.append(_storage(store))
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_pipeline)
    app.cleanup_ctx.append(_memory)
    app.cleanup_ctx.append(_background)
    setup_routes(app)
    setup_memory_routes(app)
    setup_messages_routes(app)
    return app


def _in_flight(activity: priority.Activity):
    """Counts the requests in flight: what stalls the event loop waits for a quiet moment."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        activity.started()
        try:
            return await handler(request)
        finally:
            activity.ended()

    return middleware


def _storage(given: Store | None):
    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[keys.CONFIG]
        if given is not None:
            inner = given
        else:
            from proxy.storage.lmdb_store import LmdbStore

            path = config.data_dir / "lmdb"
            inner = await asyncio.to_thread(LmdbStore.open, str(path), map_size=config.map_size)
            log.info("store open at %s", path)
        store = WriteBehindStore(inner, batch_size=config.write_batch_size, flush_interval=config.flush_interval, queue_max=config.write_queue_max,
                                 cached_messages=config.transcript_cache_messages)
        await store.start()
        app[keys.STORE] = store
        yield
        app[keys.READY] = False
        await store.close()  # flushes every queued write before the process exits
        log.info("store flushed and closed")

    return context


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    upstream = Upstream(secrets=app[keys.CONFIG].secrets())
    await upstream.start()
    app[keys.UPSTREAM] = upstream
    yield
    await upstream.close()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    # The context manager owns background summarization tasks: stopped here, before the
    # upstream and the store they use are closed.
    context = ContextManager(app[keys.STORE], app[keys.UPSTREAM])
    app[keys.PIPELINE] = Pipeline(app[keys.STORE], app[keys.UPSTREAM], context=context)
    app[keys.READY] = True
    yield
    await context.close()


async def _memory(app: web.Application) -> AsyncIterator[None]:
    # Long-term memory loads its indexes and embedder in the background: the proxy serves at
    # once (requests go on without memories until a tenant's memory is ready).
    config, pipeline = app[keys.CONFIG], app[keys.PIPELINE]
    if not any(t.memory.enabled and not t.stateless for t in config.tenants.values()):
        yield
        return

    async def start() -> None:
        # numpy and usearch take ~0.3 s to import: off the loop, after the proxy serves.
        module = await asyncio.to_thread(importlib.import_module, "proxy.memory.service")
        service = module.MemoryService(app[keys.STORE], app[keys.UPSTREAM], config.tenants.values(), config.data_dir / "index")
        pipeline.memory = service  # from now on every recorded message is queued; earlier ones are caught up
        await service.start()

    starting = asyncio.create_task(start(), name="memory-start")
    yield
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    if pipeline.memory is not None:
        await pipeline.memory.close()  # before the store: queued memories are written, indexes saved


async def _background(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    pipeline = app[keys.PIPELINE]

    async def forget(tenant: str, session_id: str) -> None:
        if pipeline.memory is not None:
            await pipeline.memory.forget_session(tenant, session_id)

    tasks = [asyncio.create_task(janitor.run(app[keys.STORE], config.tenants.values(), config.janitor_interval, on_delete=forget))]
    tasks.append(asyncio.create_task(idle_gc.IdleCollector(priority.activity).run()))
    # The tokenizer's tables take ~0.2 s to load: warm them now rather than on the first request.
    tokens.begin_warming()
    tasks.append(asyncio.create_task(asyncio.to_thread(tokens.warm)))
    needs_litellm = any(
        not route.resolve("warmup").direct for tenant in config.tenants.values() for route in tenant.models.values()
    )
    if needs_litellm:
        # litellm takes seconds to import: do it now, off the event loop, not on a first request.
        tasks.append(asyncio.create_task(asyncio.to_thread(import_litellm)))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
