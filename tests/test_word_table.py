"""The embedder's word table: mapped from the weights file, equal to the stored tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from proxy.memory.minilm_model import MiniLMWeights, default_model_dir


def test_the_model_word_table_is_the_stored_tensor_mapped_read_only() -> None:
    """The MiniLM weights map their word table from the file (not a copy in the process's own
    memory): the rows gathered equal the stored tensor, and the mapping cannot be written."""
    from safetensors import safe_open

    model_file = default_model_dir() / "model.safetensors"
    weights = MiniLMWeights(default_model_dir(), 0)
    assert isinstance(weights.word, np.memmap) and not weights.word.flags.writeable
    with safe_open(str(model_file), framework="numpy") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.word_embeddings.weight"))
        reference = f.get_tensor(key)
    ids = np.array([[101, 7592, 2088, 999, 102], [0, 1, 2, 30521, 5]])
    np.testing.assert_array_equal(np.asarray(weights.word[ids]), reference[ids])
    embedded = weights.embeddings(ids)
    assert type(embedded) is np.ndarray and embedded.flags.writeable  # a copy, summed in place


def test_an_unusual_layout_falls_back_to_a_copy(tmp_path: Path) -> None:
    """A weights file whose word table is not float32 is copied, as before."""
    from proxy.memory.minilm_model import _word_table

    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert _word_table(path, "w") is None
