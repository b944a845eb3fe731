"""The aiohttp application factory: every resource the process owns is opened and closed here."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from typing import AsyncIterator, Callable

from aiohttp import web

from proxy import idle_gc, janitor, jobs, priority, tokens
from proxy.config import Config
from proxy.context.manager import ContextManager
from proxy.pipeline import Pipeline
from proxy.quotas import Quotas
from proxy.server import access_log, keys
from proxy.server.body_probe import BodyProbe
from proxy.server.http import errors_middleware
from proxy.server.outcome import outcome_middleware
from proxy.server.learning_routes import setup_learning_routes
from proxy.server.memory_routes import setup_memory_routes
from proxy.server.metrics import METRICS, Metrics, setup_metrics_routes
from proxy.server.responses_routes import setup_responses_routes
from proxy.server.reload import reloading
from proxy.server.messages_routes import setup_messages_routes
from proxy.server.routes import setup_routes
from proxy.server.ui import setup_ui_routes
from proxy.storage.base import Store
from proxy.storage.write_behind import WriteBehindStore
from proxy.upstream import Upstream, import_litellm

log = logging.getLogger("agent_state_proxy")


def create_app(config: Config, store: Store | None = None, reload: Callable[[], Config] | None = None) -> web.Application:
    """Build the app; ``store`` overrides the LMDB store (tests pass an in-memory one);
    ``reload`` loads the configuration again (SIGHUP and changed files; the CLI passes it)."""
    metrics = Metrics()  # one registry per app: tests run many apps in one process
    app = web.Application(middlewares=[outcome_middleware(access_log.write, metrics.request), _in_flight(priority.activity), errors_middleware],
                          client_max_size=config.max_body_bytes)
    app[METRICS] = metrics
    app[keys.CONFIG] = config
    app[keys.READY] = False
    app[keys.STARTED] = time.time()
    app[keys.BODY_PROBE] = BodyProbe()  # large chat bodies are counted there (server/http.read_json)
    app.cleanup_ctx.append(_storage(store))
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_pipeline)
    app.cleanup_ctx.append(_memory)
    app.cleanup_ctx.append(_background)
    app.cleanup_ctx.append(_metrics)
    if reload is not None:
        app.cleanup_ctx.append(reloading(reload))
    setup_routes(app)
    setup_memory_routes(app)
    setup_learning_routes(app)
    setup_metrics_routes(app)
    setup_ui_routes(app)
    setup_responses_routes(app)
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
        tasks: list[asyncio.Task[None]] = []
        async with contextlib.AsyncExitStack() as resources:
            if given is not None:
                inner = given
            elif config.storage_backend == "postgres":
                from proxy.storage.postgres import PostgresStore

                settings = config.postgres
                inner = await PostgresStore.open(settings.dsn, pool_size=settings.pool_size, statement_timeout_ms=settings.statement_timeout_ms,
                                                 replicas=settings.replicas)
                log.info("store open on PostgreSQL (replicas: %s)", settings.replicas)
            else:
                from proxy.storage import maintenance
                from proxy.storage.lmdb_store import LmdbStore

                resources.enter_context(maintenance.serving_lock(config.data_dir))  # the only writer
                path = maintenance.store_path(config.data_dir)
                inner = await asyncio.to_thread(LmdbStore.open, str(path), map_size=config.map_size)
                log.info("store open at %s", path)
                tasks = await _integrity_checks(inner, config)
            store = WriteBehindStore(inner, batch_size=config.write_batch_size, flush_interval=config.flush_interval, queue_max=config.write_queue_max,
                                     cached_messages=config.transcript_cache_messages)
            store.on_flush = app[METRICS].flushed  # each batch's size and time
            await store.start()
            app[keys.STORE] = store
            app[keys.CLAIMS] = jobs.claims_for(inner)  # background jobs run once per fleet
            app[keys.QUOTAS] = Quotas({name: t.quotas for name, t in config.tenants.items()}, store,
                                      shared_counter=getattr(inner, "add_to_record", None) if store.shared else None)
            yield
            app[keys.READY] = False
            await app[keys.QUOTAS].close()  # the fleet's token counts this replica has not sent yet
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await store.close()  # flushes every queued write before the process exits
            log.info("store flushed and closed")

    return context


async def _integrity_checks(store, config: Config) -> list[asyncio.Task[None]]:
    """Before ready: the quick check of the B-tree's edges (a damaged root would fail every
    request). After: every page, in the background (~1 s per million records, docs/PERSISTENCE.md),
    and the scheduled backups. Damage found flips /ready to 503 (the store records it)."""
    from proxy.storage import maintenance
    from proxy.storage.base import StoreDamaged

    with contextlib.suppress(StoreDamaged):  # recorded by the store; /ready reports it
        await asyncio.to_thread(store.check_edges)

    async def scan() -> None:
        started = time.monotonic()
        try:
            count = await asyncio.to_thread(store.check_structure, priority.requests.pause_for_requests)
        except StoreDamaged:
            return  # logged by the store with what to run
        log.info("store structure checked: %d records readable in %.2f s", count, time.monotonic() - started)

    async def backups(directory, every_minutes: int, keep: int) -> None:
        while True:
            await asyncio.sleep(every_minutes * 60)
            try:
                made = await asyncio.to_thread(maintenance.take_backup, store.copy_to, directory, keep)
                log.info("backup written to %s", made)
            except Exception as exc:  # a failed backup must not stop the next one
                log.error("scheduled backup into %s failed: %s", directory, exc)

    tasks = [asyncio.create_task(scan(), name="store-structure-check")]
    if config.backup.dir is not None:
        tasks.append(asyncio.create_task(backups(config.backup.dir, config.backup.every_minutes, config.backup.keep), name="backups"))
    return tasks


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    upstream = Upstream(secrets=app[keys.CONFIG].secrets())
    await upstream.start()
    app[keys.UPSTREAM] = upstream
    yield
    await upstream.close()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    # The context manager owns background summarization tasks: stopped here, before the
    # upstream and the store they use are closed.
    context = ContextManager(app[keys.STORE], app[keys.UPSTREAM], claims=app[keys.CLAIMS])
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
        # Importing numpy and usearch would hold the loop: off it, after the proxy serves.
        module = await asyncio.to_thread(importlib.import_module, "proxy.memory.service")
        service = module.MemoryService(app[keys.STORE], app[keys.UPSTREAM], config.tenants.values(), config.data_dir / "index",
                                       claims=app[keys.CLAIMS])
        app[METRICS].backfill = service.learning.backfill.sessions
        pipeline.memory = service  # from now on every recorded message is queued; earlier ones are caught up
        await service.start()
        await service.loaded()
        idle_gc.settle_heap()  # the memory structures live as long as the process: out of the collector's scans

    starting = asyncio.create_task(start(), name="memory-start")
    yield
    if pipeline.memory is not None:
        starting.cancel()  # started; only the wait for loading is left
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    if pipeline.memory is not None:
        await pipeline.memory.close()  # before the store: queued memories are written, indexes saved


async def _metrics(app: web.Application) -> AsyncIterator[None]:
    # The pipeline reports to the metrics, which read the store's stats; the loop-lag monitor
    # samples how late timers fire.
    metrics = app[METRICS]
    metrics.store = app[keys.STORE]
    app[keys.PIPELINE].observer = metrics
    monitor = asyncio.create_task(metrics.loop_lag.run(), name="loop-lag")
    yield
    monitor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await monitor


async def _background(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    lifecycle = app[keys.PIPELINE].lifecycle  # what a deleted session leaves (memories, caches) goes with it
    tasks = [asyncio.create_task(janitor.run(app[keys.STORE], config.tenants.values(), config.janitor_interval, on_delete=lifecycle.forget,
                                           claims=app[keys.CLAIMS], hold=lifecycle.hold))]
    tasks.append(asyncio.create_task(idle_gc.IdleCollector(priority.activity).run()))
    # Loading the tokenizer's tables would delay the first request: warm them now instead.
    tokens.begin_warming()
    tasks.append(asyncio.create_task(asyncio.to_thread(tokens.warm)))
    needs_litellm = any(
        not route.resolve("warmup").direct for tenant in config.tenants.values() for route in tenant.models.values()
    )
    if needs_litellm:
        # litellm takes seconds to import: do it now, off the event loop, not on a first request.
        tasks.append(asyncio.create_task(asyncio.to_thread(import_litellm)))
    yield
    await app[keys.BODY_PROBE].close()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
