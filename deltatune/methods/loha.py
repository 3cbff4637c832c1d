"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS).

Two rank-r products multiplied element-wise reach rank up to r² for the parameters of two LoRAs:

    ΔW = s · (B1 A1) ⊙ (B2 A2)          B (d, r), A (r, k), s = alpha / r; A2 = 0 at init, so ΔW = 0

      x ──> W0 ───────────────────────────┐
      x ──> [B1 ⊙_row B2] [A1 ⊙_col A2] ──> · s ──> + ──> h

ΔW is never formed (d × k per layer, and per row when serving): by the face-splitting identity

    (B1 A1) ⊙ (B2 A2) = (B1 • B2)(A1 ∗ A2)     (B1 • B2)_i = B1_i ⊗ B2_i (d, r²),  (A1 ∗ A2)_:j = A1_:j ⊗ A2_:j (r², k)

LoHa is a LoRA update of rank r² (exact), so training runs `lora_update` and served LoHa rows batch with
LoRA rows under the key "lora". Tensor names are peft's (`hada_w1_a` = B1, `hada_w1_b` = A1, ...), so
peft interop is a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import AdaptedLayer, SiteEstimate, unwrap_layers
from deltatune.methods.lora import LowRankSite, Placement, adapt, fold_low_rank
from deltatune.options import option

NAME = "loha"
DEFAULT_LR = 1e-3
ADAPTER = "default"
PEFT_TYPE = "LOHA"
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
"""B1 (d, r), A1 (r, k), B2 (d, r), A2 (r, k), peft's names."""


@dataclass
class Config(Placement):
    r: int = option(8, ge=1)
    """Rank of each of the two products (ΔW has rank up to r²)."""
    alpha: float = option(8.0, gt=0)
    """Scale numerator: ΔW is multiplied by alpha / r."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the LoHa input x."""


def khatri_rao(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor,
               a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r², k), B (d, r²)) with B A = (B1 A1) ⊙ (B2 A2) (leading batch dimensions allowed)."""
    a = (a1.unsqueeze(-2) * a2.unsqueeze(-3)).flatten(-3, -2)  # (..., r, 1, k) * (..., 1, r, k) -> (..., r², k)
    b = (b1.unsqueeze(-1) * b2.unsqueeze(-2)).flatten(-2)  # (..., d, r, 1) * (..., d, 1, r) -> (..., d, r²)
    return a, b


def add_factors(layer: AdaptedLayer, shapes: dict[str, tuple[int, int]], zero: str, name: str) -> None:
    """One ParameterDict per factor (peft's layout, `layer.<factor>[name]`), kaiming-uniform but `zero`."""
    for factor, shape in shapes.items():
        tensor = torch.empty(shape, device=layer.base_layer.weight.device)
        if factor == zero:
            nn.init.zeros_(tensor)
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        setattr(layer, factor, nn.ParameterDict({name: nn.Parameter(tensor)}))


class LoHaLinear(LowRankSite):
    """A frozen linear (or Conv1D) layer plus s · ((B1 A1) ⊙ (B2 A2)) x."""

    def __init__(self, base_layer: nn.Module, config: Config, name: str = ADAPTER):
        super().__init__(base_layer, name)
        r = config.r
        add_factors(self, {"hada_w1_a": (self.out_features, r), "hada_w1_b": (r, self.in_features),
                           "hada_w2_a": (self.out_features, r), "hada_w2_b": (r, self.in_features)},
                    zero="hada_w2_b", name=name)  # A2 = 0: ΔW = 0 at initialisation
        self.scaling = {name: config.alpha / r}
        self.lora_dropout = nn.ModuleDict({name: nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()})

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """LoHa as LoRA factors (A (r², k), B (d, r²))."""
        b1, a1, b2, a2 = (getattr(self, f)[name] for f in FACTORS)
        return khatri_rao(b1, a1, b2, a2)


def apply(task_model: TaskModel, config: Config) -> None:
    adapt(task_model, config, lambda base, name: LoHaLinear(base, config))


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + s · (B1 A1) ⊙ (B2 A2)."""
    unwrap_layers(task_model, LoHaLinear, fold_low_rank)


def estimate_site(config: Config, k: int, d: int) -> SiteEstimate:
    """Four factors, 2r(k + d); the update runs at rank r², keeping the formed (r², k) and (d, r²)."""
    r = config.r
    return SiteEstimate(2 * r * (k + d), r * max(k, d), r * r, formed=(r * r * k, d * r * r))


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors): `X.hada_w1_a.default` -> `X.hada_w1_a`."""
    out = {k.removesuffix(f".{ADAPTER}"): v for k, v in tensors.items()}
    targets = sorted({k.split(".hada_w1_a")[0] for k in tensors if ".hada_w1_a" in k})
    fields = {"r": config.r, "alpha": config.alpha, "module_dropout": 0.0, "rank_dropout": 0.0,
              "target_modules": targets}
    if config.dropout or config.bias != "none":
        raise UserError("peft LoHa has no input dropout or bias option: export needs dropout=0, bias=none")
    return fields, out


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft (one rank and one alpha for every layer; no Conv2d, no rank patterns)."""
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern") or any(
            ".hada_t" in k for k in tensors):
        raise UserError("peft LoHa with rank/alpha patterns or conv (hada_t) weights is not supported")
    targets = sorted({k.split(".hada_w1_a")[0] for k in tensors if ".hada_w1_a" in k})
    if not targets:
        raise UserError("the peft adapter holds no LoHa weights (no '*.hada_w1_a' tensors)")
    config = Config(r=int(adapter_config["r"]), alpha=float(adapter_config["alpha"]), target_modules=tuple(targets))
    ours = {k if k.rsplit(".", 1)[-1] not in FACTORS else f"{k}.{ADAPTER}": v for k, v in tensors.items()}
    return config, ours
