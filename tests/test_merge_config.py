"""mergekit-style merge configs: every key, per-model parameters, mergekit's defaults, one-line refusals."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from polytask import MERGERS, PolytaskError
from polytask.merging.mergeconfig import load_merge_config, parse_merge_config


@pytest.fixture()
def files(tmp_path):
    base = {"w": torch.zeros(2), "n": torch.tensor(3)}
    taus = ([1.0, -2.0], [3.0, 1.0], [-1.0, -4.0])
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i, t in enumerate(taus):
        paths[f"m{i}"] = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.tensor(t), "n": torch.tensor(3)}, str(paths[f"m{i}"]))
    return {k: str(v) for k, v in paths.items()}


def _merge(files, config):
    plan = parse_merge_config(config)
    return plan, plan.merger.merge(plan.base, plan.models)["w"]


def _cfg(files, method, models=(("m0", {}), ("m1", {}), ("m2", {})), **top):
    return {"merge_method": method, "base_model": files["base"],
            "models": [{"model": files["base"]}] + [{"model": files[m], "parameters": p} for m, p in models], **top}


def test_ties_with_mergekit_defaults_is_the_weighted_disjoint_mean(files):
    # density defaults to 1, normalize to true, lambda to 1; the base listed among the models is skipped
    plan, merged = _merge(files, _cfg(files, "ties", (("m0", {"weight": 1.0}), ("m1", {"weight": 0.5}), ("m2", {"weight": 1.0}))))
    assert len(plan.models) == 3 and torch.equal(merged, torch.tensor([2.5 / 1.5, -3.0]))
    _, summed = _merge(files, _cfg(files, "ties", parameters={"normalize": False, "lambda": 0.5}))
    assert torch.equal(summed, torch.tensor([2.0, -3.0]))  # 0.5 * (1 + 3), 0.5 * (-2 - 4)
    _, peak = _merge(files, _cfg(files, "ties", parameters={"merge_func": "max"}))
    assert torch.equal(peak, torch.tensor([3.0, -4.0]))


def test_per_model_density_and_trim(files):
    models = (("m0", {"density": 1.0}), ("m1", {"density": 0.5}), ("m2", {"density": 0.5}))
    _, merged = _merge(files, _cfg(files, "ties", models, parameters={"trim": "tensor"}))
    assert torch.equal(merged, torch.tensor([2.0, -3.0]))  # m1 keeps 3, m2 keeps -4
    plan = parse_merge_config(_cfg(files, "ties", models, parameters={"density": 0.3}))
    assert plan.merger.density == (1.0, 0.5, 0.5) and plan.merger.trim == "global"


def test_linear_task_arithmetic_and_their_normalize(files):
    cfg = {"merge_method": "linear", "models": [{"model": files["m0"], "parameters": {"weight": 3.0}},
                                                {"model": files["m1"], "parameters": {"weight": 1.0}}]}
    _, merged = _merge(files, cfg)
    assert torch.equal(merged, torch.tensor([1.5, -1.25]))  # (3·[1, -2] + [3, 1]) / 4
    _, raw = _merge(files, {**cfg, "parameters": {"normalize": False}})
    assert torch.equal(raw, torch.tensor([6.0, -5.0]))
    ta = _cfg(files, "task_arithmetic", (("m0", {"weight": 0.5}), ("m1", {"weight": 1.0})), parameters={"lambda": 2.0})
    assert torch.equal(_merge(files, ta)[1], torch.tensor([7.0, 0.0]))  # 2 (0.5 [1, -2] + [3, 1])
    ta["parameters"]["normalize"] = True
    assert torch.allclose(_merge(files, ta)[1], torch.tensor([7.0, 0.0]) / 1.5)


def test_dare_and_breadcrumbs_map_onto_polytask_options(files):
    dare = parse_merge_config(_cfg(files, "dare_ties", parameters={"density": 0.4, "rescale": False, "seed": 3,
                                                                    "matrices_only": True, "int8_mask": True}))
    m = dare.merger
    assert (m.density, m.sign_consensus, m.rescale, m.seed, m.matrices_only, m.merge_func, m.lam) == \
        ((0.4, 0.4, 0.4), True, False, 3, True, "sum", 1.0)
    linear = parse_merge_config(_cfg(files, "dare_linear", parameters={"normalize": True})).merger
    assert not linear.sign_consensus and linear.normalize and linear.rescale
    crumbs = parse_merge_config(_cfg(files, "breadcrumbs_ties", (("m0", {"density": 0.9, "gamma": 0.05}),
                                                                 ("m1", {"density": 0.98}), ("m2", {})))).merger
    assert crumbs.density == (0.9, 0.98, 1.0) and crumbs.beta == (0.05, 0.01, 0.0) and crumbs.sign_consensus
    assert crumbs.merge_func == "sum" and isinstance(parse_merge_config(_cfg(files, "breadcrumbs")).merger,
                                                     type(MERGERS.create("breadcrumbs")))


def test_polytask_merger_names_dtype_and_adapter_syntax(files, tmp_path):
    plan = parse_merge_config(_cfg(files, "dare", (("m0", {"weight": 2.0, "density": 0.5}), ("m1", {"weight": 1.0, "density": 0.7})),
                                   parameters={"ties": True, "lam": 0.5}, dtype="bfloat16"))
    assert plan.merger.weights == (2.0, 1.0) and plan.merger.density == (0.5, 0.7) and plan.merger.lam == 0.5
    assert plan.out_dtype == torch.bfloat16
    assert parse_merge_config(_cfg(files, "ties", dtype="float16", out_dtype="float32")).out_dtype == torch.float32
    adapter = parse_merge_config({"merge_method": "task_arithmetic", "base_model": files["base"],
                                  "models": [{"model": files["base"] + "+" + str(tmp_path / "adapter")}]})
    assert adapter.models == [str(tmp_path / "adapter")]


def test_cli_config_writes_the_merge_and_records_the_config(files, tmp_path):
    from polytask.cli import main

    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_cfg(files, "ties", parameters={"normalize": False})))
    main(["merge", "--config", str(cfg), "--out", str(tmp_path / "out.safetensors")])
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], torch.tensor([4.0, -6.0]))
    main(["merge", "--config", str(cfg), "--out", str(tmp_path / "folder")])
    record = yaml.safe_load((tmp_path / "folder" / "polytask_merge.yaml").read_text())
    assert record["method"] == "ties" and record["config"]["parameters"] == {"normalize": False}
    assert load_merge_config(cfg).method == "ties"


@pytest.mark.parametrize("change, message", [
    ({"slices": []}, "unsupported key 'slices' (slices and layer ranges are not supported"),
    ({"tokenizer": {}}, "unsupported key 'tokenizer'"),
    ({"merge_method": "slerp"}, "merge_method 'slerp' is a mergekit method polytask does not implement"),
    ({"merge_method": "frobnicate"}, "merge_method 'frobnicate' is neither"),
    ({"parameters": {"epsilon": 0.1}}, "parameters has unsupported key 'epsilon' for ties"),
    ({"parameters": {"density": [0.1, 0.5]}}, "parameters.density=[0.1, 0.5]: per-layer gradients (lists) are not supported"),
    ({"parameters": {"density": 2.0}}, "option density[0]=2.0 is outside [0, 1]"),
    ({"parameters": {"normalize": "yes"}}, "parameters.normalize='yes' must be true or false"),
    ({"parameters": {"normalize": True, "merge_func": "sum"}}, "give normalize or merge_func, not both"),
    ({"dtype": "int8"}, "dtype='int8' is not a dtype"),
    ({"tokenizer_source": "union"}, "tokenizer_source='union' is not supported"),
    ({"base_model": None}, "base_model is missing"),
    ({"merge_method": "adamerging"}, "learns from data"),
])
def test_bad_configs_are_one_line_and_exit_2(files, tmp_path, capsys, change, message):
    from polytask.cli import main

    cfg = tmp_path / "bad.yml"
    cfg.write_text(yaml.safe_dump({**_cfg(files, "ties"), **change}))
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--config", str(cfg), "--out", str(tmp_path / "out.safetensors")])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and message in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_per_model_unsupported_key_and_config_plus_models_refused(files, tmp_path):
    with pytest.raises(PolytaskError, match=r"models\[2\].parameters has unsupported key 'gamma' for ties"):
        parse_merge_config(_cfg(files, "ties", (("m0", {}), ("m1", {"gamma": 0.1}))))
    with pytest.raises(PolytaskError, match=r"models\[0\] has unsupported key 'layer_range'"):
        parse_merge_config({"merge_method": "ties", "base_model": files["base"],
                            "models": [{"model": files["m0"], "layer_range": [0, 2]}]})
    from polytask.cli import main

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_cfg(files, "ties")))
    with pytest.raises(SystemExit):
        main(["merge", "--config", str(cfg), "--base", files["base"], "--out", str(tmp_path / "o.safetensors")])
