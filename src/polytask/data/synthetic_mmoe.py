"""The synthetic two-task regression data of the MMoE paper (Ma et al., KDD 2018, Sec. 3.2).

1. Two orthogonal unit vectors u1, u2 in R^d.
2. Scale c and correlation p:  w1 = c u1,  w2 = c (p u1 + sqrt(1 - p^2) u2).
3. Inputs x ~ N(0, I_d).
4. y_i = w_i^T x + sum_{j=1}^{m} sin(alpha_j w_i^T x + beta_j) + eps_i,  eps_i ~ N(0, 0.01).

The cosine between w1 and w2 is p, which sets the label correlation of the two tasks.
"""

from __future__ import annotations

import torch

from polytask.errors import PolytaskError
from polytask.registry import SUITES
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite, split_data


def mmoe_labels(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Step 4 for one task: y = w^T x + sum_j sin(alpha_j w^T x + beta_j) + eps."""
    z = x @ w
    return z + torch.sin(alpha[None, :] * z[:, None] + beta[None, :]).sum(1) + noise


@SUITES.register("synthetic-mmoe")
def synthetic_mmoe(*, seed: int = 0, correlation: float = 0.5, num_samples: int = 10000, dim: int = 100,
                   scale: float = 1.0, num_sines: int = 10, noise_std: float = 0.1) -> TaskSuite:
    """MMoE paper's synthetic data: two regression tasks with a set label correlation (Ma et al. 2018)."""
    if not -1.0 <= correlation <= 1.0:
        raise PolytaskError(f"correlation must lie in [-1, 1], got {correlation}")
    if num_samples < 10:
        raise PolytaskError(f"num_samples must be at least 10, got {num_samples}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + (1 - correlation ** 2) ** 0.5 * u2)
    alpha = torch.randn(num_sines, generator=g)
    beta = torch.randn(num_sines, generator=g)
    x = torch.randn(num_samples, dim, generator=g)
    y1 = mmoe_labels(x, w1, alpha, beta, noise_std * torch.randn(num_samples, generator=g))
    y2 = mmoe_labels(x, w2, alpha, beta, noise_std * torch.randn(num_samples, generator=g))
    data = MultiTaskData(x, {"task1": y1, "task2": y2})
    train, val, test = split_data(data, 0.1, 0.1, seed)
    tasks = [Task("task1", "regression"), Task("task2", "regression")]
    return TaskSuite("synthetic-mmoe", tasks, InputSpec("dense", dim=dim), train, val, test,
                     description=f"MMoE synthetic regression, correlation {correlation}, {num_samples} samples")
