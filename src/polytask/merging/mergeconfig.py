"""Merge configs in mergekit's schema: ``polytask merge --config merge.yml --out merged/``.

A config names ``merge_method``, ``base_model``, ``models`` (each ``{model: path, parameters: {...}}``),
global ``parameters`` and ``dtype``, as mergekit's ``mergekit-yaml`` reads them. The mergekit methods
polytask shares keep mergekit's parameter meanings and defaults (mergekit's docs/merge_methods.md and
merge_methods/registry.py):

=================  =============================  =============================================
merge_method       polytask merger                 parameters (per model / global; default)
=================  =============================  =============================================
linear             average (weighted)              weight; normalize (true)
task_arithmetic    task-arithmetic                 weight; lambda (1), normalize (false)
ties               ties                            weight, density (1); lambda (1), normalize (true)
dare_linear        dare                            weight, density (1); lambda (1), rescale (true), normalize (false)
dare_ties          dare, ties=True                 weight, density (1); lambda (1), rescale (true), normalize (false)
breadcrumbs        breadcrumbs                     weight, density (1), gamma (0.01); lambda (1), normalize (false)
breadcrumbs_ties   breadcrumbs, ties=True          weight, density (1), gamma (0.01); lambda (1), normalize (false)
=================  =============================  =============================================

``weight`` scales each task vector (defaults to 1 here; mergekit requires it), ``density`` is the kept
fraction, breadcrumbs' ``gamma`` the fraction of largest magnitudes removed (polytask's ``beta``; capped
at 1 − density as mergekit does), ``normalize`` divides by the sum of the weights (of the models agreeing
in sign, with sign election: TIES' disjoint mean; without it the disjoint sum), ``lambda`` scales the merged
task vector, ``int8_mask`` is accepted and changes nothing. A per-model parameter given under the global
``parameters`` is every model's default. ``dtype`` (or ``out_dtype``) is the dtype written; polytask always
computes in float32. A ``models`` entry that is the base model is skipped, as mergekit does; ``model: base+adapter``
(mergekit's LoRA syntax) is the adapter folder merged onto that base.

Where polytask differs on purpose: TIES trims each whole task vector (the paper) unless ``trim: tensor``
(mergekit trims per tensor); counts are round(density · n), not int(density · n); DARE's drops come from a
seeded generator (``seed``, default 0), so merges repeat. polytask extensions under ``parameters``:
``trim`` (ties), ``merge_func`` (mean / sum / max, instead of ``normalize``, with sign election),
``matrices_only`` and ``seed`` (dare). Any other ``merge_method`` is looked up among polytask's own
data-free mergers and gets its options under ``parameters`` by polytask's names (per-model ``weight`` and
``density`` become the ``weights`` / ``density`` lists). Every other key is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from polytask.errors import PolytaskError
from polytask.merging.base import Merger
from polytask.registry import MERGERS

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
#: mergekit method -> (polytask merger, fixed options, per-model parameters, global parameters with defaults)
MERGEKIT: dict[str, tuple[str, dict[str, Any], tuple[str, ...], dict[str, Any]]] = {
    "linear": ("average", {}, ("weight",), {"normalize": True}),
    "task_arithmetic": ("task-arithmetic", {}, ("weight",), {"lambda": 1.0, "normalize": False}),
    "ties": ("ties", {}, ("weight", "density"),
             {"lambda": 1.0, "normalize": True, "trim": "global", "merge_func": None}),
    "dare_linear": ("dare", {"ties": False}, ("weight", "density"),
                    {"lambda": 1.0, "normalize": False, "rescale": True, "seed": 0, "matrices_only": False}),
    "dare_ties": ("dare", {"ties": True}, ("weight", "density"),
                  {"lambda": 1.0, "normalize": False, "rescale": True, "seed": 0, "matrices_only": False, "merge_func": None}),
    "breadcrumbs": ("breadcrumbs", {"ties": False}, ("weight", "density", "gamma"), {"lambda": 1.0, "normalize": False}),
    "breadcrumbs_ties": ("breadcrumbs", {"ties": True}, ("weight", "density", "gamma"),
                         {"lambda": 1.0, "normalize": False, "merge_func": None}),
}
#: mergekit methods polytask does not implement (named in the error).
MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "della", "della_linear", "sce",
                 "passthrough", "nearswap", "arcee_fusion", "nuzzle", "ram", "core_space", "task_adapter")
PER_MODEL_DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


@dataclass
class MergePlan:
    """What a config asks for: the merger, the base and the models, the output dtype, the config itself."""

    method: str
    merger: Merger
    base: str
    models: list[str]
    out_dtype: torch.dtype | None = None
    config: dict[str, Any] = field(default_factory=dict)


def _fail(message: str) -> PolytaskError:
    return PolytaskError(f"merge config: {message}")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "per-layer gradients (lists)" if isinstance(value, list) else \
            "tensor filters" if isinstance(value, dict) else type(value).__name__
        raise _fail(f"{where}={value!r}: {kind} are not supported; give one number")
    return float(value)


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"{where}={value!r} must be true or false")
    return value


def _path(value: Any, where: str, folder: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"{where} must be a path, not {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (folder / path).exists():
        path = folder / path
    return str(path)


def load_merge_config(path: str | Path) -> MergePlan:
    """Read a mergekit-style YAML file into a :class:`MergePlan` (one-line PolytaskError on any bad key)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolytaskError(f"merge config {str(path)!r} cannot be read ({exc.strerror}); pass a YAML file") from exc
    except yaml.YAMLError as exc:
        raise PolytaskError(f"merge config {str(path)!r} is not valid YAML; check its indentation") from exc
    return parse_merge_config(raw, path.parent)


def parse_merge_config(raw: Any, folder: Path = Path(".")) -> MergePlan:
    """A :class:`MergePlan` from a parsed config (paths relative to ``folder`` when not found as given)."""
    if not isinstance(raw, dict):
        raise _fail("the file must hold a mapping with merge_method, base_model and models")
    for key in raw:
        if key not in TOP_KEYS:
            hint = " (slices and layer ranges are not supported: merge whole models)" if key == "slices" else ""
            raise _fail(f"unsupported key {key!r}{hint}; polytask reads {', '.join(TOP_KEYS)}")
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise _fail("merge_method is missing; pass e.g. merge_method: ties")
    if method in MERGEKIT_ONLY:
        raise _fail(f"merge_method {method!r} is a mergekit method polytask does not implement; use one of "
                    f"{', '.join(MERGEKIT)} or a polytask merger (polytask list merger)")
    if raw.get("tokenizer_source", "base") != "base":
        raise _fail(f"tokenizer_source={raw['tokenizer_source']!r} is not supported; polytask copies the base "
                    f"model's tokenizer (tokenizer_source: base)")
    out_dtype = None
    for key in ("dtype", "out_dtype"):  # out_dtype, when given, wins, as in mergekit
        if key in raw:
            if raw[key] not in DTYPES:
                raise _fail(f"{key}={raw[key]!r} is not a dtype; pass one of {', '.join(DTYPES)}")
            out_dtype = DTYPES[raw[key]]
    base = _path(raw["base_model"], "base_model", folder) if raw.get("base_model") is not None else None
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail("models must be a list of {model: path, parameters: {...}}")
    globals_ = raw.get("parameters") or {}
    if not isinstance(globals_, dict):
        raise _fail(f"parameters must be a mapping, not {globals_!r}")
    models, per_model = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise _fail(f"models[{i}] must be a mapping with a model: path")
        for key in entry:
            if key not in MODEL_KEYS:
                raise _fail(f"models[{i}] has unsupported key {key!r}; a model entry reads {', '.join(MODEL_KEYS)}")
        model = entry["model"]
        if isinstance(model, str) and "+" in model and base is not None:
            head, _, adapter = model.partition("+")
            if _path(head, f"models[{i}].model", folder) != base:
                raise _fail(f"models[{i}].model={model!r} applies a LoRA to a model other than the base; "
                            f"merge the adapter into it first and list that folder")
            model = adapter
        model = _path(model, f"models[{i}].model", folder)
        if model == base and raw["merge_method"] != "linear":
            continue  # mergekit lists the base among the models, without parameters
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise _fail(f"models[{i}].parameters must be a mapping, not {params!r}")
        models.append(model)
        per_model.append((i, params))
    if base is None:
        if method != "linear":
            raise _fail(f"base_model is missing; {method} merges task vectors relative to a base model")
        base = models[0]
    if not models:
        raise _fail("models lists only the base model; add the fine-tuned models to merge")
    merger_name, options = _merger_options(method, globals_, per_model)
    merger = MERGERS.create(merger_name, **options)
    if not merger.data_free:
        raise _fail(f"merge_method {method!r} learns from data; a config merge takes a data-free merger")
    return MergePlan(method, merger, base, models, out_dtype, dict(raw))


def _merger_options(method: str, globals_: Mapping[str, Any], per_model: list[tuple[int, dict]]) -> tuple[str, dict]:
    if method in MERGEKIT:
        return _mergekit_options(method, globals_, per_model)
    if method not in MERGERS:
        raise _fail(f"merge_method {method!r} is neither a mergekit method polytask implements "
                    f"({', '.join(MERGEKIT)}) nor a polytask merger ({', '.join(MERGERS.names())})")
    options = dict(globals_)
    for name, option in (("weight", "weights"), ("density", "density")):
        values = []
        for i, params in per_model:
            if name in params:
                values.append(_number(f"models[{i}].parameters.{name}", params[name]))
        if values:
            if len(values) != len(per_model):
                raise _fail(f"{name} is given for some models only; give it for every model or under parameters")
            options[option] = values
    for i, params in per_model:
        for key in params:
            if key not in ("weight", "density"):
                raise _fail(f"models[{i}].parameters has unsupported key {key!r} for polytask merger {method!r}; "
                            f"per model it reads weight, density (the others go under parameters)")
    return method, options


def _mergekit_options(method: str, globals_: Mapping[str, Any], per_model: list[tuple[int, dict]]) -> tuple[str, dict]:
    merger, fixed, model_keys, global_defaults = MERGEKIT[method]
    allowed = set(global_defaults) | set(model_keys) | {"int8_mask"}
    for key in globals_:
        if key not in allowed:
            raise _fail(f"parameters has unsupported key {key!r} for {method}; it reads {', '.join(sorted(allowed))}")
    for i, params in per_model:
        for key in params:
            if key not in model_keys:
                raise _fail(f"models[{i}].parameters has unsupported key {key!r} for {method}; per model it reads "
                            f"{', '.join(model_keys)}")
    if "int8_mask" in globals_:
        _flag("parameters.int8_mask", globals_["int8_mask"])
    values = {}
    for key in model_keys:
        default = _number(f"parameters.{key}", globals_[key]) if key in globals_ else PER_MODEL_DEFAULTS[key]
        values[key] = [_number(f"models[{i}].parameters.{key}", p[key]) if key in p else default for i, p in per_model]
    g = {k: globals_.get(k, v) for k, v in global_defaults.items()}
    options: dict[str, Any] = dict(fixed)
    if method == "linear":
        return merger, {"weights": values["weight"], "normalize": _flag("parameters.normalize", g["normalize"])}
    options["lam"] = _number("parameters.lambda", g["lambda"])
    options["weights"] = values["weight"]
    if "density" in values:
        options["density"] = values["density"]
    if "gamma" in values:  # mergekit removes at most 1 − density of the largest magnitudes
        options["beta"] = [0.0 if d >= 1.0 else min(gm, 1.0 - d) for gm, d in zip(values["gamma"], values["density"])]
    normalize = _flag("parameters.normalize", g["normalize"])
    if "merge_func" in global_defaults or method == "ties":
        if g.get("merge_func") is not None:
            if "normalize" in globals_:
                raise _fail("give normalize or merge_func, not both (normalize: true is merge_func: mean, false is sum)")
            options["merge_func"] = g["merge_func"]
        else:
            options["merge_func"] = "mean" if normalize else "sum"
    else:
        options["normalize"] = normalize
    for key in ("trim", "rescale", "seed", "matrices_only"):
        if key in global_defaults:
            options[key] = g[key]
    return merger, options
