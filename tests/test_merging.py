"""Merging: hand-computed TIES/TA/Fisher cases, DARE's expectation, Breadcrumbs' masks, task-vector
algebra, checkpoint validation, streaming == in-memory, learned mergers and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from polytask import MERGERS, PolytaskError
from polytask.merging import MergeData, TaskVector, diagonal_fisher, merge_files


def _models(base: list[float], *taus: list[float]) -> tuple[dict, list[dict]]:
    b = torch.tensor(base)
    return {"w": b}, [{"w": b + torch.tensor(t)} for t in taus]


# --- data-free rules on hand cases -------------------------------------------------------------

def test_ties_matches_hand_computed_trim_elect_disjoint_mean():
    base, fts = _models([1.0] * 5,
                        [3.0, -1.0, 0.5, -4.0, 2.0],     # top-40%: 3, -4
                        [-2.0, 5.0, 1.0, -3.0, 0.1],     # top-40%: 5, -3
                        [1.0, -6.0, 2.0, 0.2, -0.3])     # top-40%: -6, 2
    # trimmed sum [3, -1, 2, -7, 0] -> signs [+, -, +, -, 0]; agreeing means [3, -6, 2, -3.5, 0]
    merged = MERGERS.create("ties", density=0.4, lam=1.0).merge(base, fts)["w"]
    assert torch.equal(merged, torch.tensor([4.0, -5.0, 3.0, -2.5, 1.0]))
    half = MERGERS.create("ties", density=0.4, lam=0.5).merge(base, fts)["w"]
    assert torch.equal(half, torch.tensor([2.5, -2.0, 2.0, -0.75, 1.0]))


def test_ties_trims_whole_task_vector_by_default_and_per_tensor_as_an_option():
    base = {"a": torch.zeros(3), "b": torch.zeros(2)}
    ft = {"a": torch.tensor([4.0, 3.0, 0.5]), "b": torch.tensor([1.0, -2.0])}
    # 5 entries, density 0.4 keeps 2: globally the two largest (4, 3); per tensor one of a (4) and one of b (-2)
    whole = MERGERS.create("ties", density=0.4).merge(base, [ft])
    assert torch.equal(whole["a"], torch.tensor([4.0, 3.0, 0.0])) and torch.equal(whole["b"], torch.tensor([0.0, 0.0]))
    per = MERGERS.create("ties", density=0.4, trim="tensor").merge(base, [ft])
    assert torch.equal(per["a"], torch.tensor([4.0, 0.0, 0.0])) and torch.equal(per["b"], torch.tensor([0.0, -2.0]))


@pytest.mark.parametrize("merge_func, expect", [("mean", [2.0, -3.0]), ("sum", [4.0, -6.0]), ("max", [3.0, -4.0])])
def test_ties_merge_funcs_by_hand(merge_func, expect):
    base, fts = _models([0.0, 0.0], [1.0, -2.0], [3.0, 1.0], [-1.0, -4.0])  # elected signs (+, -)
    merged = MERGERS.create("ties", density=1.0, merge_func=merge_func).merge(base, fts)["w"]
    assert torch.equal(merged, torch.tensor(expect))


def test_ties_per_model_weights_and_densities():
    base, fts = _models([0.0, 0.0], [1.0, -2.0], [3.0, 1.0], [-1.0, -4.0])
    weighted = MERGERS.create("ties", density=1.0, weights=[1.0, 0.5, 1.0]).merge(base, fts)["w"]
    # weighted deltas [1, -2], [1.5, 0.5], [-1, -4]; signs (+, -); (1 + 1.5) / (1 + 0.5) and (-2 - 4) / 2
    assert torch.equal(weighted, torch.tensor([2.5 / 1.5, -3.0]))
    sparse = MERGERS.create("ties", density=[1.0, 0.5, 0.5], trim="tensor").merge(base, fts)["w"]
    # model 2 keeps 3, model 3 keeps -4: sums (4, -6) -> (1 + 3) / 2, (-2 - 4) / 2
    assert torch.equal(sparse, torch.tensor([2.0, -3.0]))
    with pytest.raises(PolytaskError, match="option density has 2 values but 3 models are merged"):
        MERGERS.create("ties", density=[0.5, 0.5]).merge(base, fts)


def test_dare_matrices_only_leaves_biases_and_norms_whole():
    base = {"w": torch.zeros(50, 40), "b": torch.zeros(40), "norm": torch.zeros(40)}
    ft = {k: torch.ones_like(v) for k, v in base.items()}
    merged = MERGERS.create("dare", density=0.5, lam=1.0, matrices_only=True).merge(base, [ft])
    assert torch.equal(merged["b"], torch.ones(40)) and torch.equal(merged["norm"], torch.ones(40))
    assert set(merged["w"].unique().tolist()) == {0.0, 2.0}
    everything = MERGERS.create("dare", density=0.5, lam=1.0).merge(base, [ft])
    assert set(everything["b"].unique().tolist()) <= {0.0, 2.0} and not torch.equal(everything["b"], torch.ones(40))
    unscaled = MERGERS.create("dare", density=0.5, lam=1.0, rescale=False).merge(base, [ft])
    assert torch.equal(unscaled["w"], everything["w"] / 2)


@pytest.mark.parametrize("method, options", [
    ("average", {}), ("task-arithmetic", {}), ("ties", {}), ("ties", {"trim": "tensor", "merge_func": "max"}),
    ("dare", {"density": 0.3}), ("dare", {"ties": True, "matrices_only": True}), ("breadcrumbs", {}),
    ("breadcrumbs", {"ties": True, "merge_func": "sum"}), ("fisher", {}),
])
def test_merging_a_model_with_itself_gives_back_the_base(method, options):
    base, _ = _checkpoints(1)
    if method == "fisher":
        options = {"fishers": [{k: torch.ones(v.shape) for k, v in base.items() if v.is_floating_point()}] * 2}
    merged = MERGERS.create(method, **options).merge(base, [base, base])
    assert all(torch.equal(merged[k], base[k]) and merged[k].dtype == base[k].dtype for k in base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_radix_selection_equals_kthvalue_of_the_concatenation(dtype):
    from polytask.merging._sparse import kth_largest_streaming

    g = torch.Generator().manual_seed(0)
    parts = [[torch.randn(n, generator=g, dtype=dtype).abs().round(decimals=1) for n in (1000, 7, 3000)] for _ in range(2)]
    parts[1][1].zero_()
    ks = [1, 2500]
    got = kth_largest_streaming(lambda: ([parts[0][i], parts[1][i]] for i in range(3)), ks, dtype)
    for t, k in enumerate(ks):
        flat = torch.cat(parts[t])
        assert got[t] == float(flat.kthvalue(flat.numel() - k + 1).values)


@pytest.mark.parametrize("case", ["continuous", "tied zeros", "bf16", "bracket missed"])
def test_global_thresholds_in_one_pass_equal_kthvalue_of_the_whole_task_vector(case, monkeypatch):
    from polytask.merging import _sparse
    from polytask.merging.taskvector import DictCheckpoint

    g = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    base = {"a": torch.randn(300, 200, generator=g), "b": torch.randn(4000, generator=g), "n": torch.arange(5)}
    fts = [{k: (v + 0.01 * (t + 1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()} for t in range(3)]
    if case == "tied zeros":  # most entries untouched: the threshold falls among tied zeros
        fts[0]["a"] = base["a"].clone()
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    fts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for sd in fts]
    if case == "bracket missed":  # a bracket that cannot hold the threshold: the radix pass answers
        monkeypatch.setattr(_sparse, "_sample_brackets", lambda *a: [(0.0, 1e-9)] * len(a[1]))
    densities = [0.5 if case == "tied zeros" else 0.2, 0.2, 0.013]
    plans = _sparse.global_magnitude_plans(DictCheckpoint(base), [DictCheckpoint(sd) for sd in fts], densities)
    for t, d in enumerate(densities):
        flat = torch.cat([(fts[t][k].float() - base[k].float()).abs().reshape(-1) for k in ("a", "b")])
        k = round(d * flat.numel())
        assert plans[t] == (float(flat.kthvalue(flat.numel() - k + 1).values), None)


def test_task_arithmetic_hand_case():
    base, fts = _models([1.0, 2.0], [0.5, -1.0], [1.0, 1.0])
    merged = MERGERS.create("task-arithmetic", lam=0.5).merge(base, fts)["w"]
    assert torch.equal(merged, torch.tensor([1.75, 2.0]))


def test_average_of_identical_models_is_that_model():
    torch.manual_seed(0)
    base = {"w": torch.randn(50, 7), "b": torch.randn(7).half()}
    ft = {k: v + 0.01 * torch.randn_like(v.float()).to(v.dtype) for k, v in base.items()}
    merged = MERGERS.create("average").merge(base, [ft, ft, ft])
    assert all(torch.equal(merged[k], ft[k]) and merged[k].dtype == ft[k].dtype for k in ft)


def test_breadcrumbs_masks_exactly_the_configured_fractions():
    g = torch.Generator().manual_seed(0)
    mags = torch.randperm(200, generator=g).float() + 1.0
    signs = torch.where(torch.rand(200, generator=g) < 0.5, -1.0, 1.0)
    tau = (mags * signs).reshape(10, 20)
    merged = MERGERS.create("breadcrumbs", density=0.35, beta=0.05, lam=1.0).merge(
        {"w": torch.zeros(10, 20)}, [{"w": tau}])["w"]
    expect = torch.where((tau.abs() > 120) & (tau.abs() <= 190), tau, torch.zeros(()))  # drop 120 smallest, 10 largest
    assert torch.equal(merged, expect)
    assert int((merged != 0).sum()) == 70


def test_dare_is_unbiased_and_drops_at_rate_p():
    tau = torch.tensor([0.5, -2.0, 3.0, 0.1, -0.7])
    base = {"w": torch.zeros(5)}
    draws = torch.stack([MERGERS.create("dare", density=0.5, lam=1.0, seed=s).merge(base, [{"w": tau}])["w"]
                         for s in range(2000)])
    std = tau.abs() * math.sqrt(0.5 / 0.5 / 2000)
    assert ((draws.mean(0) - tau).abs() < 5 * std).all()
    assert set(draws[:, 0].unique().tolist()) == {0.0, 1.0}  # dropped, or rescaled by 1/(1-p)
    big = MERGERS.create("dare", density=0.1, lam=1.0, seed=3).merge({"w": torch.zeros(100_000)},
                                                               [{"w": torch.ones(100_000)}])["w"]
    dropped = float((big == 0).float().mean())
    assert abs(dropped - 0.9) < 5 * math.sqrt(0.9 * 0.1 / 100_000)
    assert torch.allclose(big[big != 0], torch.full((1,), 10.0))
    again = MERGERS.create("dare", density=0.1, lam=1.0, seed=3).merge({"w": torch.zeros(100_000)},
                                                                 [{"w": torch.ones(100_000)}])["w"]
    assert torch.equal(big, again)


@pytest.mark.parametrize("method,options", [("average", {}), ("average", {"weights": [1.0, 2.0, 0.5]}),
                                            ("task-arithmetic", {}), ("ties", {}), ("ties", {"trim": "tensor"}),
                                            ("dare", {"density": 0.5}), ("breadcrumbs", {})])
def test_bf16_inputs_merged_in_their_own_dtype_equal_converting_them_first(method, options):
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g)}
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    low = [{k: v.bfloat16() for k, v in sd.items()} for sd in [base, *fts]]
    got = MERGERS.create(method, **options).merge(low[0], low[1:])
    wide = MERGERS.create(method, **options).merge({k: v.float() for k, v in low[0].items()},
                                                   [{k: v.float() for k, v in sd.items()} for sd in low[1:]])
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], wide[k].bfloat16()) for k in base)


def test_dare_mask_is_counter_based_same_for_any_blocks_distinct_per_key():
    from polytask.merging.dare import keep_mask, philox_key

    key = philox_key(3, "layer.weight", 1)
    whole = keep_mask(key, 0, 70_001, 0.9)
    cuts = [0, 5, 8, 65_536, 65_541, 70_001]  # unaligned and aligned block edges
    assert np.array_equal(whole, np.concatenate([keep_mask(key, a, b - a, 0.9) for a, b in zip(cuts, cuts[1:])]))
    assert abs(whole.mean() - 0.1) < 0.005
    others = [philox_key(4, "layer.weight", 1), philox_key(3, "layer.bias", 1), philox_key(3, "layer.weight", 2)]
    for other in others:  # another seed, tensor or model: an unrelated mask (agreement at chance, 0.82)
        assert abs(float((keep_mask(other, 0, 70_001, 0.9) == whole).mean()) - 0.82) < 0.01


def test_dare_with_ties_uses_sign_election():
    base, fts = _models([0.0, 0.0], [1.0, -1.0], [3.0, 1.0], [-1.0, -3.0])
    merged = MERGERS.create("dare", density=1.0, ties=True).merge(base, fts)["w"]
    assert torch.equal(merged, torch.tensor([2.0, -2.0]))  # λ defaults to 1 with ties


@pytest.mark.parametrize("method, options, message", [
    ("ties", {"density": 20}, "option density=20.0 is outside [0, 1]"),
    ("dare", {"density": 0.0}, "option density=0.0 is outside (0, 1]"),
    ("breadcrumbs", {"density": 0.9, "beta": 0.2}, "options density=0.9 and beta=0.2"),
])
def test_out_of_range_sparsity_names_the_option(method, options, message):
    with pytest.raises(PolytaskError) as err:
        MERGERS.create(method, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fisher_merge_with_hand_made_fishers():
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    fishers = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}]
    merged = MERGERS.create("fisher", fishers=fishers, epsilon=0.0).merge(base, fts)["w"]
    assert torch.allclose(merged, torch.tensor([2.5, 3.0]))
    weighted = MERGERS.create("fisher", fishers=fishers, weights=[3.0, 1.0], epsilon=0.0).merge(base, fts)["w"]
    assert torch.allclose(weighted, torch.tensor([(3 * 1 + 3 * 3) / 6, (9 * 2 + 6) / 10]))
    computed = MERGERS.create("fisher", fishers=lambda i, sd: fishers[i], epsilon=0.0).merge(base, fts)["w"]
    assert torch.equal(computed, merged)


def test_diagonal_fisher_matches_closed_form_for_softmax_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.randn(10, 3)
    fisher = diagonal_fisher(model, [x[:6], x[6:]])
    p = torch.softmax(model(x), dim=-1)  # ∂ log p_y / ∂ b_c = 1[y=c] − p_c
    grads = torch.eye(4)[None] - p[:, None, :]  # (N, y, c)
    expect = (p[:, :, None] * grads.pow(2)).sum(1).mean(0)
    assert torch.allclose(fisher["bias"], expect, atol=1e-6)
    assert fisher["weight"].shape == (4, 3)


# --- task vectors ---------------------------------------------------------------------------------

def test_task_vector_negation_reverses_addition_exactly():
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 32), "b": torch.randn(32), "n": torch.tensor(3)}
    ft = {"w": base["w"] + 0.02 * torch.randn(64, 32), "b": base["b"] * 1.5, "n": torch.tensor(9)}
    tv = TaskVector.from_models(base, ft)
    learned = tv.apply_to(base)
    assert torch.equal(learned["w"], ft["w"]) and torch.equal(learned["b"], ft["b"])
    forgotten = (-tv).apply_to(learned)
    assert all(torch.equal(forgotten[k], base[k]) for k in ("w", "b"))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in (tv + (-tv)).deltas.values())
    two = (0.5 * tv + tv * 0.5).apply_to(base)
    assert torch.allclose(two["w"], ft["w"])


# --- validation ---------------------------------------------------------------------------------

def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(4)},
     "model 2 (b.safetensors) tensor 'fc.weight' has shape (3, 4) but the base (base.safetensors) has (4, 4)"),
    ({"fc.weight": torch.zeros(4, 4)},
     "model 2 (b.safetensors) has no tensor 'fc.bias' but the base (base.safetensors) has"),
    ({"fc.weight": torch.zeros(4, 4, dtype=torch.float16), "fc.bias": torch.zeros(4)},
     "model 2 (b.safetensors) tensor 'fc.weight' is float16 but the base (base.safetensors) is float32"),
    ({"fc.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4), "extra": torch.zeros(1)},
     "model 2 (b.safetensors) has a tensor 'extra' that the base (base.safetensors) lacks"),
])
def test_mismatched_checkpoint_is_one_line_and_writes_nothing(tmp_path, bad, message):
    good = {"fc.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4)}
    base = _write(tmp_path / "base.safetensors", good)
    a = _write(tmp_path / "a.safetensors", good)
    b = _write(tmp_path / "b.safetensors", bad)
    with pytest.raises(PolytaskError) as err:
        merge_files("ties", base, [a, b], tmp_path / "out.safetensors")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "base.safetensors"]


# --- streaming -----------------------------------------------------------------------------------

def _checkpoints(n: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(0)
    base = {"enc.weight": torch.randn(33, 17, generator=g), "enc.bias": torch.randn(17, generator=g),
            "norm.weight": torch.randn(17, generator=g).half(), "bn.num_batches_tracked": torch.tensor(5)}
    fts = [{k: (v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v + i
            for k, v in base.items()} for i in range(n)]
    return base, fts


@pytest.mark.parametrize("method, options", [
    ("average", {}), ("task-arithmetic", {"lam": 0.4}), ("ties", {"density": 0.3}), ("dare", {"density": 0.5, "seed": 7}),
    ("dare", {"density": 0.7, "ties": True}), ("breadcrumbs", {"density": 0.4, "beta": 0.1}), ("fisher", {}),
    ("ties", {"density": 0.3, "trim": "tensor", "merge_func": "sum"}), ("dare", {"density": [0.5, 0.6, 0.7], "matrices_only": True}),
])
def test_streaming_merge_equals_in_memory_bit_for_bit(tmp_path, method, options):
    base, fts = _checkpoints()
    paths = [_write(tmp_path / f"m{i}.safetensors", ft) for i, ft in enumerate(fts)]
    if method == "fisher":
        fishers = [{k: v.float().abs() for k, v in ft.items() if v.is_floating_point()} for ft in fts]
        options = {"fishers": [str(_write(tmp_path / f"f{i}.safetensors", f)) for i, f in enumerate(fishers)]}
        memory = MERGERS.create(method, fishers=fishers).merge(base, fts)
    else:
        memory = MERGERS.create(method, **options).merge(dict(reversed(base.items())), fts)  # key order must not matter
    summary = merge_files(method, _write(tmp_path / "base.safetensors", base), paths, tmp_path / "out.safetensors", **options)
    streamed = load_file(str(tmp_path / "out.safetensors"))
    assert summary["tensors"] == 4 and streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[k], memory[k]) and streamed[k].dtype == base[k].dtype for k in base)
    assert torch.equal(streamed["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


def test_sharded_hf_folder_and_run_directory_inputs(tmp_path):
    base, fts = _checkpoints(2)
    hf = tmp_path / "hf"
    hf.mkdir()
    keys = list(fts[0])
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, ks in shards.items():
        _write(hf / name, {k: fts[0][k] for k in ks})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "model.safetensors", fts[1])
    (run / "config.yaml").write_text("suite: x\n")
    merged = MERGERS.create("task-arithmetic").merge(base, [hf, run])
    assert all(torch.equal(merged[k], MERGERS.create("task-arithmetic").merge(base, fts)[k]) for k in base)
    with pytest.raises(PolytaskError, match="does not exist"):
        MERGERS.create("average").merge(base, [tmp_path / "nope.safetensors"])


# --- learned mergers -------------------------------------------------------------------------------

def _toy_tasks(n_tasks: int, dim: int = 6, per_task: int = 64, seed: int = 0):
    """Task t: inputs around its own centre; labels = which of 3 random directions scores highest."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(n_tasks, dim, generator=g)
    teachers = torch.randn(n_tasks, 3, dim, generator=g)
    xs = [centres[t] + torch.randn(per_task, dim, generator=g) for t in range(n_tasks)]
    ys = [(xs[t] - centres[t]).matmul(teachers[t].T).argmax(1) for t in range(n_tasks)]
    return xs, ys, teachers, centres


def _expert(base: dict, teacher: torch.Tensor, centre: torch.Tensor, scale: float) -> dict:
    """An ideal "fine-tuned" linear classifier for one task."""
    return {"weight": base["weight"] + scale * teacher, "bias": base["bias"] - scale * teacher @ centre}


def test_adamerging_lowers_entropy_and_moves_coefficients():
    xs, _, teachers, centres = _toy_tasks(2)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [_expert(base, teachers[t], centres[t], 1.0) for t in range(2)]

    def mean_entropy(sd):
        return sum(float(-(F.softmax(F.linear(x, sd["weight"], sd["bias"]), -1)
                           * F.log_softmax(F.linear(x, sd["weight"], sd["bias"]), -1)).sum(-1).mean()) for x in xs)

    merger = MERGERS.create("adamerging", steps=60, lr=0.05)
    merged = merger.merge(base, fts, MergeData(model=model, batches=[[x] for x in xs]))
    init = MERGERS.create("task-arithmetic", lam=0.3).merge(base, fts)
    assert mean_entropy(merged) < mean_entropy(init) - 0.05
    assert merger.coefficients.shape == (2, 2) and not torch.allclose(merger.coefficients, torch.tensor(0.3))
    again = MERGERS.create("adamerging", steps=60, lr=0.05).merge(base, fts, MergeData(model=model, batches=[[x] for x in xs]))
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    task_wise = MERGERS.create("adamerging", granularity="task", steps=5, lr=0.05)
    task_wise.merge(base, fts, MergeData(model=model, batches=[[x] for x in xs]))
    assert task_wise.coefficients.shape == (2, 1)


def test_atlas_learns_block_coefficients_that_beat_its_init():
    xs, ys, teachers, centres = _toy_tasks(2)
    torch.manual_seed(1)
    model = nn.Linear(6, 3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    useful = _expert(base, teachers[0], centres[0], 1.0)
    noise = {k: v + torch.randn_like(v) for k, v in base.items()}

    def accuracy(sd):
        return float((F.linear(xs[0], sd["weight"], sd["bias"]).argmax(1) == ys[0]).float().mean())

    merger = MERGERS.create("atlas", steps=80, lr=0.05)
    merged = merger.merge(base, [useful, noise], MergeData(model=model, batches=[[(xs[0][:32], ys[0][:32])]]))
    assert merger.coefficients.shape == (2, 2)  # per task vector, per block (weight, bias)
    assert accuracy(merged) > accuracy(base) + 0.3
    assert (merger.coefficients[0] > 0.2).all()


def test_twin_merging_routes_each_task_to_its_expert():
    xs, _, teachers, centres = _toy_tasks(3, per_task=80, seed=2)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [_expert(base, teachers[t], centres[t], 1.0) for t in range(3)]
    merged = MERGERS.create("twin-merging", shared="task-arithmetic", rank=3, steps=150, lr=0.05).merge(
        base, fts, MergeData(model=model, batches=[[x[:16]] for x in xs]))
    for t in range(3):
        routed = merged.route(xs[t][16:]).argmax(1)
        assert float((routed == t).float().mean()) > 0.9
    one_hot = merged.params_for(torch.eye(3)[1])  # full rank (3 = min(3, 6)): exactly expert 1 back
    assert all(torch.allclose(one_hot[k], fts[1][k], atol=1e-5) for k in fts[1])
    assert merged(xs[0][:5]).shape == (5, 3)


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_merge_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from polytask.cli import app

    base, fts = _checkpoints()
    paths = [str(_write(tmp_path / f"m{i}.safetensors", ft)) for i, ft in enumerate(fts)]
    b = str(_write(tmp_path / "base.safetensors", base))
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(app, ["merge", "--base", b, "--method", "ties", "--option", "density=0.3", "--option",
                                      "lam=0.8", "--out", str(out), *paths])
    assert result.exit_code == 0, result.output
    assert "merged 3 models with ties: 4 tensors" in result.output
    expect = MERGERS.create("ties", density=0.3, lam=0.8).merge(base, fts)
    got = load_file(str(out))
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    bad = CliRunner().invoke(app, ["merge", "--base", b, "--method", "ties", "--option", "k=20",
                                   "--out", str(tmp_path / "x.safetensors"), *paths])
    assert isinstance(bad.exception, PolytaskError) and "its options are: density, lam" in str(bad.exception)
    learned = CliRunner().invoke(app, ["merge", "--base", b, "--method", "adamerging", "--out",
                                       str(tmp_path / "y.safetensors"), *paths])
    assert isinstance(learned.exception, PolytaskError) and "learns from data" in str(learned.exception)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_selection_threshold_equals_kthvalue_and_leaves_a_permutation():
    from polytask.merging._sparse import kth_smallest_inplace

    g = torch.Generator().manual_seed(0)
    mags = torch.randn(1 << 16, generator=g).abs()
    mags[::9] = 0.0
    ks = [1, 1000, 1 << 15, (1 << 16) - 3, 1 << 16]
    work = mags.clone()
    assert kth_smallest_inplace(work, ks) == [float(mags.kthvalue(k).values) for k in ks]
    assert torch.equal(work.sort().values, mags.sort().values)


# --- the blocked fast path == the straightforward definitions, bit for bit -----------------------

def _reference_merge(method: str, options: dict, base: dict, fts: list[dict]) -> dict:
    """Whole-tensor TIES/DARE/Breadcrumbs as written in the papers: kthvalue thresholds, bool masks, a
    Bernoulli draw of the full tensor, sign election and disjoint mean summed from zeros."""
    from polytask.merging.dare import keep_mask, philox_key

    def trim(d, drop_bottom, drop_top):
        n = d.numel()
        if drop_bottom + drop_top >= n:
            return d.zero_()
        mag, mask = d.abs().view(-1), torch.ones(n, dtype=torch.bool)
        if drop_bottom:
            mask &= mag >= mag.kthvalue(drop_bottom + 1).values
        if drop_top:
            mask &= mag <= mag.kthvalue(n - drop_top).values
        return d.mul_(mask.view_as(d))

    thresholds = []  # TIES' default: one threshold per whole task vector (kthvalue over all its entries)
    if method == "ties" and options.get("trim", "global") == "global":
        for ft in fts:
            flat = torch.cat([(ft[k] - base[k]).reshape(-1) for k in base]).abs()
            keep = round(options["density"] * flat.numel())
            thresholds.append(None if keep == 0 else flat.kthvalue(flat.numel() - keep + 1).values)
    out = {}
    for key, b in base.items():
        deltas = [ft[key] - b for ft in fts]
        n = b.numel()
        if thresholds:
            deltas = [d.zero_() if t is None else d.mul_(d.abs() >= t) for d, t in zip(deltas, thresholds)]
        elif method == "ties":
            deltas = [trim(d, n - round(options["density"] * n), 0) for d in deltas]
        elif method == "breadcrumbs":
            deltas = [trim(d, round((1 - options["density"] - options["beta"]) * n), round(options["beta"] * n))
                      for d in deltas]
        else:
            p = 1 - options["density"]
            masks = [torch.from_numpy(keep_mask(philox_key(options["seed"], key, i), 0, n, p)).view(b.shape)
                     for i in range(len(deltas))]  # the whole tensor's mask in one draw
            deltas = [d.mul_(m).div_(1.0 - p) for d, m in zip(deltas, masks)]
        if method == "ties" or options.get("ties"):
            elected = torch.zeros_like(b)
            for d in deltas:
                elected += d
            elected = elected.sign_()
            total, count = torch.zeros_like(b), torch.zeros_like(b)
            for d in deltas:
                agree = (d * elected) > 0
                if options.get("merge_func") == "max":
                    total = torch.maximum(total, d.abs() * agree)
                else:
                    total += d * agree
                count += agree
            if options.get("merge_func") == "max":
                combined = total * elected
            elif options.get("merge_func") == "sum":
                combined = total
            else:
                combined = total.div_(count.clamp_(min=1.0))
        else:
            combined = deltas[0].clone()
            for d in deltas[1:]:
                combined += d
        out[key] = combined.mul_(options["lam"]).add_(b)
    return out


@pytest.mark.parametrize("method, options", [
    ("ties", {"density": 0.2, "lam": 1.0}), ("ties", {"density": 0.37, "lam": 0.7}), ("ties", {"density": 0.0, "lam": 1.0}),
    ("ties", {"density": 1.0, "lam": 1.0}), ("ties", {"density": 0.37, "lam": 0.7, "trim": "tensor"}),
    ("ties", {"density": 0.2, "lam": 1.0, "trim": "tensor", "merge_func": "sum"}),
    ("ties", {"density": 0.3, "lam": 1.0, "merge_func": "max"}), ("ties", {"density": 0.3, "lam": 0.5, "merge_func": "sum"}),
    ("breadcrumbs", {"density": 0.37, "beta": 0.03, "lam": 0.3}),
    ("breadcrumbs", {"density": 0.5, "beta": 0.0, "lam": 1.0}), ("breadcrumbs", {"density": 0.8, "beta": 0.2, "lam": 1.0}),
    ("dare", {"density": 0.1, "seed": 3, "lam": 0.3}), ("dare", {"density": 0.3, "seed": 0, "lam": 1.0, "ties": True}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_merge_equals_reference_definition_bit_for_bit(monkeypatch, method, options, dtype):
    import polytask.merging._sparse as sparse

    monkeypatch.setattr(sparse, "BLOCK", 1000)  # several blocks per tensor, plus a ragged last one
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(53, 61, generator=g, dtype=dtype), "b": torch.randn(7, generator=g, dtype=dtype),
            "c": torch.zeros(0, dtype=dtype)}
    base["a"][0, :5] = -0.0
    fts = []
    for i in range(4):
        ft = {k: v + torch.randn(v.shape, generator=g, dtype=dtype).mul(0.1).round(decimals=2) for k, v in base.items()}
        ft["a"][0, :5] = -0.0 if i % 2 else 0.0  # zero deltas, signed zeros in the base
        ft["a"][1] = base["a"][1] + (0.5 if i % 2 else -0.5)  # exact magnitude ties across the threshold
        fts.append(ft)
    expect = _reference_merge(method, options, base, fts)
    got = MERGERS.create(method, **options).merge(base, fts)
    for k in base:
        assert torch.equal(got[k], expect[k]) and torch.equal(got[k].signbit(), expect[k].signbit()), k
