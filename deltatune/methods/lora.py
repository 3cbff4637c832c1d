"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685).

         x ─────────────┬──────────────┐
                        │              │
                 W0 (frozen, d×k)   A (r×k) ──> B (d×r)      B = 0 at init, so ΔW = BA = 0
                        │              │
                        └──── + ◄── (alpha/r) ·
                              │
                              h = W0 x + (alpha/r) · B A x

Adapters are kept by name in ModuleDicts (`lora_A["default"]`), beside the frozen base layer,
never merged into it: one backbone can hold many tasks' LoRA weights. A served batch whose rows carry
different tasks' LoRA (`row_forward`, a `RowSite`) runs the same `lora_update` with A, B, s gathered
per row: h_b = W0 x_b + s_b · B_b A_b x_b, batched matmuls over zero-padded ranks (Punica / S-LoRA).
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
    Rows,
    layer_of,
    layer_selection,
    replace_module,
    resolve_targets,
    train_head,
    unwrap_layers,
)
from deltatune.options import option

NAME = "lora"
DEFAULT_LR = 1e-3
ADAPTER = "default"


@dataclass
class Config:
    r: int = option(8, ge=1)
    """Rank of the update BA."""
    alpha: float = option(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the LoRA input x (not on the frozen path)."""
    target_modules: tuple[str, ...] = ("query", "value")
    """Roles (query, key, value, attn_out, ffn_in, ffn_out) or module-name suffixes to adapt."""
    bias: str = option("none", choices=("none", "all", "lora_only"))
    """'none', 'all' (every bias in the backbone trains) or 'lora_only' (biases of adapted layers)."""
    layers: tuple[int, ...] | None = option(None, ge=0)
    """Adapt only the targets in these transformer layers (indices from 0); None: every layer."""


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """s · B A x for one task (A (r, k), B (d, r), s a number) or one per row (A (B, r, k), B (B, d, r),
    s (B, 1, 1): batched matmuls, Punica / S-LoRA)."""
    # x: (B, T, k) -> (B, T, r) -> (B, T, d)
    return (x @ a.transpose(-1, -2)) @ b.transpose(-1, -2) * scale


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
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        update = lora_update(self.lora_dropout[name](x.to(a.dtype)), a, b, self.scaling[name])
        return out + update.to(out.dtype)

    # ---- per row (RowSite): a batch whose rows carry different tasks' LoRA, or none -----------------------

    ROW_FILL = (0.0, 0.0, 0.0)
    """A = B = 0, s = 0: a row without LoRA here gets no update."""

    def row_key(self) -> str:
        return "lora"

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        name = self.active_adapter
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        return a, b, a.new_tensor(self.scaling[name])  # (r, k), (d, r), ()

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + s_b (x A_bᵀ) B_bᵀ, only on the rows with LoRA here (zero-padded ranks add nothing)."""
        a, b, scale = rows.tensors  # (r, k), (d, r), () or per hit row (H, r, k), (H, d, r), (H,)
        out = inner(x)  # (B, T, d)
        update = lora_update(rows.take(x).to(a.dtype), a, b, scale.view(-1, 1, 1))  # (H, T, d)
        return rows.add(out, update.to(out.dtype))


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


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + (alpha/r) · B A in every adapted layer, which becomes its base layer again (merged export)."""

    def fold(layer: LoRALinear) -> None:
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, k), (d, r)
        w = layer.weight_out_in()  # (d, k)
        w.add_((b @ a * layer.scaling[ADAPTER]).to(w.dtype))

    unwrap_layers(task_model, LoRALinear, fold)


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
