"""Tests for proxy.memory.word_table: rows read by token into a bounded cache, never mapped."""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.memory.embedder import MiniLMWeights, default_model_dir
from proxy.memory.word_table import WordTable


def _table_file(tmp_path: Path, vocab: int = 50, dim: int = 8) -> tuple[Path, int, np.ndarray]:
    """A file with some header bytes, then a (vocab, dim) float32 table."""
    table = np.random.default_rng(7).standard_normal((vocab, dim)).astype("<f4")
    path = tmp_path / "table.bin"
    header = b"header-bytes-not-aligned"
    path.write_bytes(header + table.tobytes())
    return path, len(header), table


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 49), min_size=1, max_size=12), min_size=1, max_size=30),
       st.integers(1, 20))
def test_gathers_equal_the_table_whatever_was_evicted(tmp_path_factory, batches, capacity) -> None:
    path, offset, table = _table_file(tmp_path_factory.mktemp("wt"))
    words = WordTable(path, offset, table.shape, capacity=capacity)
    for batch in batches:
        ids = np.array([batch], dtype=np.int64)
        got = words.gather(ids)
        assert got.shape == (1, len(batch), table.shape[1]) and got.dtype == np.float32
        np.testing.assert_array_equal(got, table[ids])
        assert len(words) <= capacity


def test_cached_rows_cost_no_reads_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    path, offset, table = _table_file(tmp_path)
    words = WordTable(path, offset, table.shape, capacity=10)
    words.gather(np.array([[1, 2, 3, 2, 1]]))
    assert words.misses == 3
    words.gather(np.array([[3, 1], [2, 2]]))
    assert words.misses == 3  # all cached
    for start in range(0, 50, 5):
        words.gather(np.arange(start, start + 5)[None, :])
    assert len(words) == 10
    # A token used again and again survives a scan of one-off tokens (CLOCK's second chance).
    words.gather(np.array([[7]]))
    for token in range(20, 40):
        words.gather(np.array([[7, token]]))
    before = words.misses
    words.gather(np.array([[7]]))
    assert words.misses == before


def test_a_text_with_more_distinct_tokens_than_fit_is_read_directly(tmp_path: Path) -> None:
    path, offset, table = _table_file(tmp_path)
    words = WordTable(path, offset, table.shape, capacity=4)
    words.gather(np.array([[0, 1]]))
    ids = np.array([[5, 6, 7, 8, 9, 0, 5]])
    np.testing.assert_array_equal(words.gather(ids), table[ids])
    assert len(words) == 2  # the cache was left as it was


def test_bad_ids_raise_and_empty_input_is_empty(tmp_path: Path) -> None:
    path, offset, table = _table_file(tmp_path)
    words = WordTable(path, offset, table.shape)
    with pytest.raises(IndexError):
        words.gather(np.array([[50]]))
    with pytest.raises(IndexError):
        words.gather(np.array([[-1]]))
    assert words.gather(np.zeros((1, 0), dtype=np.int64)).shape == (1, 0, 8)


def test_threads_share_one_table(tmp_path: Path) -> None:
    path, offset, table = _table_file(tmp_path)
    words = WordTable(path, offset, table.shape, capacity=16)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 50, (2, 9)) for _ in range(400)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(words.gather, batches))
    for ids, got in zip(batches, results):
        np.testing.assert_array_equal(got, table[ids])


def test_the_model_word_table_matches_safetensors_and_is_never_mapped() -> None:
    """The MiniLM weights read their word table by token: the rows equal the stored tensor, and
    the weights file is not mapped into the process (mapped, a few dozen tokens put megabytes of
    it in the RSS: the page cache holds it in folios of up to 2 MB)."""
    from safetensors import safe_open

    model_file = default_model_dir() / "model.safetensors"
    weights = MiniLMWeights(default_model_dir(), 0)
    assert isinstance(weights.word, WordTable)
    with safe_open(str(model_file), framework="numpy") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.word_embeddings.weight"))
        reference = f.get_tensor(key)
    ids = np.array([[101, 7592, 2088, 999, 102], [0, 1, 2, 30521, 5]])
    np.testing.assert_array_equal(weights.word.gather(ids), reference[ids])
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(os.path.realpath(model_file))]
    assert mapped == []


def test_an_unusual_layout_falls_back_to_a_copy(tmp_path: Path) -> None:
    """A weights file whose word table is not float32 is copied, as before."""
    from proxy.memory.embedder import _word_table

    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert _word_table(path, "w") is None
