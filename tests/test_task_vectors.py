"""Task-vector tools: extract / apply / add / stats on files, checked by hand; forgetting; dtypes;
bad input in one line; the ``polytask task-vector`` command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli
from polytask import PolytaskError
from polytask.merging.vectors import (add_task_vectors, apply_task_vectors, extract_task_vector, task_vector_stats,
                                      vectors_of)


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g), "steps": torch.tensor([7])}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in range(3):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        paths[f"ft{i}"] = tmp_path / f"ft{i}.safetensors"
        save_file(ft, str(paths[f"ft{i}"]))
    return paths


def _load(p):
    return load_file(str(p))


def test_extract_writes_the_difference_of_float_tensors(models, tmp_path):
    out = tmp_path / "tv.safetensors"
    summary = extract_task_vector(models["base"], models["ft0"], out)
    tv, base, ft = _load(out), _load(models["base"]), _load(models["ft0"])
    assert set(tv) == {"w", "b"} and summary["parameters"] == 24  # the int buffer is not a task-vector entry
    assert torch.equal(tv["w"], ft["w"] - base["w"]) and torch.equal(tv["b"], ft["b"] - base["b"])
    with safe_open(str(out), framework="pt") as f:
        assert "polytask_task_vector" in f.metadata()


def test_apply_adds_scaled_vectors_and_negation_forgets(models, tmp_path):
    tvs = [tmp_path / f"tv{i}.safetensors" for i in range(2)]
    for i, tv in enumerate(tvs):
        extract_task_vector(models["base"], models[f"ft{i}"], tv)
    base, t0, t1 = _load(models["base"]), _load(tvs[0]), _load(tvs[1])
    apply_task_vectors(models["base"], tvs, tmp_path / "m.safetensors", [0.5, -2.0])
    merged = _load(tmp_path / "m.safetensors")
    for k in ("w", "b"):
        torch.testing.assert_close(merged[k], base[k] + 0.5 * t0[k] - 2.0 * t1[k], rtol=0, atol=1e-6)
    assert torch.equal(merged["steps"], base["steps"])
    # θ_ft − τ: forgetting the task gives back the base (to float32 rounding)
    apply_task_vectors(models["ft0"], [tvs[0]], tmp_path / "forgot.safetensors", -1.0)
    forgot = _load(tmp_path / "forgot.safetensors")
    for k in ("w", "b"):
        torch.testing.assert_close(forgot[k], base[k], rtol=0, atol=1e-6)


def test_add_and_stats_by_hand(models, tmp_path):
    tvs = [tmp_path / f"tv{i}.safetensors" for i in range(3)]
    for i, tv in enumerate(tvs):
        extract_task_vector(models["base"], models[f"ft{i}"], tv)
    add_task_vectors(tvs[:2], tmp_path / "sum.safetensors", [1.0, 3.0])
    total, t = _load(tmp_path / "sum.safetensors"), [_load(p) for p in tvs]
    for k in ("w", "b"):
        torch.testing.assert_close(total[k], t[0][k] + 3 * t[1][k], rtol=0, atol=1e-6)
    flat = [torch.cat([v["b"], v["w"].reshape(-1)]).double() for v in t]
    stats = task_vector_stats(vectors_of(tvs))
    assert stats["norms"] == pytest.approx([float(f.norm()) for f in flat], rel=1e-6)
    for i in range(3):
        for j in range(3):
            want = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert stats["cosine"][i][j] == pytest.approx(want, abs=1e-6)
    # from fine-tuned models and their base: the same numbers
    again = task_vector_stats(vectors_of([models["ft0"], models["ft1"], models["ft2"]], models["base"]))
    torch.testing.assert_close(torch.tensor(again["cosine"]), torch.tensor(stats["cosine"]), rtol=0, atol=1e-6)


def test_bf16_models_keep_their_dtype(tmp_path):
    base = {"w": torch.randn(8, 8).bfloat16()}
    ft = {"w": (base["w"].float() + 0.25).bfloat16()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    extract_task_vector(tmp_path / "b.safetensors", tmp_path / "f.safetensors", tmp_path / "tv.safetensors")
    assert _load(tmp_path / "tv.safetensors")["w"].dtype == torch.float32
    apply_task_vectors(tmp_path / "b.safetensors", [tmp_path / "tv.safetensors"], tmp_path / "m.safetensors")
    merged = _load(tmp_path / "m.safetensors")["w"]
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, ft["w"])


def test_bad_input_is_one_line(models, tmp_path):
    tv = tmp_path / "tv.safetensors"
    extract_task_vector(models["base"], models["ft0"], tv)
    save_file({"w": torch.zeros(2, 2), "b": torch.zeros(4), "steps": torch.tensor([7])}, str(tmp_path / "small.safetensors"))
    cases = [
        (lambda: apply_task_vectors(models["base"], [models["ft1"]], tmp_path / "x.safetensors"), "not a task-vector file"),
        (lambda: apply_task_vectors(models["base"], [tv, tv], tmp_path / "x.safetensors", [1, 2, 3]), "3 scales for 2"),
        (lambda: extract_task_vector(models["base"], models["ft0"], tmp_path / "folder"), "one .safetensors file"),
        (lambda: extract_task_vector(models["base"], tmp_path / "small.safetensors", tmp_path / "y.safetensors"),
         "has shape (2, 2)"),
        (lambda: add_task_vectors([], tmp_path / "z.safetensors"), "no task vectors given"),
    ]
    for call, message in cases:
        with pytest.raises(PolytaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert not any((tmp_path / n).exists() for n in ("x.safetensors", "folder", "y.safetensors", "z.safetensors"))


def test_task_vector_command_end_to_end(models, tmp_path):
    tv = tmp_path / "tv.safetensors"
    run_cli("task-vector", "extract", str(models["ft0"]), "--base", str(models["base"]), "--out", str(tv))
    proc = run_cli("task-vector", "stats", str(models["ft0"]), str(models["ft1"]), "--base", str(models["base"]),
                   "--json", str(tmp_path / "s.json"))
    assert "cosine" in proc.stdout and json.loads((tmp_path / "s.json").read_text())["cosine"][0][0] == pytest.approx(1.0)
    proc = run_cli("task-vector", "apply", str(models["ft0"]), "--base", str(models["base"]), "--out",
                   str(tmp_path / "m.safetensors"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a task-vector file" in proc.stderr
