"""Cheap merges' fast paths and the thread pool: the exact formulas to float rounding, same bits as one thread,
exact self-averaging, inputs neither written nor aliased."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytask import MERGERS, PolytaskError
from polytask.merging import merge_files
from polytask.merging._sparse import BLOCK, SparseTaskArithmetic


def _inputs(n: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(40, 30, generator=g) for i in range(6)} | {"steps": torch.tensor(7)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()} for _ in range(n)]
    return base, fts


@pytest.mark.parametrize("n", [3, 5, 7])
def test_average_of_identical_models_is_exact_where_a_float32_sum_is_not(n):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * torch.logspace(-20, 20, 50_000)
    total = x.clone()
    for _ in range(n - 1):
        total += x
    assert not torch.equal(total / n, x)  # the float32 sum would fail this case
    for weights in (None, [0.5 + t for t in range(n)]):
        merged = MERGERS.create("average", weights=weights).merge({"w": x}, [{"w": x}] * n)["w"]
        assert torch.equal(merged, x)


def test_average_running_mean_is_close_to_the_float64_mean():
    base, fts = _inputs(5)
    weights = [1.0, 2.0, 0.5, 3.0, 1.5]
    merged = MERGERS.create("average", weights=weights).merge(base, fts)
    for key in ("w0", "w5"):
        exact = sum(w * f[key].double() for w, f in zip(weights, fts)) / sum(weights)
        torch.testing.assert_close(merged[key].double(), exact, rtol=0, atol=4e-6)


@pytest.mark.parametrize("options", [{}, {"weights": [0.5, -1.0, 2.0], "normalize": True, "lam": 0.7}])
def test_task_arithmetic_in_place_sum_is_the_float64_formula_to_float32_rounding(options):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2 * BLOCK + 123, generator=g)
    models = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(3)]
    ta = MERGERS.create("task-arithmetic", **options)
    weights = options.get("weights", [1.0] * 3)
    divisor = sum(weights) if options.get("normalize") else 1.0
    exact = base.double() + options.get("lam", 0.3) * sum(w * (m.double() - base.double()) for w, m in
                                                             zip(weights, models)) / divisor
    fast = ta.merge_models("w", base, models)
    torch.testing.assert_close(fast.double(), exact, rtol=0, atol=2e-6)
    blocked = SparseTaskArithmetic.merge_models(ta, "w", base, models)  # the sparse family at density 1
    torch.testing.assert_close(fast, blocked, rtol=0, atol=2e-6)
    assert torch.equal(ta.merge_models("w", base, [base] * 3), base)  # self-merge gives the base back


@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties"])
def test_in_memory_merge_neither_writes_nor_aliases_its_inputs(method):
    base, fts = _inputs()
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base, *fts]]
    merged = MERGERS.create(method).merge(base, fts)
    merged["steps"] += 1
    merged["w0"] += 1.0
    for sd, copy in zip([base, *fts], before):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)


@pytest.mark.parametrize("method, options", [("average", {}), ("task-arithmetic", {}), ("ties", {"density": 0.3}),
                                             ("dare", {"density": 0.5, "seed": 3})])
def test_two_threads_give_the_same_bits_as_one(tmp_path, method, options):
    base, fts = _inputs()
    one = MERGERS.create(method, **options).merge(base, fts)
    two = MERGERS.create(method, **options).merge(base, fts, threads=2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    paths = []
    for i, sd in enumerate([base, *fts]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    merge_files(method, paths[0], paths[1:], tmp_path / "out.safetensors", threads=3, **options)
    merge_files(method, paths[0], paths[1:], tmp_path / "folder", threads=2, max_shard_size=5000, **options)
    streamed = load_file(tmp_path / "out.safetensors")
    folder = {}
    for shard in sorted((tmp_path / "folder").glob("*.safetensors")):
        folder |= load_file(shard)
    for got in (streamed, folder):
        assert got.keys() == one.keys() and all(torch.equal(got[k], one[k]) for k in one)


def test_threads_below_one_is_one_line():
    base, fts = _inputs()
    with pytest.raises(PolytaskError, match="threads=0 is below 1"):
        MERGERS.create("average").merge(base, fts, threads=0)


def test_cli_threads_flag_gives_the_same_file_and_refuses_zero(tmp_path):
    from typer.testing import CliRunner

    from polytask.cli import app

    base, fts = _inputs()
    paths = []
    for i, sd in enumerate([base, *fts]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    outs = []
    for threads in ("1", "2"):
        outs.append(tmp_path / f"out{threads}.safetensors")
        result = CliRunner().invoke(app, ["merge", "--base", paths[0], "--method", "ties", "--threads", threads,
                                          "--out", str(outs[-1]), *paths[1:]])
        assert result.exit_code == 0, result.output
    one, two = (load_file(o) for o in outs)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    bad = CliRunner().invoke(app, ["merge", "--base", paths[0], "--threads", "0", "--out", str(tmp_path / "x.safetensors"),
                                   *paths[1:]])
    assert bad.exit_code == 2 and "--threads" in bad.output and not (tmp_path / "x.safetensors").exists()
