"""Trains a small MMoE; run directly (1 process) or under torchrun (2 processes)."""

import sys

import torch
from safetensors.torch import save_file

import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
import polytask.weighting  # noqa: F401
from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.sampling import concat_task_data, steps_per_epoch
from polytask.trainer import seed_everything, _rank

torch.set_num_threads(1)
out, weighting = sys.argv[1], sys.argv[2]
options = {"mode": sys.argv[3]} if len(sys.argv) > 3 and sys.argv[3] != "-" else {}
sampling = sys.argv[4] if len(sys.argv) > 4 else "proportional"
extra = dict(kv.split("=") for kv in sys.argv[5].split(",")) if len(sys.argv) > 5 else {}  # e.g. accumulate=2
extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
suite = SUITES.create("synthetic-mmoe", num_samples=400, dim=8, seed=0)
train = suite.train
if sampling != "proportional":  # one dataset per task: each task labelled on its own copy of the inputs
    train = concat_task_data({t.name: suite.train for t in suite.tasks})
seed_everything(0)
model = ARCHITECTURES.create("mmoe", suite.tasks, suite.input_spec, num_experts=3)
cfg = TrainConfig(epochs=2, batch_size=40, progress=False, sampling=sampling, **extra)
trainer = Trainer(model, suite.tasks, weighting, cfg, weighting_options=options)
trainer.fit(train)
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
per_epoch = steps_per_epoch(train, [t.name for t in suite.tasks], 40, sampling) * 40 * len(suite.tasks) \
    if sampling == "per-task" else len(train)
assert trainer.samples_seen == 2 * per_epoch // world, trainer.samples_seen  # each rank sees its share
if _rank() == 0:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
