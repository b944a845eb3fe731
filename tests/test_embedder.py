"""Tests for proxy.memory.embedder: numpy MiniLM parity and the async batcher."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from proxy.memory.embedder import Embedder, EmbeddingBatcher
from proxy.memory.minilm_model import LocalMiniLM

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.json"


@pytest.fixture(scope="module")
def model() -> LocalMiniLM:
    return LocalMiniLM()


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _texts(reference: dict) -> list[str]:
    return [item["text"] for item in reference["items"]]


def _ref_vectors(reference: dict) -> np.ndarray:
    return np.array([item["vector"] for item in reference["items"]], dtype=np.float32)


class CountingEmbedder:
    """Wraps an embedder, recording each model call (and optionally failing)."""

    def __init__(self, inner: Embedder, *, delay: float = 0.0) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.name = inner.name
        self.delay = delay
        self.calls: list[list[str]] = []
        self.fail: BaseException | None = None
        self.threads: set[str] = set()
        self.started = threading.Event()
        self.release: threading.Event | None = None

    def embed(self, texts):
        self.calls.append(list(texts))
        self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.release is not None:
            self.release.wait(10)
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.inner.embed(texts)


# --------------------------------------------------------------------------- model


def test_protocol_and_metadata(model: LocalMiniLM) -> None:
    assert isinstance(model, Embedder)
    assert model.dim == 384
    assert model.name == "all-MiniLM-L6-v2"
    assert model.max_seq_length == 256


def test_tokenization_matches_reference(model: LocalMiniLM, reference: dict) -> None:
    ids = model.tokenize(_texts(reference))
    assert [len(x) for x in ids] == [item["n_tokens"] for item in reference["items"]]
    assert ids[0] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert max(len(x) for x in ids) == 256  # the long texts were truncated


def test_tokenizing_on_the_loop_gives_the_same_ids(model: LocalMiniLM, reference: dict) -> None:
    texts = _texts(reference)
    assert model.prepare(texts, on_loop=True) == model.prepare(texts) == model.tokenize(texts)
    np.testing.assert_array_equal(model.embed_ids(model.prepare(texts[:3], on_loop=True)), model.embed(texts[:3]))
    with pytest.raises(TypeError):
        model.prepare("a str, not a list", on_loop=True)


def test_parity_with_sentence_transformers(model: LocalMiniLM, reference: dict) -> None:
    ref = _ref_vectors(reference)
    got = model.embed(_texts(reference))
    cos = np.sum(got * ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos
    # In practice the match is to float32 / rounding precision.
    assert cos.min() >= 0.99999, cos
    assert np.abs(got - ref).max() < 1e-4


def test_parity_single_text_calls(model: LocalMiniLM, reference: dict) -> None:
    ref = _ref_vectors(reference)
    for text, r in zip(_texts(reference), ref):
        v = model.embed([text])[0]
        assert float(v @ r / np.linalg.norm(r)) >= 0.999


def test_batch_equals_single(model: LocalMiniLM, reference: dict) -> None:
    # Mixed lengths (3 .. 256 tokens) in one call: padding must not leak into
    # attention or pooling. Repeat the short texts so buckets hold padding.
    texts = _texts(reference) + ["short", "a bit longer text than that", "x " * 40]
    batched = model.embed(texts)
    single = np.stack([model.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=2e-6, rtol=0)


def test_forward_with_padding_matches_unpadded(model: LocalMiniLM) -> None:
    # Force one padded bucket directly (no length bucketing in between).
    a = model.tokenize(["hi"])[0]
    b = model.tokenize(["a much longer sentence with many more word pieces in it"])[0]
    padded = model._forward([a, b])
    np.testing.assert_allclose(padded[0], model._forward([a])[0], atol=2e-6, rtol=0)
    np.testing.assert_allclose(padded[1], model._forward([b])[0], atol=2e-6, rtol=0)


def test_bucketing_limits_respected() -> None:
    small = LocalMiniLM(max_batch=3, max_batch_tokens=256)
    texts = [f"sentence number {i} " * (i % 5 + 1) for i in range(11)]
    big = LocalMiniLM()
    np.testing.assert_allclose(small.embed(texts), big.embed(texts), atol=2e-6, rtol=0)


def test_output_normalised_float32(model: LocalMiniLM) -> None:
    out = model.embed(["one", "two three", "", "  "])
    assert out.dtype == np.float32
    assert out.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()


def test_empty_and_bad_inputs(model: LocalMiniLM) -> None:
    empty = model.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        model.embed("not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model.embed([b"bytes"])  # type: ignore[list-item]


def test_semantics_sanity(model: LocalMiniLM) -> None:
    a, b, c = model.embed([
        "The cat sits on the mat.",
        "A kitten is resting on a rug.",
        "Quarterly revenue grew by 12 percent.",
    ])
    assert a @ b > a @ c + 0.2


def embedded_concurrently(model, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(vector from 4 threads at once, vector alone) for 24 jobs over ``texts``."""
    expected = {t: model.embed([t])[0] for t in texts}
    jobs = [texts[i % len(texts)] for i in range(24)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda t: model.embed([t])[0], jobs))
    return [(v, expected[t]) for t, v in zip(jobs, results)]


def test_thread_safety(model: LocalMiniLM, reference: dict) -> None:
    for got, alone in embedded_concurrently(model, _texts(reference)[:10]):
        np.testing.assert_allclose(got, alone, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------- batcher


async def test_batcher_concurrent_requests_are_batched(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    texts = [f"concurrent request number {i} about topic {i % 7}" for i in range(50)]
    direct = model.embed(texts)
    async with EmbeddingBatcher(counting, max_batch=32) as batcher:
        vecs = await asyncio.gather(*(batcher.embed(t) for t in texts))
    for v, d in zip(vecs, direct):
        assert v.shape == (384,) and v.dtype == np.float32
        np.testing.assert_allclose(v, d, atol=2e-6, rtol=0)
    assert len(counting.calls) < 50
    assert len(counting.calls) == 2  # 32 + 18
    assert max(len(c) for c in counting.calls) <= 32
    assert sum(len(c) for c in counting.calls) == 50
    # The model ran on the batcher's worker thread, not the event loop thread.
    assert all(name.startswith("embedder") for name in counting.threads)


async def test_batcher_accumulates_while_busy(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    counting.release = threading.Event()
    batcher = EmbeddingBatcher(counting, max_batch=32)
    try:
        first = asyncio.ensure_future(batcher.embed("lone request"))
        # The lone request is dispatched right away (worker idle).
        await asyncio.to_thread(counting.started.wait, 10)
        assert counting.calls == [["lone request"]]
        # While the worker is busy, staggered arrivals queue up ...
        later = []
        for i in range(10):
            later.append(asyncio.ensure_future(batcher.embed(f"later {i}")))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert len(counting.calls) == 1
        counting.release.set()
        vecs = await asyncio.gather(first, *later)
        # ... and run together as one batch once the worker is free.
        assert [len(c) for c in counting.calls] == [1, 10]
        np.testing.assert_allclose(vecs[0], model.embed(["lone request"])[0], atol=2e-6)
    finally:
        await batcher.aclose()


async def test_batcher_lone_request_and_dedup(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    async with EmbeddingBatcher(counting) as batcher:
        v = await batcher.embed("just one")
        np.testing.assert_allclose(v, model.embed(["just one"])[0], atol=2e-6)
        a, b, c = await asyncio.gather(batcher.embed("dup"), batcher.embed("dup"),
                                       batcher.embed("other"))
        np.testing.assert_array_equal(a, b)
        assert counting.calls == [["just one"], ["dup", "other"]]
        a[0] = 123.0  # each caller owns its vector
        assert b[0] != 123.0
        many = await batcher.embed_many(["x", "y"])
        assert many.shape == (2, 384)
        assert batcher.batches_run == 3


async def test_batcher_time_window(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    async with EmbeddingBatcher(counting, max_wait_ms=50) as batcher:
        t1 = asyncio.ensure_future(batcher.embed("first"))
        await asyncio.sleep(0.005)  # arrives inside the window
        t2 = asyncio.ensure_future(batcher.embed("second"))
        await asyncio.gather(t1, t2)
    assert counting.calls == [["first", "second"]]


async def test_batcher_error_propagates_to_all_waiters(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    counting.fail = ValueError("model exploded")
    async with EmbeddingBatcher(counting, max_batch=8) as batcher:
        results = await asyncio.gather(
            *(batcher.embed(f"text {i}") for i in range(20)), return_exceptions=True
        )
        assert len(results) == 20
        assert all(isinstance(r, ValueError) and str(r) == "model exploded" for r in results)
        assert len(counting.calls) == 3  # 8 + 8 + 4: every batch failed, none hung
        # The batcher recovers once the model works again.
        counting.fail = None
        v = await batcher.embed("text 0")
        np.testing.assert_allclose(v, model.embed(["text 0"])[0], atol=2e-6)


async def test_batcher_bad_shape_is_an_error() -> None:
    class Broken:
        dim = 384
        name = "broken"

        def embed(self, texts):
            return np.zeros((len(texts) + 1, 384), dtype=np.float32)

    async with EmbeddingBatcher(Broken()) as batcher:
        with pytest.raises(RuntimeError, match="shape"):
            await batcher.embed("x")


async def test_batcher_cancelled_waiter_does_not_break_batch(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    counting.release = threading.Event()
    async with EmbeddingBatcher(counting) as batcher:
        busy = asyncio.ensure_future(batcher.embed("busy"))
        await asyncio.to_thread(counting.started.wait, 10)
        gone = asyncio.ensure_future(batcher.embed("gone"))
        kept = asyncio.ensure_future(batcher.embed("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        counting.release.set()
        await busy
        v = await kept
        assert gone.cancelled()
        np.testing.assert_allclose(v, model.embed(["kept"])[0], atol=2e-6)
    assert counting.calls == [["busy"], ["kept"]]


async def test_batcher_close(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model)
    counting.release = threading.Event()
    batcher = EmbeddingBatcher(counting)
    running = asyncio.ensure_future(batcher.embed("in flight"))
    await asyncio.to_thread(counting.started.wait, 10)
    queued = asyncio.ensure_future(batcher.embed("queued"))
    await asyncio.sleep(0)
    batcher.close()
    batcher.close()  # idempotent
    assert batcher.closed
    with pytest.raises(RuntimeError, match="closed"):
        await queued
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.embed("after close")
    counting.release.set()
    # The batch that was already running still resolves its caller.
    v = await running
    np.testing.assert_allclose(v, model.embed(["in flight"])[0], atol=2e-6)
    await batcher.aclose()
    assert batcher._executor._shutdown  # executor is shut down
    assert counting.calls == [["in flight"]]


async def test_batcher_aclose_waits_for_inflight(model: LocalMiniLM) -> None:
    counting = CountingEmbedder(model, delay=0.05)
    batcher = EmbeddingBatcher(counting)
    task = asyncio.ensure_future(batcher.embed("slow"))
    await asyncio.to_thread(counting.started.wait, 10)
    await batcher.aclose()
    assert task.done() and task.result().shape == (384,)


async def test_expected_wait_counts_the_queue_ahead_at_the_measured_rate() -> None:
    import asyncio
    import threading

    import numpy as np

    from proxy.memory.embedder import EmbeddingBatcher

    release = threading.Event()

    class Slow:
        dim = 4

        def embed(self, texts):
            release.wait(5)
            return np.ones((len(texts), 4), dtype=np.float32)

    batcher = EmbeddingBatcher(Slow(), max_batch=2)
    assert batcher.expected_wait() == 0.0  # idle, nothing measured: never refuse
    first = asyncio.ensure_future(batcher.embed("a"))
    await asyncio.sleep(0.05)
    release.set()
    await first
    assert batcher.seconds_per_text > 0.04  # one text took ~0.05 s
    release.clear()
    queued = [asyncio.ensure_future(batcher.embed(t)) for t in ("b", "c", "d", "e", "f")]
    await asyncio.sleep(0.02)
    assert batcher.expected_wait() >= 4 * batcher.seconds_per_text  # 2 in flight + 3 waiting, minus rounding
    release.set()
    await asyncio.gather(*queued)
    assert batcher.expected_wait() == 0.0
    await batcher.aclose()


async def test_submit_now_starts_on_an_idle_worker_without_waiting_for_the_loop(model: LocalMiniLM) -> None:
    # A request submits its query and goes on with CPU work that does not yield: the embedding
    # must already be computing meanwhile, not start at the next loop tick.
    counting = CountingEmbedder(model)
    async with EmbeddingBatcher(counting) as batcher:
        later = batcher.submit("queued for the next tick")
        assert not counting.started.wait(0.3)  # the loop has not run: not dispatched yet
        assert (await later).shape == (384,)
        counting.started.clear()
        now = batcher.submit("started at once", now=True)
        assert counting.started.wait(5)  # dispatched while this coroutine still holds the loop
        busy = batcher.submit("behind it", now=True)  # worker busy: queued, runs next
        np.testing.assert_allclose(await now, model.embed(["started at once"])[0], atol=2e-6, rtol=0)
        assert (await busy).shape == (384,)
        assert counting.calls[-2:] == [["started at once"], ["behind it"]]


class _TwoStepEmbedder:
    """Exposes an engine's two steps (word pieces, then the model) and records the threads."""

    def __init__(self, inner: LocalMiniLM) -> None:
        self.inner, self.dim, self.name = inner, inner.dim, inner.name
        self.prepared_on: list[str] = []
        self.ran_on: list[str] = []
        self.fail_prepare = False

    def prepare(self, texts, *, on_loop: bool = False):
        self.prepared_on.append(threading.current_thread().name)
        if self.fail_prepare:
            raise ValueError("cannot tokenize")
        return self.inner.prepare(texts, on_loop=on_loop)

    def embed_ids(self, ids):
        self.ran_on.append(threading.current_thread().name)
        return self.inner.embed_ids(ids)

    def embed(self, texts):
        return self.embed_ids(self.prepare(texts))


async def test_a_lone_query_is_tokenized_on_the_loop_and_only_the_model_runs_on_the_worker(model: LocalMiniLM) -> None:
    engine = _TwoStepEmbedder(model)
    async with EmbeddingBatcher(engine) as batcher:
        alone = await batcher.submit("where did I park", now=True)
        np.testing.assert_array_equal(alone, model.embed(["where did I park"])[0])
        assert engine.prepared_on == [threading.current_thread().name] and engine.ran_on[0].startswith("embedder")
        # Texts batched together are tokenized on the worker (they would hold the loop longer).
        engine.prepared_on.clear()
        both = await asyncio.gather(batcher.embed("one text"), batcher.embed("another text"))
        assert engine.prepared_on and all(name.startswith("embedder") for name in engine.prepared_on)
        np.testing.assert_allclose(np.stack(both), model.embed(["one text", "another text"]), atol=2e-6, rtol=0)
        # A failure to tokenize reaches the caller, and the batcher goes on.
        engine.fail_prepare = True
        with pytest.raises(ValueError, match="cannot tokenize"):
            await batcher.submit("anything", now=True)
        engine.fail_prepare = False
        assert (await batcher.submit("after the failure", now=True)).shape == (384,)
