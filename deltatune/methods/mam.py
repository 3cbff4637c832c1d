"""MAM adapter, "Mix-And-Match" (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", arXiv:2110.04366): prefix tuning at the attention plus a scaled parallel
adapter at the FFN, the combination the paper found best.

    attention:  K = [P_K ; W_K h],  V = [P_V ; W_V h]             (prefix tuning, `methods/prefix.py`)
    FFN:        h = FFN(x) + s · Up f(Down x)                      (parallel adapter, `methods/adapter.py`)

The paper uses 30 prefix positions and a bottleneck of d / 2 (512 for d = 1024) with s = 4. Nothing
is re-implemented here: `apply` calls the two methods' own `apply` with their sub-configs, and the
delta is saved and loaded as prefix tuning saves it (the folded prefix plus every other trained
tensor, here the adapters and the head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.backbone import TaskModel
from deltatune.methods import adapter, prefix
from deltatune.options import option

NAME = "mam"
DEFAULT_LR = 5e-4
ROW_INPUT, ROW_HOOKS, ROW_TOP_MODULES = prefix.ROW_INPUT, prefix.ROW_HOOKS, prefix.ROW_TOP_MODULES  # + adapters
"""Measured on rotten-tomatoes (600 examples, 2 epochs, mean pooling): validation 0.72 at 5e-4, 0.67 at 2e-4,
0.58 (the majority class: it diverged) at 1e-3 and 2e-3; the parallel adapter's scale s = 4 multiplies its step."""


@dataclass
class Config:
    num_virtual_tokens: int = option(30, ge=1)
    """Prefix positions per layer (He et al.: 30)."""
    prefix_projection: bool = True
    """Train the prefix through Li & Liang's MLP reparametrisation (folded away when saving)."""
    encoder_hidden_size: int = option(512, ge=1)
    """Hidden width of the prefix reparametrisation MLP."""
    prefix_init: str = option("words", choices=prefix.INITS)
    """Prefix start: words (activations of real tokens) or random."""
    bottleneck: int | None = option(None, ge=1)
    """Parallel adapter hidden size m; when unset, hidden_size // reduction_factor."""
    reduction_factor: int = option(2, ge=1)
    """hidden_size / m when `bottleneck` is unset (He et al.: 1024 / 512)."""
    scale: float = option(4.0, gt=0)
    """Multiplier s of the parallel adapter's output (He et al.: 4)."""
    activation: str = option("relu", choices=tuple(adapter.ACTIVATIONS))
    """Adapter nonlinearity f: relu, gelu, silu or tanh."""


def prefix_config(config: Config) -> prefix.Config:
    return prefix.Config(num_virtual_tokens=config.num_virtual_tokens, projection=config.prefix_projection,
                         encoder_hidden_size=config.encoder_hidden_size, init=config.prefix_init)


def adapter_config(config: Config) -> adapter.Config:
    return adapter.Config(placement="ffn", parallel=True, bottleneck=config.bottleneck,
                          reduction_factor=config.reduction_factor, scale=config.scale,
                          activation=config.activation)


def apply(task_model: TaskModel, config: Config) -> None:
    prefix.apply(task_model, prefix_config(config))  # first: its word init reads the plain backbone
    adapter.apply(task_model, adapter_config(config))


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """The folded prefix, the adapters and the head."""
    return prefix.delta_state(task_model, prefix_config(config))


def load_delta_state(task_model: TaskModel, config: Config, tensors: dict[str, torch.Tensor]) -> None:
    prefix.load_delta_state(task_model, prefix_config(config), tensors)
