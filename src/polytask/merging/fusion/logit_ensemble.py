"""Output ensemble by the mean of logits, the "logit ensemble" that Wortsman et al., "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing inference
time", ICML 2022, compare weight averaging with.

    fused logits = (1/T) Σ_t M_t(x)

Every expert weighs 1/T for every sample; the base is not read. The mean of logits is the weight
average's output-space counterpart: for a linear model the two coincide.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.merging.fusion.base import UniformFuser
from polytask.registry import FUSERS


def mean_logits(experts: Tensor, weights: Tensor | None = None) -> Tensor:
    """(1/T) Σ_t experts_t for experts' logits ``[T, ..., C]``; with per-sample ``weights`` ``[..., T]``,
    Σ_t w_t experts_t."""
    if weights is None:
        return experts.mean(0)
    return torch.einsum("...t,t...c->...c", weights, experts)


@FUSERS.register("logit-ensemble")
class LogitEnsemble(UniformFuser):
    """Output ensemble (the logit ensemble of Wortsman et al., ICML 2022): mean of the experts' logits."""

    def combine(self, base: Tensor | None, experts: Tensor, weights: Tensor) -> Tensor:
        self.check(base, experts)
        return mean_logits(experts, weights)
