"""The int8 ONNX Runtime MiniLM (the default local embedder) against sentence-transformers'
stored reference vectors and the exact numpy engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proxy.config import LOCAL_EMBEDDERS
from proxy.memory.embedder import Embedder
from proxy.memory.minilm_model import LocalMiniLM
from proxy.memory.minilm_int8 import QuantizedMiniLM
from proxy.memory.remote import LOCAL_ENGINES

from tests.test_embedder import _texts, embedded_concurrently, reference  # noqa: F401 (reference: a fixture)


@pytest.fixture(scope="module")
def model() -> QuantizedMiniLM:
    return QuantizedMiniLM()


def test_protocol_and_engine_registry(model: QuantizedMiniLM) -> None:
    assert isinstance(model, Embedder)
    assert model.dim == 384 and model.max_seq_length == 256
    # Its vectors are not the float32 model's: stored memories record which model made them.
    assert model.name != LocalMiniLM.name
    assert set(LOCAL_ENGINES) == set(LOCAL_EMBEDDERS)
    assert LOCAL_ENGINES["local"] is QuantizedMiniLM and LOCAL_ENGINES["local-exact"] is LocalMiniLM


def test_close_to_sentence_transformers(model: QuantizedMiniLM, reference: dict) -> None:
    ref = np.array([item["vector"] for item in reference["items"]], dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = model.embed(_texts(reference))
    cos = np.sum(got * ref, axis=1)
    # Measured: 0.985 .. 0.996 (the shortest texts lose the most to int8 weights).
    assert cos.min() >= 0.98, cos
    assert cos.mean() >= 0.99, cos


def test_ranks_like_the_exact_model(model: QuantizedMiniLM, reference: dict) -> None:
    # What retrieval needs: for each text as a query, the order of the others is (nearly) the
    # exact model's.
    texts = _texts(reference) + [
        "The cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly revenue grew by 12 percent.",
        "We agreed to ship the release on Friday.", "The deadline for the launch is the end of the week.",
        "My sister lives in Paris.", "I adopted a dog last spring.",
    ]
    exact = LocalMiniLM().embed(texts)
    quant = model.embed(texts)
    for i in range(len(texts)):
        best_exact = np.argsort(-(exact @ exact[i]))[1:4]
        best_quant = np.argsort(-(quant @ quant[i]))[1:4]
        assert best_exact[0] in best_quant, (texts[i], best_exact, best_quant)


def test_a_text_gets_the_same_vector_alone_or_in_a_batch(model: QuantizedMiniLM, reference: dict) -> None:
    # Activations are quantised per run: texts run alone, so companions never change a vector.
    texts = _texts(reference) + ["short", "a bit longer text than that", "x " * 40]
    batched = model.embed(texts)
    single = np.stack([model.embed([t])[0] for t in texts])
    np.testing.assert_array_equal(batched, single)


def test_background_embedding_yields_between_texts(model: QuantizedMiniLM) -> None:
    calls = []
    texts = ["one", "two words", "three words here"]
    out = model.embed(texts, lambda: calls.append(1))
    assert len(calls) == len(texts)
    np.testing.assert_array_equal(out, model.embed(texts))


def test_output_shape_norm_and_bad_inputs(model: QuantizedMiniLM) -> None:
    out = model.embed(["one", "two three", "", "  ", "word " * 1000])
    assert out.dtype == np.float32 and out.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()
    assert model.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        model.embed("not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model.embed([None])  # type: ignore[list-item]


def test_the_session_keeps_no_model_copy_and_no_arena(model: QuantizedMiniLM) -> None:
    # A sidecar's memory: ONNX Runtime would keep the serialized graph (10 MB) and an activation
    # arena (~15 MB) for the life of the process; neither is needed by a CPU session.
    assert model._session._model_bytes is None
    assert model._session.get_session_options().enable_cpu_mem_arena is False
    first = model.embed(["arena-free runs allocate and free per call"])
    np.testing.assert_array_equal(model.embed(["arena-free runs allocate and free per call"]), first)


def test_semantics_sanity(model: QuantizedMiniLM) -> None:
    a, b, c = model.embed(["The cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly revenue grew by 12 percent."])
    assert a @ b > a @ c + 0.2


def test_thread_safety(model: QuantizedMiniLM, reference: dict) -> None:
    for got, alone in embedded_concurrently(model, _texts(reference)[:10]):
        np.testing.assert_array_equal(got, alone)


def test_the_embedder_works_whichever_loads_first_index_or_embedder() -> None:
    # The proxy loads a tenant's vector index and the embedder on two threads, in no set order.
    # onnxruntime breaks when loaded after usearch (proxy.memory.vectors guards the order):
    # each order runs in a fresh interpreter, as a proxy would start.
    import subprocess
    import sys

    index_first = ("from proxy.memory.vectors import VectorIndex; VectorIndex(8, 'i8'); "
                   "from proxy.memory.minilm_int8 import QuantizedMiniLM; v = QuantizedMiniLM().embed(['hello world'])")
    embedder_first = ("from proxy.memory.minilm_int8 import QuantizedMiniLM; v = QuantizedMiniLM().embed(['hello world']); "
                      "from proxy.memory.vectors import VectorIndex; VectorIndex(8, 'i8')")
    for code in (index_first, embedder_first):
        done = subprocess.run([sys.executable, "-c", code + "; print(round(float(v[0] @ v[0]), 3))"],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert done.returncode == 0 and done.stdout.strip() == "1.0", (code, done.returncode, done.stderr[-800:])


def test_the_graph_is_built_in_a_child_process_the_same_as_here(model: QuantizedMiniLM, monkeypatch, caplog) -> None:
    # Building it imports onnx and unpacks the float32 layers: a child process does that, and
    # the proxy keeps neither. The child's model is byte for byte the one built in-process, and
    # a child that fails leaves the build to this process.
    import subprocess
    import sys

    from proxy.memory import minilm_int8
    from proxy.memory.minilm_model import MiniLMWeights

    args = (model.model_dir, model.n_layers, model.n_heads, model.eps)
    here = minilm_int8._build_graph(MiniLMWeights(model.model_dir, model.n_layers), model.n_heads, model.eps)
    assert minilm_int8._graph_from_child(*args) == here
    loads = ("import sys; from proxy.memory.minilm_int8 import QuantizedMiniLM; v = QuantizedMiniLM().embed(['hello world']); "
             "print('onnx' in sys.modules, round(float(v[0] @ v[0]), 3))")
    done = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stdout.split() == ["False", "1.0"], done.stderr[-800:]

    monkeypatch.setattr(minilm_int8.sys, "executable", "/nonexistent/python")
    assert minilm_int8._graph_from_child(*args) is None
    fallback = QuantizedMiniLM()
    np.testing.assert_array_equal(fallback.embed(["hello world"]), model.embed(["hello world"]))
    assert "building it here" in caplog.text
