"""Hugging Face folders in and out: peft LoRA adapters as task vectors, and merged model folders.

Inputs (besides what :func:`~polytask.merging.taskvector.open_checkpoint` reads: safetensors files,
model folders with one ``model.safetensors`` or shards plus ``model.safetensors.index.json``, in
any float dtype) may be peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).
An adapter is the model θ_0 + τ with the LoRA task vector of Hu et al. (ICLR 2022),

    τ_W = s · B A,   s = α / r  (α / √r with ``use_rslora``),

folded onto the base tensor ``W`` of every adapted module (transposed for ``fan_in_fan_out`` layers
and for embeddings, as peft's ``merge_and_unload`` does; α from ``alpha_pattern`` where it matches,
r from the factors' shape). Adapter tensors that are not LoRA factors are the fine-tuned module in
full (``modules_to_save``, trained biases, an adapted layer's ``base_layer`` copy) and replace the
base's. Adapter keys are matched to the base's names after dropping peft's ``base_model.model.``
prefix, also when the base's names lack (or add) a head-model prefix such as ``model.`` or ``bert.``.
Raw factor files (``lora_A``/``lora_B`` keys) are refused: without ``adapter_config.json`` α is unknown.

Output (:func:`write_folder`): a folder ``from_pretrained`` loads. Rules, per tensor of the base:
floating-point tensors are merged (arithmetic in float32, float64 for float64 models) and cast back
to the input dtype, or to ``out_dtype``; integer and bool buffers are copied from the base; every
model must have exactly the base's tensor names, shapes and dtypes (so embeddings of another vocab
size, or an ``lm_head`` saved by one model only, fail with one line naming the tensor; tied weights
are saved once by transformers and merged once). Shards follow the base's index (same file names,
same tensors per file) unless ``max_shard_size`` is given; every top-level file of the base folder
that is not a weight file (``config.json``, ``generation_config.json``, tokenizer files, ...) is
copied; ``polytask_merge.yaml`` records the method, options, inputs with their sha256 and the
polytask version. The folder is built under a temporary sibling name, one shard at a time (each
merged tensor is written as soon as it is computed), and renamed into place at the end, so a kill
leaves no folder at the output path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from polytask.checkpoints import atomic_dir
from polytask.errors import PolytaskError
from polytask.io import SafetensorsWriter, write_json, write_yaml
from polytask.merging.taskvector import (Checkpoint, ModelSource, _describe, check_compatible, compute_dtype,
                                         is_mergeable, open_checkpoint)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
RECORD = "polytask_merge.yaml"
PEFT_PREFIX = "base_model.model."
#: Files of a model folder that are weights (not copied to the output).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def fold_lora(a: Tensor, b: Tensor, scale: float, transpose: bool = False) -> Tensor:
    """The LoRA task vector s · B A of factors A [r, in] and B [out, r] (transposed: (B A)ᵀ), in float32
    (float64 for float64 factors)."""
    cd = compute_dtype(a.dtype)
    delta = b.to(cd) @ a.to(cd)
    return (delta.T if transpose else delta).mul_(scale)


def lora_scale(config: Mapping[str, Any], module: str, r: int) -> float:
    """peft's scaling of ``module``: α / r, or α / √r with ``use_rslora``; α from ``alpha_pattern`` if one matches."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) / (r ** 0.5 if config.get("use_rslora") else r)


def is_adapter_folder(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and (Path(source) / ADAPTER_CONFIG).is_file()


class LoraCheckpoint(Checkpoint):
    """A peft LoRA adapter folder seen as the full fine-tuned model θ_0 + τ under the base's tensor names.

    Adapted (and replaced) tensors are returned in the compute dtype (float32 for bf16/fp16 bases), so the
    task vector is not rounded to the base dtype; ``meta`` reports the base's dtype.
    """

    def __init__(self, base: Checkpoint, folder: Path, label: str) -> None:
        super().__init__(label)
        self.base = base
        config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise PolytaskError(f"{str(config_path)!r} is not readable JSON ({exc}); pass a peft adapter folder") from exc
        if str(self.config.get("peft_type", "LORA")).upper() != "LORA" or self.config.get("use_dora"):
            raise PolytaskError(f"adapter {label} is {self.config.get('peft_type')}"
                                f"{' with DoRA' if self.config.get('use_dora') else ''}; only LoRA adapters fold into "
                                f"task vectors: merge the adapter into its model (peft merge_and_unload) and pass that folder")
        if not weights.is_file():
            raise PolytaskError(f"adapter folder {str(folder)!r} has no {ADAPTER_WEIGHTS}; save the adapter with "
                                f"save_pretrained(safe_serialization=True)")
        try:
            self._file = safe_open(str(weights), framework="pt")
        except Exception as exc:  # safetensors raises several exception types for bad files
            raise PolytaskError(f"{str(weights)!r} is not a readable safetensors file ({exc}); "
                                f"save the adapter again with save_pretrained") from exc
        base_keys = set(base.keys())
        factors: dict[str, dict[str, str]] = {}
        self._full: dict[str, str] = {}
        for key in self._file.keys():
            name = key.removeprefix(PEFT_PREFIX)
            match = _FACTOR.match(name)
            if match:
                module = match.group("module") or match.group("emodule")
                kind = (match.group("kind") or match.group("ekind"))[-1]  # "A" or "B"
                target = self._base_key(f"{module}.weight", base_keys, key)
                factors.setdefault(target, {"embedding": "" if match.group("kind") else "1", "module": module})[kind] = key
            elif "lora_" in name:
                raise PolytaskError(f"adapter {label} tensor {key!r} is not a LoRA factor polytask can fold "
                                    f"(lora_A/lora_B or lora_embedding_A/B); merge the adapter with peft "
                                    f"merge_and_unload and pass the merged model folder")
            else:
                target = self._base_key(name.replace(".base_layer.", ".").replace(".modules_to_save.", "."), base_keys, key)
                self._full[target] = key
        self._lora: dict[str, tuple[str, str, float, bool]] = {}
        for target, parts in factors.items():
            if "A" not in parts or "B" not in parts:
                raise PolytaskError(f"adapter {label} has only one LoRA factor of {target!r}; save the adapter again")
            r = self._file.get_slice(parts["A"]).get_shape()[0]
            transpose = bool(parts["embedding"]) or bool(self.config.get("fan_in_fan_out"))
            self._lora[target] = (parts["A"], parts["B"], lora_scale(self.config, parts["module"], r), transpose)
        for target, key in self._full.items():
            shape, bshape = tuple(self._file.get_slice(key).get_shape()), base.meta(target)[0]
            if shape != bshape:
                raise PolytaskError(f"adapter {label} tensor {key!r} has shape {tuple(shape)} but the base's {target!r} "
                                    f"has {tuple(bshape)}; use an adapter trained on this base")

    def _base_key(self, name: str, base_keys: set[str], key: str) -> str:
        if name in base_keys:
            return name
        found = [k for k in base_keys if k.endswith("." + name) or name.endswith("." + k)]
        if len(found) != 1:
            raise PolytaskError(f"adapter {self.label} tensor {key!r} matches {'no' if not found else 'several'} base "
                                f"tensor{'s' if found else ''} (looked for {name!r}); use an adapter trained on this base")
        return found[0]

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        return self.base.meta(key)

    def get(self, key: str) -> Tensor:
        if key not in self._lora and key not in self._full:
            return self.base.get(key)
        cd = compute_dtype(self.base.meta(key)[1])
        value = (self._file.get_tensor(self._full[key]) if key in self._full else self.base.get(key)).to(cd)
        if key in self._lora:
            a, b, scale, transpose = self._lora[key]
            value += fold_lora(self._file.get_tensor(a), self._file.get_tensor(b), scale, transpose).to(cd)
        return value

    def adapted(self) -> list[str]:
        """The base tensors this adapter changes."""
        return sorted(set(self._lora) | set(self._full))


def _refuse_raw_factors(source: ModelSource, ck: Checkpoint) -> None:
    if any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k for k in ck.keys()):
        where = Path(source).parent if isinstance(source, (str, os.PathLike)) and Path(source).is_file() else source
        raise PolytaskError(f"{ck.label} holds raw LoRA factors (lora_A/lora_B) that cannot be merged as weights; "
                            f"pass the adapter folder (with {ADAPTER_CONFIG} beside {ADAPTER_WEIGHTS}, e.g. {str(where)!r}) "
                            f"so polytask folds (alpha/r)·B·A onto the base")


def open_inputs(base: ModelSource, finetuned: Sequence[ModelSource]) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and the fine-tuned models (files, folders, peft adapter folders, state dicts) and check
    that they match tensor for tensor; a one-line PolytaskError otherwise."""
    if len(finetuned) == 0:
        raise PolytaskError("no fine-tuned models given; pass at least one model to merge")
    if is_adapter_folder(base):
        raise PolytaskError(f"the base {str(base)!r} is a peft adapter; pass the model it was trained on as the base "
                            f"and the adapter folder as a model to merge")
    base_ck = open_checkpoint(base, _describe(base))
    _refuse_raw_factors(base, base_ck)
    models: list[Checkpoint] = []
    for source in finetuned:
        label = _describe(source)
        if is_adapter_folder(source):
            models.append(LoraCheckpoint(base_ck, Path(source), label))
            continue
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / ADAPTER_WEIGHTS).is_file():
            raise PolytaskError(f"{str(source)!r} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}; save the adapter with "
                                f"peft's save_pretrained so its rank and alpha are known")
        ck = open_checkpoint(source, label)
        _refuse_raw_factors(source, ck)
        models.append(ck)
    check_compatible(base_ck, models)
    return base_ck, models


# --- output ------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or "500MB", "2GB" (powers of 1000) or "2GiB" (powers of 1024), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise PolytaskError(f"option max_shard_size={size!r} is not a size; pass e.g. max_shard_size=5GB")
        unit = " KMGT".index(match.group(2).upper() or " ")
        value = int(float(match.group(1)) * (1024 if match.group(3) else 1000) ** unit)
    if value <= 0:
        raise PolytaskError(f"option max_shard_size={size!r} is not positive; pass e.g. max_shard_size=5GB")
    return value


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def model_folder(source: ModelSource) -> Path | None:
    """The Hugging Face model folder ``source`` names, if it is one (else None)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return Path(source)
    return None


def shard_layout(base: ModelSource, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str | None = None) -> list[tuple[str, list[tuple[str, tuple[int, ...], torch.dtype]]]]:
    """Output files and the tensors of each, in order: the base's shards (names and contents) unless
    ``max_shard_size`` is given, then greedy shards of at most that many bytes (a larger tensor alone)."""
    folder = model_folder(base)
    if max_shard_size is None:
        if folder is not None and (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text()).get("weight_map", {})
            files: dict[str, list[Any]] = {name: [] for name in sorted(set(weight_map.values()))}
            for entry in layout:
                files[weight_map[entry[0]]].append(entry)
            return [(name, entries) for name, entries in files.items() if entries]
        return [("model.safetensors", list(layout))]
    limit = parse_size(max_shard_size)
    shards: list[list[Any]] = [[]]
    size = 0
    for entry in layout:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards, start=1)]


def input_files(source: ModelSource) -> list[Path]:
    """The files a model source is read from (weights and an adapter's config), for hashing."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    path = Path(source)
    if path.is_file():
        return [path]
    if is_adapter_folder(path):
        return [path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if (path / INDEX).is_file():
        return [path / INDEX] + sorted({path / f for f in json.loads((path / INDEX).read_text()).get("weight_map", {}).values()})
    return sorted(path.glob("model-*-of-*.safetensors"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def hash_inputs(sources: Sequence[ModelSource], pool: ThreadPoolExecutor) -> list[tuple[str, dict[str, Future[str]]]]:
    """Start hashing every input's files in ``pool`` (hashlib releases the GIL, so it overlaps the merge)."""
    return [(str(s) if isinstance(s, (str, os.PathLike)) else "in-memory",
             {f.name: pool.submit(sha256, f) for f in input_files(s)}) for s in sources]


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PolytaskError(f"output {str(out)!r} is a file, not a folder; choose another out= or a name ending in .safetensors")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PolytaskError(f"output folder {str(out)!r} already exists; pass overwrite=True or choose another out=")


def write_folder(out: str | os.PathLike[str], base_source: ModelSource, base: Checkpoint,
                 merged: Callable[[str], Tensor], record: dict[str, Any], *, inputs: Sequence[ModelSource] = (),
                 out_dtype: torch.dtype | None = None, max_shard_size: int | str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the merged model to folder ``out`` atomically, shard by shard; ``merged(key)`` computes one tensor.

    ``record`` (method, options) goes into ``polytask_merge.yaml`` with the inputs' sha256 and the version.
    Returns the index: ``{"metadata": {"total_size": ...}, "weight_map": {...}}``.
    """
    out = Path(out)
    check_output(out, overwrite)
    layout = []
    for key in base.keys():
        shape, dtype = base.meta(key)
        layout.append((key, shape, out_dtype if out_dtype is not None and is_mergeable(dtype) else dtype))
    shards = shard_layout(base_source, layout, max_shard_size)
    weight_map: dict[str, str] = {}
    total = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashes = hash_inputs(list(inputs), pool)
        with atomic_dir(out) as tmp:
            for name, entries in shards:
                with SafetensorsWriter(tmp / name, entries, metadata={"format": "pt"}) as writer:
                    for key, shape, dtype in entries:
                        writer.write(key, merged(key).to(dtype))
                        weight_map[key] = name
                        total += _nbytes(shape, dtype)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            if len(shards) > 1:
                write_json(tmp / INDEX, index)
            folder = model_folder(base_source)
            if folder is not None:
                for item in sorted(folder.iterdir()):
                    if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != RECORD:
                        shutil.copy2(item, tmp / item.name)
            write_yaml(tmp / RECORD, {**record, "inputs": [{"path": p, "sha256": {n: f.result() for n, f in files.items()}}
                                                           for p, files in hashes]})
    return index


def polytask_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polytask")
    except PackageNotFoundError:
        return "unknown"
