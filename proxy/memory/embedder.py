"""Text embedders for long-term memory.

* :class:`Embedder` -- the generic protocol (``dim``, ``name``, ``embed``) so a
  remote (e.g. litellm-backed) embedder can be dropped in later.
* the local all-MiniLM-L6-v2 engines: proxy/memory/minilm_model.py (numpy float32) and
  proxy/memory/minilm_int8.py (ONNX Runtime int8, the default).
* :class:`EmbeddingBatcher` -- asyncio micro-batcher: concurrent ``await
  batcher.embed(text)`` calls are computed together in one model call on a
  single worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np


__all__ = ["Embedder", "EmbeddingBatcher"]

_F32 = np.float32


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors."""

    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an ``(len(texts), dim)`` float32 array of unit vectors.

        Must be safe to call from a worker thread (the batcher does).
        """
        ...


# --------------------------------------------------------------------------- batcher


class EmbeddingBatcher:
    """Coalesce concurrent single-text embedding requests into model batches.

    ``await batcher.embed(text)`` returns one ``(dim,)`` float32 vector.  The
    model runs on a single worker thread (``loop.run_in_executor``):

    * worker idle: the request is dispatched at the end of the current
      event-loop tick (so requests issued together -- e.g. by ``gather`` --
      share a batch) or, if ``max_wait_ms > 0``, after at most that window;
      a full batch (``max_batch``) is dispatched at once;
    * worker busy: requests accumulate and the next batch (up to
      ``max_batch``) starts as soon as the current one finishes;
    * a batch of one text (a lone query) is tokenized on the loop before it goes to the
      worker, when the engine splits ``embed`` into ``prepare`` and ``embed_ids``.

    A model error is delivered to every caller of that batch.  ``close()``
    fails queued requests and shuts the executor down; a batch already running
    still completes and resolves its callers.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        background: Callable[[], None] | None = None,
        worker_initializer: Callable[[], None] | None = None,
    ) -> None:
        """``background``: called between units of work (see above); ``worker_initializer``: run
        once on the worker thread when it starts (e.g. proxy.priority.background_thread)."""
        self.embedder = embedder
        # Background batchers (indexing) pass this to a pausable embedder, which calls it
        # between layers: e.g. proxy.priority.requests.pause_for_requests.
        self.background = background if getattr(embedder, "pausable", False) else None
        self.dim = int(embedder.dim)
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder", initializer=worker_initializer)
        self._queue: deque[tuple[str, asyncio.Future[np.ndarray]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._closed = False
        self.batches_run = 0  # stats: model calls made
        self.texts_embedded = 0
        self.seconds_per_text = 0.0  # moving average of model time per text (0: not measured yet)
        self._inflight_texts = 0
        self._dispatched_at = 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    def expected_wait(self) -> float:
        """Seconds a text queued now would wait behind the others (the batch in flight and the
        queue ahead of it) at the measured time per text; 0 when the embedder is idle."""
        waiting = sum(1 for _, fut in self._queue if not fut.done())
        return (self._inflight_texts + waiting) * self.seconds_per_text

    async def embed(self, text: str) -> np.ndarray:
        return await self.submit(text)

    def submit(self, text: str, *, now: bool = False) -> asyncio.Future[np.ndarray]:
        """Queue ``text`` and return the future of its vector (call on the event loop).

        ``now``: if the worker is idle, start this text at once instead of at the end of the
        current event-loop tick. A request's query embedding uses it: the request goes on
        with CPU work that does not yield (context assembly, BM25), and a dispatch waiting for
        the tick would start the embedding only after all of that (measured: ~5 ms later)."""
        if self._closed:
            raise RuntimeError("EmbeddingBatcher is closed")
        if not isinstance(text, str):
            raise TypeError(f"embed() expects a str, got {type(text).__name__}")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._queue or self._busy:
                raise RuntimeError("EmbeddingBatcher is in use by another event loop")
            self._loop = loop
            self._scheduled = None
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.append((text, fut))
        if now and not self._busy:
            if self._scheduled is not None:
                self._scheduled.cancel()
            self._dispatch()
        else:
            self._kick()
        return fut

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """Embed several texts through the batcher -> ``(n, dim)`` array."""
        if not texts:
            return np.empty((0, self.dim), dtype=_F32)
        vecs = await asyncio.gather(*(self.embed(t) for t in texts))
        return np.stack(vecs)

    # ------------------------------------------------------------ internals

    def _kick(self) -> None:
        """Decide when the next batch runs (called on the event loop)."""
        if self._busy or not self._queue or self._closed:
            return  # a running batch re-kicks when it finishes
        assert self._loop is not None
        if len(self._queue) >= self.max_batch:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            self._dispatch()
        elif self._scheduled is None:
            if self.max_wait > 0:
                self._scheduled = self._loop.call_later(self.max_wait, self._dispatch)
            else:
                self._scheduled = self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = None
        if self._busy or self._closed:
            return
        # Drop callers that went away (cancelled) before we spend work on them.
        batch: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if not item[1].done():
                batch.append(item)
        if not batch:
            return
        assert self._loop is not None
        unique: dict[str, int] = {}
        for text, _ in batch:
            unique.setdefault(text, len(unique))
        texts = list(unique)
        self._busy = True
        self.batches_run += 1
        self.texts_embedded += len(texts)
        self._inflight_texts, self._dispatched_at = len(texts), time.perf_counter()
        try:
            if self.background is not None:
                inflight = self._loop.run_in_executor(self._executor, self.embedder.embed, texts, self.background)
            elif len(texts) == 1 and hasattr(self.embedder, "embed_ids"):
                # A lone query (the latency-bound case): tokenized here, so the worker goes
                # straight into the model instead of taking the GIL back twice on the way.
                ids = self.embedder.prepare(texts, on_loop=True)
                inflight = self._loop.run_in_executor(self._executor, self.embedder.embed_ids, ids)
            else:
                inflight = self._loop.run_in_executor(self._executor, self.embedder.embed, texts)
        except BaseException as exc:  # texts it cannot tokenize, executor shut down, etc.
            self._busy = False
            self._resolve(batch, unique, None, exc)
            self._kick()  # what is queued behind them still runs
            return
        self._inflight = inflight
        inflight.add_done_callback(lambda f: self._on_done(f, batch, unique))

    def _on_done(self, f: asyncio.Future[Any], batch: list, unique: dict[str, int]) -> None:
        self._busy = False
        self._inflight = None
        per_text = (time.perf_counter() - self._dispatched_at) / max(self._inflight_texts, 1)
        self.seconds_per_text = per_text if not self.seconds_per_text else 0.8 * self.seconds_per_text + 0.2 * per_text
        self._inflight_texts = 0
        if f.cancelled():
            self._resolve(batch, unique, None, RuntimeError("embedding batch was cancelled"))
        elif f.exception() is not None:
            self._resolve(batch, unique, None, f.exception())
        else:
            vecs = f.result()
            try:
                vecs = np.asarray(vecs, dtype=_F32)
                if vecs.shape != (len(unique), self.dim):
                    raise RuntimeError(
                        f"embedder returned shape {vecs.shape}, expected {(len(unique), self.dim)}"
                    )
            except Exception as exc:
                self._resolve(batch, unique, None, exc)
            else:
                self._resolve(batch, unique, vecs, None)
        self._kick()

    @staticmethod
    def _resolve(batch: list, unique: dict[str, int], vecs: np.ndarray | None,
                 exc: BaseException | None) -> None:
        for text, fut in batch:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                assert vecs is not None
                fut.set_result(vecs[unique[text]].copy())

    def close(self) -> None:
        """Fail queued requests and shut down the worker (idempotent).

        A batch already running finishes in the background and resolves its
        callers; use :meth:`aclose` to wait for it.
        """
        if self._closed:
            return
        self._closed = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        queued, self._queue = self._queue, deque()
        for _, fut in queued:
            if not fut.done():
                fut.set_exception(RuntimeError("EmbeddingBatcher closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Close, after letting the batch currently running finish."""
        inflight = self._inflight
        self.close()
        if inflight is not None and not inflight.done():
            await asyncio.wait([inflight])

    async def __aenter__(self) -> "EmbeddingBatcher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
