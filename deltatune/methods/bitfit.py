"""BitFit (Ben Zaken, Goldberg & Ravfogel 2022): train only the bias terms.

    y = W x + b      W frozen, b trainable     (every bias: attention, FFN, LayerNorm)

About 0.1% of BERT's parameters; the head trains too. Architectures without biases (Llama)
have nothing to train, which is an error, not a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import train_head

NAME = "bitfit"
DEFAULT_LR = 1e-3


@dataclass
class Config:
    include_layernorm: bool = True
    """Also train LayerNorm biases (the paper does)."""


def bias_names(task_model: TaskModel, include_layernorm: bool = True) -> list[str]:
    names = []
    for module_name, module in task_model.backbone.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if not include_layernorm and "norm" in type(module).__name__.lower():
            continue
        names.append(f"{module_name}.bias" if module_name else "bias")
    return names


def apply(task_model: TaskModel, config: Config) -> None:
    names = bias_names(task_model, config.include_layernorm)
    if not names:
        raise UserError(f"bitfit: the {task_model.arch.family} backbone has no bias terms to train")
    params = dict(task_model.backbone.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    train_head(task_model)
