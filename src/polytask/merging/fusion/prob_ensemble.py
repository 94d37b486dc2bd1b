"""Output ensemble by the mean of probabilities, the deep-ensemble combination of Lakshminarayanan,
Pritzel and Blundell, "Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles",
NeurIPS 2017, whose ensemble predicts the uniform mixture p(y|x) = M⁻¹ Σ_m p_θm(y|x).

    p(y|x) = (1/T) Σ_t softmax(M_t(x)),    fused logits = log p(y|x)

(log-probabilities are logits of the same distribution). Every expert weighs w_t = 1/T for every sample;
the base is not read. The baseline of the fusion family: it keeps every expert, like
:mod:`~polytask.merging.fusion.dlf`, but its weights do not depend on the input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polytask.merging.fusion.base import UniformFuser
from polytask.registry import FUSERS


def mean_probabilities(experts: Tensor, weights: Tensor | None = None) -> Tensor:
    """log((1/T) Σ_t softmax(experts_t)) for experts' logits ``[T, ..., C]``; with per-sample ``weights``
    ``[..., T]`` (summing to one), log Σ_t w_t softmax(experts_t)."""
    log_p = torch.log_softmax(experts, -1)
    if weights is None:
        return torch.logsumexp(log_p, 0) - math.log(experts.shape[0])
    return torch.logsumexp(log_p + torch.movedim(weights, -1, 0).log().unsqueeze(-1), 0)


@FUSERS.register("prob-ensemble")
class ProbEnsemble(UniformFuser):
    """Output ensemble (Lakshminarayanan et al., NeurIPS 2017): mean of the experts' predicted probabilities."""

    def combine(self, base: Tensor | None, experts: Tensor, weights: Tensor) -> Tensor:
        self.check(base, experts)
        return mean_probabilities(experts, weights)
