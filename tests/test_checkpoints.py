"""The checkpoint folder sequence and the one run-state format (safetensors + JSON, no pickle)."""

from __future__ import annotations

import torch

from polytask.checkpoints import CheckpointDir, load_state, save_state


def test_state_round_trips_an_optimizer_with_int_keys_and_tuples(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.8, 0.95))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 3, "best": None, "history": [{"loss": 0.5}],
             "rng": torch.get_rng_state()}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["epoch"] == 3 and back["best"] is None and back["history"] == [{"loss": 0.5}]
    assert torch.equal(back["rng"], state["rng"])
    again = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    again.load_state_dict(back["optimizer"])  # int parameter ids and the betas tuple survive the trip
    assert again.param_groups[0]["lr"] == 0.1 and list(again.param_groups[0]["betas"]) == [0.8, 0.95]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(again.state_dict()["state"][0][k], v)


def test_checkpoint_dir_points_latest_at_the_newest_and_prunes(tmp_path):
    ckpt = CheckpointDir(tmp_path, "epoch")
    assert ckpt.latest() is None
    for i in (1, 2):
        with ckpt.write(i) as folder:
            (folder / "x").write_text(str(i))
    assert ckpt.latest() == tmp_path / "epoch-0002" and (tmp_path / "epoch-0002" / "x").read_text() == "2"
    assert not (tmp_path / "epoch-0001").exists() and not list(tmp_path.glob(".tmp-*"))
