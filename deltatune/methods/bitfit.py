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
from deltatune.methods.base import already_merged, layer_of, layer_selection, train_head
from deltatune.options import option

NAME = "bitfit"
DEFAULT_LR = 1e-3


@dataclass
class Config:
    include_layernorm: bool = True
    """Also train LayerNorm biases (the paper does)."""
    layers: tuple[int, ...] | None = option(None, ge=0)
    """Train only the biases inside these transformer layers (indices from 0); None: every bias."""


def bias_names(task_model: TaskModel, include_layernorm: bool = True,
               layers: tuple[int, ...] | None = None) -> list[str]:
    chosen = layer_selection(task_model, layers)
    names = []
    for module_name, module in task_model.backbone.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if not include_layernorm and "norm" in type(module).__name__.lower():
            continue
        if chosen is not None and layer_of(task_model, module_name, task_model.backbone) not in chosen:
            continue
        names.append(f"{module_name}.bias" if module_name else "bias")
    return names


def apply(task_model: TaskModel, config: Config) -> None:
    names = bias_names(task_model, config.include_layernorm, config.layers)
    if not names:
        raise UserError(f"bitfit: the {task_model.arch.family} backbone has no bias terms to train")
    params = dict(task_model.backbone.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    train_head(task_model)


merge = already_merged  # the trained biases are the model's own
