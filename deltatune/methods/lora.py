"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685).

         x ─────────────┬──────────────┐
                        │              │
                 W0 (frozen, d×k)   A (r×k) ──> B (d×r)      B = 0 at init, so ΔW = BA = 0
                        │              │
                        └──── + ◄── (alpha/r) ·
                              │
                              h = W0 x + (alpha/r) · B A x

Adapters are kept by name in ModuleDicts (`lora_A["default"]`), beside the frozen base layer,
never merged into it: one backbone can hold many tasks' LoRA weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import (
    AdaptedLayer,
    layer_of,
    layer_selection,
    replace_module,
    resolve_targets,
    train_head,
)

NAME = "lora"
DEFAULT_LR = 1e-3
ADAPTER = "default"


@dataclass
class Config:
    r: int = 8
    """Rank of the update BA."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input x (not on the frozen path)."""
    target_modules: tuple[str, ...] = ("query", "value")
    """Roles (query, key, value, attn_out, ffn_in, ffn_out) or module-name suffixes to adapt."""
    bias: str = "none"
    """'none', 'all' (every bias in the backbone trains) or 'lora_only' (biases of adapted layers)."""
    layers: tuple[int, ...] | None = None
    """Adapt only the targets in these transformer layers (indices from 0); None: every layer."""


class LoRALinear(AdaptedLayer):
    """A frozen linear (or Conv1D) layer plus named low-rank updates."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, name: str = ADAPTER):
        super().__init__(base_layer, name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.add_adapter(name, r, alpha, dropout)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float) -> None:
        weight = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0 so that ΔW = BA = 0 at initialisation
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, k) -> (B, T, d)
        out = self.base_layer(x)
        name = self.active_adapter
        if name is None:
            return out
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        update = lora_b(lora_a(x)) * self.scaling[name]  # (B, T, r) -> (B, T, d)
        return out + update.to(out.dtype)


def apply(task_model: TaskModel, config: Config) -> None:
    module = task_model.module
    targets = resolve_targets(task_model, config.target_modules)
    chosen = layer_selection(task_model, config.layers)
    if chosen is not None:
        targets = [name for name in targets if layer_of(task_model, name) in chosen]
    for name in targets:
        layer = LoRALinear(module.get_submodule(name), config.r, config.alpha, config.dropout)
        replace_module(module, name, layer)
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            p.requires_grad_(True)
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in task_model.backbone.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    train_head(task_model)


PEFT_TYPE = "LORA"


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensor names) for a LoRA delta: drop the adapter name from keys."""
    targets = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})
    peft_tensors = {k.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B."): v
                    for k, v in tensors.items()}
    fields = {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
              "target_modules": targets, "bias": config.bias}
    return fields, peft_tensors


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft: a peft LoRA adapter (names without `base_model.model.`) as a LoRA delta."""
    unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern") if adapter_config.get(k)]
    if unsupported or any("lora_embedding" in k or "lora_magnitude" in k for k in tensors):
        raise UserError(f"peft LoRA with {', '.join(unsupported) or 'embedding/DoRA weights'} is not supported "
                        "(one rank and one alpha for every Linear/Conv1D layer)")
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):  # rsLoRA scales by alpha/sqrt(r): the same as alpha·sqrt(r) / r
        alpha *= math.sqrt(r)
    targets = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})
    ours = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
            for k, v in tensors.items()}
    config = Config(r=r, alpha=alpha, dropout=float(adapter_config.get("lora_dropout", 0.0)),
                    target_modules=tuple(targets), bias=adapter_config.get("bias", "none"))
    return config, ours
