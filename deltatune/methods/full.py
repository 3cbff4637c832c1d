"""Full fine-tuning ("fine-tuning II", Howard & Ruder 2018; Devlin et al. 2019).

    every weight W of the backbone and the head trains:   W <- W - lr * AdamW(dL/dW)

The delta is the whole model: the most accurate and the most expensive to store and serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.backbone import TaskModel
from deltatune.methods.base import already_merged

NAME = "full"
DEFAULT_LR = 5e-5


@dataclass
class Config:
    """Full fine-tuning has no options of its own."""


def apply(task_model: TaskModel, config: Config) -> None:
    task_model.module.requires_grad_(True)


merge = already_merged  # the trained weights are the model's own
