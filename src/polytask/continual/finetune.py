"""Fine-tuning: train on each experience in turn with nothing against forgetting.

The lower bound of every continual benchmark (e.g. van de Ven & Tolias 2019, "None" rows):
the loss of experience i is the plain task loss L_i(θ), starting from the weights left by i-1.
"""

from __future__ import annotations

from polytask.continual.base import Strategy
from polytask.registry import STRATEGIES


@STRATEGIES.register("finetune")
class Finetune(Strategy):
    """Naive fine-tuning on one experience after another (the lower bound)."""
