"""Fisher merging: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.

With a diagonal Fisher F_t per model (Sec. 2), the merge is the closed form

    θ^p = Σ_t λ_t F_t^p θ_t^p / Σ_t λ_t F_t^p

with λ_t = 1/T by default (``weights`` sets them). A small ``epsilon`` is added to every Fisher
entry (the authors' code floors it instead; see Deviations), so parameters no model is
sensitive to fall back to the plain average instead of 0/0. Tensors absent from the Fisher dicts
(e.g. buffers) get F = 1.

The diagonal Fisher F = E_x E_{y~p_θ(y|x)} [(∇_θ log p_θ(y|x))²] is estimated by
:func:`diagonal_fisher` from a few input batches, with the expectation over y taken exactly
(summed over classes weighted by p_θ(y|x)), one per-example gradient per class.
Fishers are passed precomputed (state dicts or safetensors files, one per fine-tuned model) or as
a callable ``fishers(i, state_dict_i) -> {name: Fisher}`` called once per fine-tuned model, either
as the option ``fishers`` or in ``MergeData(fishers=...)`` (need ``fisher``: a harness computes them
from a few training inputs of each task); the latter wins.

Checked against: the authors' mmatena/model_merging model_merging/merging.py
(``_merge_with_coeffs``: sum_t c_t F_t theta_t / sum_t c_t F_t with F floored at
``fisher_floor`` = 1e-6, by default only on the first ("target") model, and, by default, c_t
divided by the global L2 norm of model t's Fisher) and model_merging/fisher.py (the exact expectation over labels, sum_y p(y|x) (grad log
p(y|x))^2, averaged over examples). The Fisher estimate is the same, and so is the merge given
the same per-model coefficients: tests/test_reference_merging.py checks both against a torch
re-write of that code (tests/fixtures/make_fisher_fixture.py), with and without its Fisher
normalisation (passed to us as ``weights``).
Deviations: we add ``epsilon`` = 1e-8 to every model's Fisher instead of flooring the target's
at 1e-6, and do not normalise each Fisher by its global norm (the closed form above has neither;
``weights`` can rescale models).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from polytask.errors import PolytaskError
from polytask.merging.base import MergeData, Merger
from polytask.merging.taskvector import Checkpoint, DictCheckpoint, ModelSource, check_compatible, open_checkpoint
from polytask.registry import MERGERS

FisherSource = Union[Sequence[ModelSource], Callable[[int, dict[str, Tensor]], dict[str, Tensor]]]


def diagonal_fisher(model: nn.Module, batches: Iterable[Tensor],
                    forward: Callable[[nn.Module, dict[str, Tensor], Tensor], Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """Diagonal Fisher of a classifier's parameters: mean over inputs of Σ_y p(y|x) (∇ log p(y|x))².

    ``forward(model, params, x)`` returns logits (default: ``functional_call(model, params, (x,))``).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    call = forward or (lambda m, p, x: functional_call(m, p, (x,)))

    def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.log_softmax(call(model, p, x.unsqueeze(0)).squeeze(0), dim=-1)

    per_example_jac = vmap(jacrev(log_probs), in_dims=(None, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    for x in batches:
        with torch.no_grad():
            probs = torch.softmax(call(model, params, x), dim=-1)  # (B, C)
        jac = per_example_jac(params, x)  # name -> (B, C, *shape)
        for k, g in jac.items():
            w = probs.reshape(*probs.shape, *([1] * (g.dim() - 2)))
            fisher[k] += (w * g.detach().pow(2)).sum(dim=(0, 1))
        count += x.shape[0]
    if count == 0:
        raise PolytaskError("diagonal_fisher got no batches; pass a few input batches of the task")
    return {k: v / count for k, v in fisher.items()}


@MERGERS.register("fisher")
class Fisher(Merger):
    """Fisher merging (Matena & Raffel, NeurIPS 2022): θ = Σ F_t θ_t / Σ F_t with diagonal Fishers."""

    needs = frozenset({"fisher"})
    data_sizes = {"small": (8, 4), "vision": (8, 4), "text": (32, 1)}

    def __init__(self, *, fishers: FisherSource | None = None, weights: Sequence[float] | None = None,
                 epsilon: float = 1e-8) -> None:
        self.fishers = fishers
        self.weights = None if weights is None else [float(w) for w in weights]
        self.epsilon = float(epsilon)
        self._opened: list[tuple[Checkpoint, set[str]]] = []

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: MergeData | None) -> None:
        n = len(models)
        fishers = data.fishers if data is not None and data.fishers is not None else self.fishers
        if fishers is None:
            raise PolytaskError("fisher merging needs fishers: one Fisher file/state dict per fine-tuned model "
                                "(e.g. fishers=['f1.safetensors', 'f2.safetensors']) or a callable")
        if callable(fishers):
            opened = [DictCheckpoint(fishers(i, m.load()), "from the fishers callable") for i, m in enumerate(models)]
        else:
            if isinstance(fishers, (str, bytes)) or len(fishers) != n:
                raise PolytaskError(f"fishers must list one Fisher per fine-tuned model ({n}); "
                                    f"got {1 if isinstance(fishers, (str, bytes)) else len(fishers)}")
            opened = [open_checkpoint(f) for f in fishers]
        if self.weights is not None and len(self.weights) != n:
            raise PolytaskError(f"weights must give one number per fine-tuned model ({n}); got {len(self.weights)}")
        base_keys = set(base.keys())
        for i, ck in enumerate(opened, start=1):
            extra = next((k for k in ck.keys() if k not in base_keys), None)
            if extra is not None:
                raise PolytaskError(f"Fisher {i} ({ck.label}) has a tensor {extra!r} that the base ({base.label}) lacks; "
                                    f"compute the Fishers of models fine-tuned from this base")
            check_compatible(base, [ck], what="Fisher", keys=ck.keys(), start=i)
        self._opened = [(ck, set(ck.keys())) for ck in opened]

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        weights = self.weights or [1.0 / len(models)] * len(models)
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for w, theta, (ck, keys) in zip(weights, models, self._opened):
            f = ck.get(name).to(base.dtype) if name in keys else torch.ones_like(base)
            f = (f + self.epsilon) * w
            num += f * theta
            den += f
        return num.div_(den)
