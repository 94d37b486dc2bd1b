"""TAME: Task-Agnostic continual learning using Multiple Experts (Zhu, Majzoubi, Jain &
Choromanska, CVPR Workshops 2024; arXiv 2210.03869).

Our reading of the method, as implemented here:

* **Experts.** A pool of task-expert networks (each a full copy of the run's architecture,
  independently initialised); one is active during training and receives every update.
* **Shift detection.** The paper's observation: when a new task starts, the training loss of
  the active expert deviates significantly from its recent values. We keep a window of the
  last ``window`` batch losses; a batch whose loss ℓ satisfies
      ℓ > mean + k · std   and   ℓ − mean > ``min_jump``
  marks a shift (the k·std test is the statistical deviation; ``min_jump`` is our guard
  against false alarms once the loss has converged and its std is tiny). The window must be
  full again before the next test, so two shifts are at least ``window`` steps apart and an
  experience shorter than ``window`` steps cannot be told apart from the next one.
* **Switch or grow.** On a shift every used expert is evaluated on the batch; if the best one
  has a loss within ``min_jump`` of the level it had when it was last left, the data is a
  task it knows and it becomes active again; otherwise the next fresh expert is activated
  (when all ``max_experts`` are in use, the best existing one is reused). The batch that
  revealed the shift is not used to update the expert being left.
* **Selector.** A reservoir memory (``memory`` samples drawn uniformly from the stream)
  stores inputs with the id of the expert active when they arrived. Before every evaluation a
  selector network (an MLP on the flattened input) is trained on it for ``selector_steps``
  steps; at test time it routes each sample to one expert.
* **Pruning.** When an expert is left it is magnitude-pruned: the ``prune`` fraction of
  smallest weights of each of its layers is masked to zero (``torch.nn.utils.prune``), keeping
  its footprint small; a revisited expert trains on with its mask. The selector is not
  pruned (it is small).

Boundary information is never used: the strategy also runs on task-free streams.

No reference code found; looked in: code search "TAME task agnostic continual learning multiple
experts loss shift detection selector pruning" (an unrelated 2025 method of the same acronym,
"Task-Aware Multi-Expert", and unattributed loss-shift MoE projects), find_repos "TAME", and the
paper pages (Papers with Code lists "no code implementations"). Deviations: the detection rule's
k·std / ``min_jump`` test, the revisit rule, the window and the selector MLP are our reading of
the abstract and summaries, unverified against the authors' code.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from polytask.continual.base import Strategy, batch_loss
from polytask.continual._buffer import ReservoirBuffer
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, Inputs
from polytask.trainer import Trainer


def _prunable(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class ExpertPool(nn.Module):
    """``max_experts`` expert networks and a selector; training uses the active expert,
    evaluation routes every sample to the expert the selector picks among the used ones."""

    def __init__(self, make_expert: Callable[[], nn.Module], in_dim: int, max_experts: int, hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(make_expert() for _ in range(max_experts))
        for expert in self.experts:
            for m in _prunable(expert):
                prune.identity(m, "weight")  # a weight_mask of ones: same state-dict keys before and after pruning
        self.selector = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, max_experts))
        self.active = 0
        self.used = 1

    @staticmethod
    def flat(x: Inputs) -> Tensor:
        if isinstance(x, dict):
            raise PolytaskError("tame routes flat inputs (dense, features or image); dict inputs have no selector input")
        return x.reshape(len(x), -1).float()

    def route(self, x: Inputs) -> Tensor:
        logits = self.selector(self.flat(x))[:, :self.used]
        return logits.argmax(-1)

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        if self.training or self.used == 1:
            return self.experts[self.active if self.training else 0](x)
        choice = self.route(x)
        outs = [self.experts[e](x) for e in range(self.used)]
        rows = torch.arange(len(choice))
        return {name: torch.stack([o[name] for o in outs])[choice, rows] for name in outs[0]}


@STRATEGIES.register("tame")
class TAME(Strategy):
    """TAME: loss-jump task-shift detection, expert growth/switching, a replay-trained selector, pruning (Zhu et al. 2024)."""

    def __init__(self, *, max_experts: int = 8, window: int = 10, k: float = 3.0, min_jump: float = 0.5,
                 memory: int = 500, selector_hidden: int = 100, selector_steps: int = 200, selector_lr: float = 1e-3,
                 prune: float = 0.5) -> None:
        super().__init__()
        if max_experts < 1 or window < 2 or memory < 1 or not 0.0 <= prune < 1.0:
            raise PolytaskError("tame needs max_experts >= 1, window >= 2, memory >= 1 and 0 <= prune < 1")
        self.max_experts, self.window, self.k, self.min_jump = int(max_experts), int(window), float(k), float(min_jump)
        self.memory, self.hidden, self.selector_steps, self.selector_lr = int(memory), int(selector_hidden), int(selector_steps), float(selector_lr)
        self.prune_amount = float(prune)
        self.losses: list[float] = []
        self.levels: dict[int, float] = {}
        self.shifts: list[dict[str, Any]] = []
        self.step = 0
        self.stale = True
        self._drop: int | None = None
        self.pool: ExpertPool | None = None
        self.buffer = ReservoirBuffer(self.memory)

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.buffer = ReservoirBuffer(self.memory, seed=seed + 32452843)

    def build_model(self, default: Callable[[], nn.Module]) -> nn.Module:
        assert self.scenario is not None
        spec = self.scenario.input_spec
        in_dim = spec.dim if spec.kind in ("dense", "features") else math.prod(spec.shape)
        if spec.kind not in ("dense", "features", "image"):
            raise PolytaskError(f"tame needs dense, feature or image inputs for its selector, not {spec.kind}")
        self.pool = ExpertPool(default, in_dim, self.max_experts, self.hidden)
        return self.pool

    # ------------------------------------------------------------- training
    def is_shift(self, loss: float) -> bool:
        """The loss-jump test on the current window."""
        if len(self.losses) < self.window:
            return False
        w = torch.tensor(self.losses[-self.window:], dtype=torch.float64)
        mean, std = float(w.mean()), float(w.std())
        return loss > mean + self.k * std and loss - mean > self.min_jump

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        assert self.pool is not None
        loss = float(batch_loss(self.pool, self.all_tasks, batch, outputs).detach())
        if self.is_shift(loss):
            self._switch(batch, loss)
        else:
            self.losses.append(loss)
            del self.losses[:-self.window]
        self.buffer.add(batch.x, {"expert": torch.full((len(batch),), self.pool.active, dtype=torch.long)})
        self.stale = True
        self.step += 1
        return None

    def _switch(self, batch: Batch, loss: float) -> None:
        pool = self.pool
        assert pool is not None
        old = pool.active
        self.levels[old] = sum(self.losses) / len(self.losses)
        with torch.no_grad():
            scores = [float(batch_loss(e, self.all_tasks, batch)) for e in pool.experts[:pool.used]]
        best = min(range(pool.used), key=scores.__getitem__)
        known = best != old and scores[best] - self.levels.get(best, math.inf) < self.min_jump
        if known or pool.used == self.max_experts:
            new, grown = best, False
        else:
            new, grown = pool.used, True
            pool.used += 1
        pool.active = new
        self._drop = old
        self.losses = []
        self.shifts.append({"step": self.step, "loss": loss, "from": old, "to": new, "new_expert": grown})

    def _prune(self, expert: nn.Module) -> None:
        if self.prune_amount <= 0:
            return
        for m in _prunable(expert):
            w = (m.weight_orig * m.weight_mask).detach().abs()
            k = int(self.prune_amount * w.numel())
            if k:
                threshold = w.reshape(-1).kthvalue(k).values
                m.weight_mask.copy_((w > threshold).to(m.weight_mask.dtype))

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        """After a shift: prune the expert just left and drop the gradient the shifted batch gave it."""
        if self._drop is not None and self.pool is not None:
            left = self.pool.experts[self._drop]
            self._prune(left)
            for p in left.parameters():
                p.grad = None
            self._drop = None

    # ------------------------------------------------------------ selector
    def before_eval(self, model: nn.Module) -> None:
        pool = self.pool
        if pool is None or pool.used == 1 or not self.stale or not len(self.buffer):
            return
        opt = torch.optim.Adam(pool.selector.parameters(), lr=self.selector_lr)
        with torch.enable_grad():
            for _ in range(self.selector_steps):
                rows = self.buffer.sample(128)
                logits = pool.selector(pool.flat(rows["x"]))[:, :pool.used]
                loss = F.cross_entropy(logits, rows["expert"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in pool.selector.parameters():
            p.grad = None
        self.stale = False

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        return self.buffer.state_tensors("buffer/")

    def state_meta(self) -> dict[str, Any]:
        assert self.pool is not None
        return {**super().state_meta(), "buffer": self.buffer.state_meta(), "losses": self.losses,
                "levels": {str(k): v for k, v in self.levels.items()}, "shifts": self.shifts, "step": self.step,
                "active": self.pool.active, "used": self.pool.used, "stale": self.stale}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        assert self.pool is not None
        self.buffer.load(tensors, meta["buffer"], "buffer/")
        self.losses, self.shifts, self.step, self.stale = list(meta["losses"]), list(meta["shifts"]), int(meta["step"]), bool(meta["stale"])
        self.levels = {int(k): float(v) for k, v in meta["levels"].items()}
        self.pool.active, self.pool.used = int(meta["active"]), int(meta["used"])
