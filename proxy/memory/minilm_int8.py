"""all-MiniLM-L6-v2 with int8 weights on ONNX Runtime: the default local embedder.

The graph is built at start-up from the same safetensors weights as the numpy engine
(proxy/memory/minilm_model.py), so nothing is downloaded or cached. Every linear layer is
dynamically quantised the way ``onnxruntime.quantization.quantize_dynamic`` does it (int8
weights with a scale per output channel, uint8 activations with a scale per call); attention,
layer norms and pooling stay float32. On a 2-core AMD EPYC (AVX-512 VNNI) a 22-word-piece query
takes ~2.4 ms instead of 8.5 ms in numpy, and indexing ~2.7x less time; vectors keep a cosine
of 0.98-1.0 (mean >= 0.99) with sentence-transformers' (tests/test_embedder_int8.py) and LoCoMo
recall is unchanged (docs/MEMORY.md). ONNX Runtime holds no GIL while it runs, so a query
embedding does not stall the event loop. It must be imported before usearch (see
proxy/memory/vectors.py).

The word table's rows are gathered in numpy from the mapped weights file
(proxy/memory/minilm_model.py); the graph takes the summed embeddings. The graph is built in a child process
(``python -m proxy.memory.minilm_int8``): building it imports the ``onnx`` package, which would
stay imported (8 MB), and unpacks the float32 layers (~90 MB for a moment), all of it memory the
proxy would keep for nothing or fragment.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from proxy.memory.minilm_model import MiniLM, MiniLMWeights

__all__ = ["QuantizedMiniLM"]

log = logging.getLogger("agent_state_proxy.memory")

_F32 = np.float32


class QuantizedMiniLM(MiniLM):
    """all-MiniLM-L6-v2 with int8 linear layers (ONNX Runtime, one thread per call)."""

    name = "all-MiniLM-L6-v2-int8"

    def __init__(self, model_dir: str | Path | None = None, **kwargs: Any) -> None:
        import onnxruntime as ort

        super().__init__(model_dir, **kwargs)
        # One text per run. Activations are quantised with one scale per run, so a batch would
        # make a text's vector depend on its batch companions; alone it is deterministic, needs
        # no padding, and costs about the same per text (docs/MEMORY.md, Embedders).
        self.max_batch = 1
        graph = _graph_from_child(self.model_dir, self.n_layers, self.n_heads, self.eps)
        if graph is None:
            weights = MiniLMWeights(self.model_dir, self.n_layers)
            graph = _build_graph(weights, self.n_heads, self.eps)
        # The layers are in the graph, quantised: only the embedding lookup stays here.
        self._weights = MiniLMWeights(self.model_dir, 0)
        options = ort.SessionOptions()
        # One thread per run: queries and indexing run on their own threads, and a sidecar must
        # not take every core of its host.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No memory arena: it kept activation buffers for a model whose runs allocate little,
        # and plain allocations cost nothing measurable per query (docs/BENCHMARKS.md, seventh
        # round).
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        # The session keeps a copy of the serialized model only to rebuild itself after a failed
        # hardware provider, which a CPU-only session never does.
        self._session._model_bytes = None

    def _forward(self, batch: list[list[int]], between_layers: Callable[[], None] | None = None) -> np.ndarray:
        if between_layers is not None:
            between_layers()
        ids = np.array(batch, dtype=np.int64)  # one text (max_batch = 1): nothing to pad or mask
        (out,) = self._session.run(None, {"embeddings": self._weights.embeddings(ids)})
        return out


def _graph_from_child(model_dir: Path, n_layers: int, n_heads: int, eps: float) -> bytes | None:
    """``_build_graph``'s model, built by a child Python (None if that fails: build it here)."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "proxy.memory.minilm_int8", str(model_dir), str(n_layers), str(n_heads), repr(eps)]
    try:
        done = subprocess.run(command, capture_output=True, env=os.environ | {"PYTHONPATH": path}, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("building the int8 embedder's graph in a child process failed (%s): building it here", exc)
        return None
    if done.returncode != 0 or not done.stdout:
        error = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        log.warning("building the int8 embedder's graph in a child process failed (%s): building it here", error[0])
        return None
    return done.stdout


def _quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: ``w ≈ q * scale``."""
    scale = np.abs(w).max(axis=0) / _F32(127.0)
    scale = np.where(scale > 0, scale, _F32(1.0)).astype(_F32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _build_graph(w: MiniLMWeights, n_heads: int, eps: float) -> bytes:
    """The encoder (after the embedding lookup) and the pooling, as a serialized ONNX model:
    input ``embeddings`` (B, T, H) float32 of unpadded texts (every token is real: the engine
    runs one text at a time); output ``embedding`` (B, H), L2-normalised."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = w.pos.shape[1]
    head_dim = hidden // n_heads
    initializers: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: Any) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        names = [f"{kind}_{len(nodes)}_{i}" for i in range(outputs)]
        nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def linear(x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        # The pattern quantize_dynamic emits, which ORT fuses into one DynamicQuantizeMatMul.
        q, scale = _quantize_columns(weight)
        xq, x_scale, x_zero = op("DynamicQuantizeLinear", x, outputs=3)
        product = op("MatMulInteger", xq, const(f"{name}.q", q), x_zero, const(f"{name}.zero", np.zeros(q.shape[1], np.int8)))
        scaled = op("Mul", op("Cast", product, to=TensorProto.FLOAT), op("Mul", x_scale, const(f"{name}.scale", scale)))
        return op("Add", scaled, const(f"{name}.bias", bias))

    def layer_norm(x: str, gamma: np.ndarray, beta: np.ndarray, name: str) -> str:
        return op("LayerNormalization", x, const(f"{name}.g", gamma), const(f"{name}.b", beta), axis=-1, epsilon=eps)

    x = layer_norm("embeddings", w.emb_ln_g, w.emb_ln_b, "emb_ln")
    one = const("one", np.array(1.0, _F32))
    heads = const("shape_heads", np.array([0, 0, n_heads, head_dim], np.int64))
    merged = const("shape_merged", np.array([0, 0, hidden], np.int64))
    scale = const("attention_scale", np.array(1.0 / math.sqrt(head_dim), _F32))
    half, root2 = const("half", np.array(0.5, _F32)), const("sqrt2", np.array(math.sqrt(2.0), _F32))
    for i, L in enumerate(w.layers):
        qkv = linear(x, np.asarray(L.w_qkv), np.asarray(L.b_qkv), f"l{i}.qkv")
        q, k, v = op("Split", qkv, const(f"l{i}.split", np.array([hidden] * 3, np.int64)), outputs=3, axis=-1)
        q = op("Transpose", op("Reshape", q, heads), perm=[0, 2, 1, 3])  # (B, nh, T, hd)
        k = op("Transpose", op("Reshape", k, heads), perm=[0, 2, 3, 1])  # (B, nh, hd, T)
        v = op("Transpose", op("Reshape", v, heads), perm=[0, 2, 1, 3])
        probs = op("Softmax", op("Mul", op("MatMul", q, k), scale), axis=-1)
        context = op("Reshape", op("Transpose", op("MatMul", probs, v), perm=[0, 2, 1, 3]), merged)
        x = layer_norm(op("Add", linear(context, np.asarray(L.w_o), np.asarray(L.b_o), f"l{i}.o"), x), L.ln1_g, L.ln1_b, f"l{i}.ln1")
        h = linear(x, np.asarray(L.w_in), np.asarray(L.b_in), f"l{i}.in")
        gelu = op("Mul", op("Mul", h, half), op("Add", op("Erf", op("Div", h, root2)), one))  # exact GELU (ORT fuses it)
        x = layer_norm(op("Add", linear(gelu, np.asarray(L.w_out), np.asarray(L.b_out), f"l{i}.out"), x), L.ln2_g, L.ln2_b, f"l{i}.ln2")
    # Mean pooling over the tokens (all real), then L2 normalisation.
    pooled = op("ReduceMean", x, axes=[1], keepdims=0)  # opset 17: axes is an attribute
    nodes.append(helper.make_node("LpNormalization", [pooled], ["embedding"], axis=-1, p=2))
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2-int8",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", "tokens", hidden])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime release that runs opset 17
    return model.SerializeToString()


if __name__ == "__main__":  # the child process of _graph_from_child: the model on stdout
    _dir, _layers, _heads, _eps = sys.argv[1:5]
    sys.stdout.buffer.write(_build_graph(MiniLMWeights(Path(_dir), int(_layers)), int(_heads), float(_eps)))
