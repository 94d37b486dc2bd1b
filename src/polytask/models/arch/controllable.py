"""Controllable multi-task architecture (Aich, Schulter, Roy-Chowdhury, Chandraker & Suh, ICCV 2023,
"Efficient Controllable Multi-Task Architectures").

One SuperNet: a shared encoder and one decoder per task, all slimmable (every hidden layer of d
units runs on its first ``ceil(m·d)`` units, Slimmable Networks, Yu et al., ICLR 2019; see
``_slimmable.py``). A width configuration c = (m_enc, m_1..m_T) picks a SubNet. The encoder's
output layer keeps its ``rep_dim`` units at every width, so representations of different
configurations live in one space.

Training (each step, train mode): the full-width network makes the outputs the Trainer's task
losses see; ``num_sampled`` SubNets, drawn by the sandwich rule (the smallest configuration plus
random ones, Yu & Huang, ICCV 2019), are trained through ``self.aux_loss``::

    aux = mean_c [ λ_ci · mean ||z_c - sg(z_full)||²            (CI-KD: configuration-invariant encoder features)
                   + λ_kd · sum_t D_t(y_t^c, sg(y_t^full)) ]     (in-place output distillation)

with D_t the KL divergence for classification outputs (softmax / per-label Bernoulli) and the
squared error for regression; sg = stop-gradient (detached teacher). The Trainer adds the aux loss.
λ_ci defaults to 0.01: the squared distance of raw representations is large next to the task
losses, and with λ_ci = 1 the full network lost 10 points of digit accuracy on digits-multi
(``benchmarks/controllable.py``); the paper's weighting is not reproduced.

Control (eval mode): ``configure(importances, budget)`` picks a configuration for task importances
p (normalised to sum 1) and a budget (fraction of the full SuperNet's FLOPs), searching the width
grid (exhaustively, or greedily by utility gain per FLOP when the grid is large) for::

    max_c  U(c) = sum_t p_t Q_t(m_enc, m_t)   s.t.  flops(c) <= budget · flops(full),
                                                    p_a > p_b  =>  m_a >= m_b

The second constraint is the paper's key rule (a more preferred task gets the larger decoder);
the encoder width is searched jointly. ``Q_t`` is measured by :meth:`calibrate` on held-out data
(``Q_t = L_t(full) / L_t(m_enc, m_t)``, task t's loss ratio); before calibration it is a compute
proxy, the share of task t's full path (encoder + its decoder) a configuration keeps.

How this differs from the paper: the paper uses no hypernetwork/controller (that is Raychaudhuri et
al., CVPR 2022); it searches the trained SuperNet with the rule above, but its exact scoring of
encoder candidates is not reproduced here: the utility U is ours. The paper trains SubNets with
the task losses as well as CI-KD; here labels reach only the full-width network (the forward sees
no labels), and SubNets learn their outputs by in-place distillation from it (as in Universally
Slimmable Networks). FLOPs count the multiply-adds of the slimmable encoder and decoders' weight
matrices per sample; the backbone is fixed and not counted (the identity for dense inputs).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._slimmable import SlimmableMLP
from polytask.models.backbones import Backbone
from polytask.models.arch.base import Architecture
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, MultiTaskData, Task

Config = dict[str, Any]
EXHAUSTIVE_LIMIT = 100_000


def output_distillation(task: Task, student: Tensor, teacher: Tensor) -> Tensor:
    """D_t(student, teacher): KL(teacher || student) for classification, squared error for regression."""
    return task.kind_impl.output_kl(student, teacher)


@ARCHITECTURES.register("controllable")
class Controllable(Architecture):
    """Controllable MTL: slimmable encoder and decoders, widths chosen from task importances and a FLOPs budget (Aich et al. 2023)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, encoder: Sequence[int] = (64, 64),
                 rep_dim: int = 64, decoder: Sequence[int] = (32,),
                 widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), num_sampled: int = 2,
                 distill_weight: float = 1.0, cikd_weight: float = 0.01) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if not encoder or not decoder:
            raise PolytaskError("controllable needs at least one hidden layer in the encoder and in each decoder; "
                                "pass e.g. encoder=[64, 64] decoder=[32]")
        grid = sorted({float(w) for w in widths})
        if not grid or grid[0] <= 0 or grid[-1] != 1.0:
            raise PolytaskError(f"controllable widths must lie in (0, 1] and include 1.0; got {list(widths)}")
        if num_sampled < 0:
            raise PolytaskError(f"controllable num_sampled must be >= 0 (SubNets per step), not {num_sampled}")
        self.widths = tuple(grid)
        self.encoder = SlimmableMLP(self.backbone.out_dim, encoder, rep_dim, final_activation=True)
        self.heads = nn.ModuleDict({t.name: SlimmableMLP(rep_dim, decoder, t.out_dim) for t in self.tasks})
        for name, head in self.heads.items():
            self.mark_task_specific(name, head)
        self.num_sampled, self.distill_weight, self.cikd_weight = num_sampled, distill_weight, cikd_weight
        enc, full = self._costs()
        self.register_buffer("quality", torch.tensor(
            [[[(enc[e] + dec[d]) / (enc[-1] + dec[-1]) for d in range(len(grid))] for e in range(len(grid))]
             for dec in full]))
        self.active: Config = self.full_config()

    # ------------------------------------------------------------------ configurations
    def full_config(self) -> Config:
        return {"encoder": 1.0, "decoders": {t: 1.0 for t in self.task_names}}

    def _check(self, config: Mapping[str, Any]) -> Config:
        try:
            enc, decs = float(config["encoder"]), {t: float(config["decoders"][t]) for t in self.task_names}
        except (KeyError, TypeError) as err:
            raise PolytaskError(f"a width configuration is {{'encoder': m, 'decoders': {{task: m}}}} covering every task "
                                f"({', '.join(self.task_names)}); missing {err}") from None
        bad = [w for w in [enc, *decs.values()] if not 0 < w <= 1]
        if bad:
            raise PolytaskError(f"width multipliers must lie in (0, 1]; got {bad[0]}")
        return {"encoder": enc, "decoders": decs}

    def set_config(self, config: Mapping[str, Any]) -> None:
        """Run eval-mode forwards at ``config`` (``{'encoder': m, 'decoders': {task: m}}``)."""
        self.active = self._check(config)

    def flops(self, config: Mapping[str, Any] | None = None) -> int:
        """Multiply-adds per sample of the encoder and decoders at ``config`` (default: the active one)."""
        cfg = self.active if config is None else self._check(config)
        return self.encoder.macs(cfg["encoder"]) + sum(h.macs(cfg["decoders"][t]) for t, h in self.heads.items())

    def _costs(self) -> tuple[list[int], list[list[int]]]:
        """FLOPs of the encoder and of each decoder at every grid width."""
        return ([self.encoder.macs(w) for w in self.widths],
                [[self.heads[t].macs(w) for w in self.widths] for t in self.task_names])

    def _importances(self, importances: Mapping[str, float]) -> list[float]:
        unknown = [k for k in importances if k not in self.task_names]
        if unknown:
            raise PolytaskError(f"no task {unknown[0]!r} to give an importance; the tasks are: {', '.join(self.task_names)}")
        p = [float(importances.get(t, 0.0)) for t in self.task_names]
        if any(v < 0 or not math.isfinite(v) for v in p) or sum(p) <= 0:
            raise PolytaskError(f"importances must be non-negative with a positive sum; got {dict(importances)}")
        return [v / sum(p) for v in p]

    def configure(self, importances: Mapping[str, float], budget: float, search: str = "auto") -> dict[str, Any]:
        """Pick and activate the widths maximising the importance-weighted utility within ``budget``.

        ``importances``: {task: weight >= 0} (missing tasks weigh 0); ``budget``: fraction of the
        full network's FLOPs; ``search``: ``exhaustive``, ``greedy`` or ``auto``. Returns the widths,
        their FLOPs, the full FLOPs, the fraction and the utility.
        """
        if search not in ("auto", "exhaustive", "greedy"):
            raise PolytaskError(f"unknown search {search!r}; choose one of: auto, exhaustive, greedy")
        if not 0 < budget <= 1:
            raise PolytaskError(f"budget is a fraction of the full network's FLOPs in (0, 1]; got {budget}")
        p = self._importances(importances)
        enc, dec = self._costs()
        n_t, n_w = len(p), len(self.widths)
        full = enc[-1] + sum(d[-1] for d in dec)
        smallest = enc[0] + sum(d[0] for d in dec)
        if smallest > budget * full + 1e-9:
            least = smallest / full
            raise PolytaskError(f"budget {budget} is below the smallest width configuration ({least:.3f} of the full "
                                f"FLOPs); pass a budget of at least {math.ceil(least * 1000) / 1000}")
        q = self.quality.tolist()
        above = [[b for b in range(n_t) if p[b] > p[a]] for a in range(n_t)]

        def cost(idx: Sequence[int]) -> int:
            return enc[idx[0]] + sum(dec[t][idx[1 + t]] for t in range(n_t))

        def utility(idx: Sequence[int]) -> float:
            return sum(p[t] * q[t][idx[0]][idx[1 + t]] for t in range(n_t))

        def allowed(idx: Sequence[int]) -> bool:
            return cost(idx) <= budget * full + 1e-9 and all(idx[1 + a] <= idx[1 + b] for a in range(n_t) for b in above[a])

        if search == "exhaustive" or (search == "auto" and n_w ** (n_t + 1) <= EXHAUSTIVE_LIMIT):
            best = min((i for i in itertools.product(range(n_w), repeat=n_t + 1) if allowed(i)),
                       key=lambda i: (-utility(i), cost(i)))
        else:
            best = self._greedy(n_t, n_w, cost, utility, allowed)
        self.active = {"encoder": self.widths[best[0]],
                       "decoders": {t: self.widths[best[1 + k]] for k, t in enumerate(self.task_names)}}
        return {**self.active, "flops": cost(best), "full_flops": full, "fraction": cost(best) / full,
                "utility": utility(best)}

    @staticmethod
    def _greedy(n_t: int, n_w: int, cost: Any, utility: Any, allowed: Any) -> tuple[int, ...]:
        """From the smallest configuration, take the one-step widening with the best utility gain per FLOP."""
        idx = (0,) * (n_t + 1)
        while True:
            steps = [idx[:k] + (idx[k] + 1,) + idx[k + 1:] for k in range(n_t + 1) if idx[k] + 1 < n_w]
            gains = [((utility(s) - utility(idx)) / max(cost(s) - cost(idx), 1), s) for s in steps if allowed(s)]
            gains = [g for g in gains if g[0] > 0]
            if not gains:
                return idx
            idx = max(gains)[1]

    @torch.no_grad()
    def calibrate(self, data: MultiTaskData, batch_size: int = 2048) -> Tensor:
        """Measure every task's mean loss on ``data`` at each (encoder, decoder) width pair and set
        ``quality[t, e, d] = L_t(full) / L_t(e, d)``; returns that table [T, widths, widths]."""
        was_training, saved = self.training, self.active
        self.eval()
        n_w = len(self.widths)
        loss = torch.zeros(len(self.tasks), n_w, n_w, dtype=torch.float64)
        for i, e in enumerate(self.widths):
            for j, d in enumerate(self.widths):
                self.active = {"encoder": e, "decoders": {t: d for t in self.task_names}}
                total = torch.zeros(len(self.tasks), dtype=torch.float64)
                count = torch.zeros(len(self.tasks), dtype=torch.float64)
                for batch in data.batches(batch_size):
                    out = self(batch.x)
                    for k, task in enumerate(self.tasks):
                        m = batch.mask[task.name]
                        total[k] += float(task.loss(out[task.name][m], batch.y[task.name][m]).sum())
                        count[k] += int(m.sum())
                if (count == 0).any():
                    missing = self.task_names[int((count == 0).nonzero()[0])]
                    raise PolytaskError(f"no sample in the calibration data carries a label for task {missing!r}")
                loss[:, i, j] = total / count
        self.active = saved
        self.train(was_training)
        self.quality.copy_(loss[:, -1:, -1:] / loss.clamp(min=1e-12))
        return self.quality.clone()

    # ------------------------------------------------------------------ training
    def sample_configs(self) -> list[Config]:
        """The sandwich rule: the smallest configuration, then ``num_sampled - 1`` random ones."""
        if self.num_sampled == 0:
            return []
        low = self.widths[0]
        configs = [{"encoder": low, "decoders": {t: low for t in self.task_names}}]
        for _ in range(self.num_sampled - 1):
            idx = torch.randint(len(self.widths), (len(self.tasks) + 1,)).tolist()
            configs.append({"encoder": self.widths[idx[0]],
                            "decoders": {t: self.widths[idx[1 + k]] for k, t in enumerate(self.task_names)}})
        return configs

    def _distill(self, h: Tensor, rep: Tensor, outputs: dict[str, Tensor], configs: Sequence[Config]) -> Tensor:
        total = h.new_zeros(())
        for cfg in configs:
            z = self.encoder(h, cfg["encoder"])
            total = total + self.cikd_weight * F.mse_loss(z, rep)
            for task in self.tasks:
                student = self.heads[task.name](z, cfg["decoders"][task.name])
                total = total + self.distill_weight * output_distillation(task, student, outputs[task.name])
        return total / len(configs)

    def distillation_loss(self, x: Inputs, configs: Sequence[Mapping[str, Any]]) -> Tensor:
        """The aux loss for SubNets ``configs`` against the detached full-width network on ``x``."""
        h = self.backbone(x)
        with torch.no_grad():
            rep = self.encoder(h)
            outputs = {t: head(rep) for t, head in self.heads.items()}
        return self._distill(h, rep, outputs, [self._check(c) for c in configs])

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.backbone(x)
        if not self.training:
            z = self.boundary(self.encoder(h, self.active["encoder"]))
            return {t: head(z, self.active["decoders"][t]) for t, head in self.heads.items()}
        rep = self.encoder(h)
        z = self.boundary(rep)
        out = {t: head(z) for t, head in self.heads.items()}
        configs = self.sample_configs()
        if configs:
            self.aux_loss = self._distill(h, rep.detach(), {t: o.detach() for t, o in out.items()}, configs)
        return out
