"""all-MiniLM-L6-v2 in numpy: its tokenizer and length-bucketed batching (:class:`MiniLM`, shared
by the engines), its weights laid out for inference (:class:`MiniLMWeights`), and the float32
engine (:class:`LocalMiniLM`: ``tokenizers`` + ``safetensors`` + numpy, no torch; output matches
sentence-transformers: mean pooling over the attention mask, L2-normalised, inputs truncated to
256 word pieces). The int8 engine, the default, is proxy/memory/minilm_int8.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["MiniLM", "MiniLMWeights", "LocalMiniLM", "default_model_dir"]

_F32 = np.float32
# One thread per tokenizer call (each embedder has its own thread already); without it,
# tokenizers' encode_batch runs on a rayon pool with a thread per core.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokens per forward pass of background (pausable) embedding: a layer of the default bucket
# (4096 tokens) is too long for a request to wait behind (docs/BENCHMARKS.md).
_BACKGROUND_BUCKET_TOKENS = 256


def default_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files vendored with the package (proxy/memory/minilm/,
    made and checked by scripts/vendor_minilm.py)."""
    path = Path(__file__).resolve().parent / "minilm"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise RuntimeError(f"bundled model file missing: {path / name} "
                               "(python scripts/vendor_minilm.py restores it)")
    return path


# --------------------------------------------------------------------------- math


_ERF_P = _F32(0.3275911)
_ERF_A = tuple(_F32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_INV_SQRT2 = _F32(1.0 / math.sqrt(2.0))


def _gelu_(h: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU ``h * 0.5 * (1 + erf(h / sqrt(2)))``, in place.

    numpy has no erf, so it uses Abramowitz & Stegun 7.1.26 (|error| <=
    1.5e-7, i.e. float32 resolution): for z = |h|/sqrt(2),
    ``1 - erf(z) = poly(t) * exp(-z^2)`` with ``t = 1 / (1 + p z)``.  Then
    ``gelu(h) = h * (1 - q)`` for h >= 0 and ``h * q`` for h < 0, where
    ``q = 0.5 * (1 - erf(z))``.  Written with in-place ops: on a (480, 1536)
    activation this is ~2.3x faster than the allocate-per-op version.
    """
    a1, a2, a3, a4, a5 = _ERF_A
    z = np.abs(h)
    z *= _INV_SQRT2
    t = z * _ERF_P
    t += _F32(1.0)
    np.reciprocal(t, out=t)
    q = t * a5
    q += a4
    q *= t
    q += a3
    q *= t
    q += a2
    q *= t
    q += a1
    q *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    q *= z
    q *= _F32(0.5)
    np.subtract(_F32(1.0), q, out=q, where=h >= 0)
    h *= q
    return h


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    xc /= np.sqrt(var + _F32(eps))
    xc *= gamma
    xc += beta
    return xc


# --------------------------------------------------------------------------- model


class _Layer:
    __slots__ = ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_g", "ln1_b",
                 "w_in", "b_in", "w_out", "b_out", "ln2_g", "ln2_b")


def _word_table(file: Path, name: str) -> np.ndarray | None:
    """The float32 tensor ``name`` of a safetensors file, mapped read-only (file pages the kernel
    shares and reclaims, not the process's own memory), or None (other dtype, unexpected layout:
    the caller copies it)."""
    import json
    import struct

    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(size)).get(name)
        if not entry or entry.get("dtype") != "F32":
            return None
        start, end = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        if len(shape) != 2 or end - start != 4 * math.prod(shape):
            return None
        return np.memmap(file, dtype="<f4", mode="r", offset=8 + size + start, shape=(shape[0], shape[1]))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=_F32)
    a.flags.writeable = False
    return a


class MiniLMWeights:
    """The all-MiniLM-L6-v2 weights, laid out for inference: linear weights pre-transposed to
    (in, out), Q/K/V fused into one (hidden, 3 * hidden) matrix, the word table mapped."""

    def __init__(self, path: Path, n_layers: int) -> None:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
            keys = set(f.keys())
            prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""

            def get(name: str) -> np.ndarray:
                return f.get_tensor(prefix + name).astype(_F32, copy=False)

            # The largest tensor is only ever gathered a few rows at a time: mapped from the
            # file, not copied into the process's own memory (docs/MEMORY.md).
            self.word: np.ndarray | None = _word_table(
                path / "model.safetensors", prefix + "embeddings.word_embeddings.weight")
            if self.word is None:
                self.word = _ro(get("embeddings.word_embeddings.weight"))
            self.pos = _ro(get("embeddings.position_embeddings.weight"))
            self.type0 = _ro(get("embeddings.token_type_embeddings.weight")[0])
            self.emb_ln_g = _ro(get("embeddings.LayerNorm.weight"))
            self.emb_ln_b = _ro(get("embeddings.LayerNorm.bias"))
            layers = []
            for i in range(n_layers):
                p = f"encoder.layer.{i}."
                L = _Layer()
                L.w_qkv = _ro(np.concatenate([
                    get(p + "attention.self.query.weight").T,
                    get(p + "attention.self.key.weight").T,
                    get(p + "attention.self.value.weight").T,
                ], axis=1))
                L.b_qkv = _ro(np.concatenate([
                    get(p + "attention.self.query.bias"),
                    get(p + "attention.self.key.bias"),
                    get(p + "attention.self.value.bias"),
                ]))
                L.w_o = _ro(get(p + "attention.output.dense.weight").T)
                L.b_o = _ro(get(p + "attention.output.dense.bias"))
                L.ln1_g = _ro(get(p + "attention.output.LayerNorm.weight"))
                L.ln1_b = _ro(get(p + "attention.output.LayerNorm.bias"))
                L.w_in = _ro(get(p + "intermediate.dense.weight").T)
                L.b_in = _ro(get(p + "intermediate.dense.bias"))
                L.w_out = _ro(get(p + "output.dense.weight").T)
                L.b_out = _ro(get(p + "output.dense.bias"))
                L.ln2_g = _ro(get(p + "output.LayerNorm.weight"))
                L.ln2_b = _ro(get(p + "output.LayerNorm.bias"))
                layers.append(L)
            self.layers: tuple[_Layer, ...] = tuple(layers)

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Word + position + token-type embeddings of ``(B, T)`` ids, before the layer norm."""
        word = self.word
        x = np.asarray(word[ids])  # (B, T, H), a copy
        x += self.pos[: ids.shape[1]]
        x += self.type0
        return x


class MiniLM:
    """The all-MiniLM-L6-v2 text side shared by its engines: configuration, tokenizer, and
    length-bucketed batching. An engine implements :meth:`_forward` on one padded bucket and
    returns mean-pooled (over the attention mask), L2-normalised vectors, as
    sentence-transformers does (inputs truncated to 256 word pieces)."""

    dim: int = 384
    name: str = "all-MiniLM-L6-v2"
    pausable = True  # embed() takes ``between_layers`` (EmbeddingBatcher's ``background``)
    # Tokens per forward pass of background (pausable) embedding, so a request never waits long
    # behind one.
    background_bucket_tokens = _BACKGROUND_BUCKET_TOKENS

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        max_seq_length: int = 256,
        max_batch: int = 32,
        max_batch_tokens: int = 4096,
    ) -> None:
        import json

        from tokenizers import Tokenizer

        path = Path(model_dir) if model_dir is not None else default_model_dir()
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.hidden = int(cfg["hidden_size"])
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        self.head_dim = self.hidden // self.n_heads
        self.dim = self.hidden
        self.max_seq_length = min(int(max_seq_length), int(cfg["max_position_embeddings"]))
        self.max_batch = max(1, int(max_batch))
        self.max_batch_tokens = max(self.max_seq_length, int(max_batch_tokens))

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        # tokenizer.json ships padding=Fixed(128) and truncation=128: padding
        # would make pad tokens look real, and sentence-transformers truncates
        # at max_seq_length (256), not 128.  We pad ourselves, with a mask.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_seq_length)
        self._tok = tok
        self.model_dir = path

    # ------------------------------------------------------------ tokenizing

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids (with [CLS]/[SEP]), truncated to ``max_seq_length``."""
        # encode_batch, unlike encode, lets go of the GIL while it works (docs/BENCHMARKS.md,
        # fifth round). Indexing threads run under SCHED_IDLE (proxy/priority.py): one
        # preempted while holding the GIL would stall the event loop until a core idles.
        # TOKENIZERS_PARALLELISM (set at import) keeps it on the calling thread.
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    # ------------------------------------------------------------ inference

    def embed(self, texts: Sequence[str], between_layers: Callable[[], None] | None = None) -> np.ndarray:
        """Embed ``texts`` -> ``(n, dim)`` float32, L2-normalised rows.

        ``between_layers`` is called between units of work, every few milliseconds (a
        background caller pauses there for requests, see proxy/priority.py)."""
        return self.embed_ids(self.prepare(texts), between_layers)

    def prepare(self, texts: Sequence[str], *, on_loop: bool = False) -> list[list[int]]:
        """The texts' word-piece ids: embed()'s part before the model. ``on_loop``: tokenize
        holding the GIL, one text at a time (for the event loop's thread, which must not hand the
        GIL to another thread in the middle)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not a str")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"embed() expects str items, got {type(t).__name__}")
        if on_loop:
            return [self._tok.encode(t).ids for t in texts]
        return self.tokenize(texts) if texts else []

    def embed_ids(self, ids: list[list[int]], between_layers: Callable[[], None] | None = None) -> np.ndarray:
        """embed() of texts already turned into word-piece ids (``prepare``)."""
        out = np.empty((len(ids), self.dim), dtype=_F32)
        if not ids:
            return out
        # Sort by length and cut into buckets so padding stays small: a bucket
        # holds at most max_batch texts and max_batch_tokens padded tokens, and
        # grows only while padding is at most as much as real tokens (with a
        # little slack, since each extra bucket has fixed per-call costs).
        # Background work pauses between layers, so its layers must be short: small buckets.
        bucket_tokens = self.max_batch_tokens if between_layers is None else min(self.max_batch_tokens, self.background_bucket_tokens)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            end = start + 1
            real = len(ids[order[start]])
            while end < len(order) and end - start < self.max_batch:
                longest = len(ids[order[end]])  # sorted: the newcomer is the longest
                padded = longest * (end - start + 1)
                real_new = real + longest
                if padded > bucket_tokens or padded - real_new > max(real_new, 64):
                    break
                real = real_new
                end += 1
            idx = order[start:end]
            out[idx] = self._forward([ids[i] for i in idx], between_layers)
            start = end
        return out

    def _forward(self, batch: list[list[int]], between_layers: Callable[[], None] | None = None) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _pad(batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(B, T)`` ids and a boolean mask of the real tokens."""
        ids = np.zeros((len(batch), max(len(s) for s in batch)), dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        for b, s in enumerate(batch):
            ids[b, : len(s)] = s
            mask[b, : len(s)] = True
        return ids, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dir={str(self.model_dir)!r}, max_seq_length={self.max_seq_length})"


class LocalMiniLM(MiniLM):
    """all-MiniLM-L6-v2 in pure numpy (float32): the exact engine, parity with
    sentence-transformers (cosine 1.0 on the stored reference).

    :meth:`embed` keeps no mutable state besides the tokenizer (guarded by a lock), so it may be
    called from worker threads; numpy releases the GIL inside the heavy kernels.
    """

    def __init__(self, model_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(model_dir, **kwargs)
        w = self._weights = MiniLMWeights(self.model_dir, self.n_layers)
        self._layers = w.layers
        self._scale = _F32(1.0 / math.sqrt(self.head_dim))

    def _forward(self, batch: list[list[int]], between_layers: Callable[[], None] | None = None) -> np.ndarray:
        """Run the encoder on one padded bucket; returns pooled unit vectors."""
        ids, mask = self._pad(batch)
        B, T = ids.shape
        H, nh, hd = self.hidden, self.n_heads, self.head_dim
        padded = not bool(mask.all())
        w = self._weights
        x = _layer_norm(w.embeddings(ids).reshape(B * T, H), w.emb_ln_g, w.emb_ln_b, self.eps)

        # Additive key mask: padded keys get a huge negative score before softmax.
        key_bias = None
        if padded:
            key_bias = np.where(mask, _F32(0.0), _F32(-1e9)).astype(_F32)[:, None, None, :]

        for L in self._layers:
            if between_layers is not None:
                between_layers()
            qkv = x @ L.w_qkv
            qkv += L.b_qkv
            qkv = qkv.reshape(B, T, 3, nh, hd)
            q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, nh, T, hd)
            k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (B, nh, hd, T)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (B, nh, T, hd)
            scores = q @ k  # (B, nh, T, T)
            scores *= self._scale
            if key_bias is not None:
                scores += key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(B * T, H)
            attn = ctx @ L.w_o
            attn += L.b_o
            attn += x
            x = _layer_norm(attn, L.ln1_g, L.ln1_b, self.eps)
            if between_layers is not None:
                between_layers()  # and between attention and feed-forward: shorter waits for a request
            h = x @ L.w_in
            h += L.b_in
            _gelu_(h)
            y = h @ L.w_out
            y += L.b_out
            y += x
            x = _layer_norm(y, L.ln2_g, L.ln2_b, self.eps)

        # Mean pooling over real tokens only, then L2 normalisation.
        x = x.reshape(B, T, H)
        if padded:
            m = mask.astype(_F32)[:, :, None]
            summed = (x * m).sum(axis=1)
            counts = np.maximum(m.sum(axis=1), _F32(1e-9))
        else:
            summed = x.sum(axis=1)
            counts = _F32(T)
        pooled = summed / counts
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, _F32(1e-12))).astype(_F32, copy=False)
