"""Hugging Face folders in and out: tiny Llama models saved sharded with save_pretrained, peft LoRA adapters
folded into task vectors, folder outputs that from_pretrained loads, atomic writes, bad inputs in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polytask import MERGERS, PolytaskError
from polytask.merging import merge_files

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _config(hidden: int = 32):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


def _save(model, folder, shard="20KB"):
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    return folder


def _perturbed(base, seed: int, dtype=torch.float32):
    model = transformers.LlamaForCausalLM(base.config)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    model.load_state_dict(state)
    return model.to(dtype)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config())
    out = {"base": _save(base, root / "base"), "ft1": _save(_perturbed(base, 1), root / "ft1"),
           "ft2": _save(_perturbed(base, 2), root / "ft2")}
    out["base16"] = _save(base.to(torch.bfloat16), root / "base16")
    out["ft16"] = _save(_perturbed(base.float(), 3, torch.bfloat16), root / "ft16")
    base.float()
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(out["base"]),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    lora.save_pretrained(root / "adapter")
    out["adapter"] = root / "adapter"
    out["dense"] = {k: v.detach().clone() for k, v in lora.merge_and_unload().state_dict().items()}
    out["other"] = _save(transformers.LlamaForCausalLM(_config(hidden=48)), root / "other")
    return out


def _forward(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model(torch.tensor([[1, 2, 3, 4]])).logits


def _folder_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_folder_output_loads_with_from_pretrained_and_matches_in_memory(zoo, tmp_path):
    out = tmp_path / "merged"
    merge_files("ties", zoo["base"], [zoo["ft1"], zoo["ft2"]], out, density=0.3)
    base_files = sorted(p.name for p in zoo["base"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(base_files + ["polytask_merge.yaml"])
    index, base_index = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, zoo["base"]))
    assert index["weight_map"] == base_index["weight_map"]  # sharded like the base
    memory = MERGERS.create("ties", density=0.3).merge(zoo["base"], [zoo["ft1"], zoo["ft2"]])
    written = _folder_tensors(out)
    assert written.keys() == memory.keys() and all(torch.equal(written[k], memory[k]) for k in memory)
    assert _forward(out).shape == (1, 4, 100)
    record = yaml.safe_load((out / "polytask_merge.yaml").read_text())
    assert record["method"] == "ties" and record["options"] == {"density": 0.3} and record["polytask_version"]
    shard = "model-00001-of-00007.safetensors"
    digest = hashlib.sha256((zoo["ft1"] / shard).read_bytes()).hexdigest()
    assert record["inputs"][1] == {"path": str(zoo["ft1"]), "sha256": {**record["inputs"][1]["sha256"], shard: digest}}
    assert len(record["inputs"]) == 3 and len(record["inputs"][0]["sha256"]) == 8  # index + 7 shards


def test_bf16_is_kept_and_max_shard_size_reshards(zoo, tmp_path):
    out = tmp_path / "m16"
    merge_files("dare", zoo["base16"], [zoo["ft16"]], out, density=0.5, max_shard_size="30KB")
    written = _folder_tensors(out)
    memory = MERGERS.create("dare", density=0.5).merge(zoo["base16"], [zoo["ft16"]])
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], memory[k]) for k in memory)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in written.values())
    assert _forward(out).dtype == torch.bfloat16
    merge_files("task-arithmetic", zoo["base16"], [zoo["ft16"]], tmp_path / "f32", out_dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in _folder_tensors(tmp_path / "f32").values())


def test_merging_a_folder_with_itself_gives_back_the_base(zoo, tmp_path):
    merge_files("ties", zoo["base"], [zoo["base"], zoo["base"]], tmp_path / "same")
    base, same = _folder_tensors(zoo["base"]), _folder_tensors(tmp_path / "same")
    assert all(torch.equal(same[k], base[k]) for k in base)


def test_lora_adapter_folder_is_its_folded_task_vector(zoo):
    from polytask.merging.hf import fold_lora

    merged = MERGERS.create("task-arithmetic", lam=1.0).merge(zoo["base"], [zoo["adapter"]])
    dense = zoo["dense"]
    assert merged.keys() == dense.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dense[q], _folder_tensors(zoo["base"])[q])  # the adapter changes it
    assert all(torch.allclose(merged[k], dense[k], atol=1e-6, rtol=0) for k in dense)
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    assert torch.allclose(fold_lora(a, b, 2.0), 2.0 * b @ a) and fold_lora(a, b, 1.0, transpose=True).shape == (6, 5)


def test_raw_lora_factor_files_are_refused(zoo, tmp_path):
    with pytest.raises(PolytaskError) as err:
        MERGERS.create("ties").merge(zoo["base"], [zoo["adapter"] / "adapter_model.safetensors"])
    assert "pass the adapter folder" in str(err.value) and "\n" not in str(err.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(zoo["adapter"] / "adapter_model.safetensors", bare)
    with pytest.raises(PolytaskError, match="no adapter_config.json"):
        MERGERS.create("ties").merge(zoo["base"], [bare])


def _broken(zoo, tmp_path, kind):
    bad = tmp_path / kind
    shutil.copytree(zoo["ft1"], bad)
    shard = bad / "model-00003-of-00007.safetensors"
    if kind == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    return bad


@pytest.mark.parametrize("kind, message", [
    ("other", "tensor 'model.embed_tokens.weight' has shape (100, 48) but the base (base) has (100, 32)"),
    ("missing", "names shard 'model-00003-of-00007.safetensors', which is missing"),
    ("corrupt", "is not a readable safetensors file"),
    ("ft16", "tensor 'model.embed_tokens.weight' is bfloat16 but the base (base) is float32"),
])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(zoo, tmp_path, capsys, kind, message):
    from polytask.cli import main

    model = zoo[kind] if kind in zoo else _broken(zoo, tmp_path, kind)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--base", str(zoo["base"]), "--method", "ties", "--out", str(tmp_path / "out"), str(model)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in " ".join(err.split()) and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


def test_cli_out_without_suffix_is_a_folder_and_an_existing_folder_needs_overwrite(zoo, tmp_path, capsys):
    from polytask.cli import main

    args = ["merge", "--base", str(zoo["base"]), "--method", "task-arithmetic", str(zoo["ft1"])]
    main(args + ["--out", str(tmp_path / "merged_dir")])
    assert (tmp_path / "merged_dir" / "config.json").is_file()
    main(args + ["--out", str(tmp_path / "one.safetensors")])
    assert (tmp_path / "one.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "merged_dir")])
    assert "--overwrite" in capsys.readouterr().err
    main(args + ["--out", str(tmp_path / "merged_dir"), "--overwrite"])


KILLER = """
import os, signal, sys
import polytask.io as io
from polytask.merging import merge_files
write = io.SafetensorsWriter.write
count = [0]
def dying(self, name, tensor):
    count[0] += 1
    if count[0] == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, name, tensor)
io.SafetensorsWriter.write = dying
merge_files("ties", sys.argv[1], [sys.argv[2]], sys.argv[3])
"""


def test_sigkill_mid_merge_leaves_no_output_folder(zoo, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last = len(_folder_tensors(zoo["base"]))  # killed at the last tensor: every other shard is written
    run = subprocess.run([sys.executable, "-c", KILLER, str(zoo["base"]), str(zoo["ft1"]), str(out), str(last)],
                         env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert not out.exists()
    merge_files("ties", zoo["base"], [zoo["ft1"]], out)  # a later merge clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
