"""LoKr: low-rank Kronecker product (KronA, Edalati et al. 2022, arXiv:2212.10650; LyCORIS).

The update is the Kronecker product of a small full matrix C and a low-rank one, peft's layout:

    ΔW = s · C ⊗ (B A)        C (d1, k1), B (d2, r), A (r, k2), d = d1·d2, k = k1·k2, s = alpha / r
                              d1 ≤ d2 (k1 ≤ k2) the factor pair of d (k) closest to its square root;
                              C = 0 at init, so ΔW = 0

ΔW is never formed: with x (k,) read as X (k1, k2) row-major, (C ⊗ D) x = vec(C X Dᵀ), so

      x (B, T, k) ──> (B, T, k1, k2) ──> · Aᵀ ──> · Bᵀ ──> C · ──> (B, T, d1, d2) ──> (B, T, d) ──> + W0 x

and per row the same einsum with C, B, A gathered per row. Rows batch per factor shape (the key
"lokr:d1xk1"): zero-padded ranks add nothing, but C cannot be padded. Tensor names are peft's
(`lokr_w1` = C, `lokr_w2_a` = B, `lokr_w2_b` = A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import AdaptedLayer, SiteEstimate, unwrap_layers
from deltatune.methods.loha import add_factors
from deltatune.methods.lora import Placement, adapt
from deltatune.methods.rows import Rows
from deltatune.options import option

NAME = "lokr"
DEFAULT_LR = 1e-3
ADAPTER = "default"
PEFT_TYPE = "LOKR"
FACTORS = ("lokr_w1", "lokr_w2_a", "lokr_w2_b")


@dataclass
class Config(Placement):
    r: int = option(4, ge=1)
    """Rank of B A, the larger Kronecker factor."""
    alpha: float = option(4.0, gt=0)
    """Scale numerator: ΔW is multiplied by alpha / r."""


def factor_pair(n: int) -> tuple[int, int]:
    """(m, n / m), m the largest divisor of n with m ≤ sqrt(n) (peft's `factorization` with factor -1)."""
    m = max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
    return m, n // m


def kron_update(x: torch.Tensor, c: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                scale: float | torch.Tensor) -> torch.Tensor:
    """s · (C ⊗ BA) x without forming it: one task's C (d1, k1), B (d2, r), A (r, k2), s a number, or one
    per row (C (B, d1, k1), B (B, d2, r), A (B, r, k2), s (B, 1, 1, 1))."""
    d1, k1 = c.shape[-2:]
    lead = x.shape[:-1]  # (B, T)
    grid = x.reshape(*lead, k1, -1)  # (B, T, k1, k2)
    low = (grid @ a.unsqueeze(-3).transpose(-1, -2)) @ b.unsqueeze(-3).transpose(-1, -2)  # (B, T, k1, d2)
    mixed = c.unsqueeze(-3) @ low  # (..., 1, d1, k1) @ (B, T, k1, d2) -> (B, T, d1, d2)
    return (mixed * scale).reshape(*lead, -1)  # (B, T, d)


class LoKrLinear(AdaptedLayer):
    """A frozen linear (or Conv1D) layer plus s · (C ⊗ BA) x."""

    def __init__(self, base_layer: nn.Module, config: Config, name: str = ADAPTER):
        super().__init__(base_layer, name)
        (d1, d2), (k1, k2) = factor_pair(self.out_features), factor_pair(self.in_features)
        add_factors(self, {"lokr_w1": (d1, k1), "lokr_w2_a": (d2, config.r), "lokr_w2_b": (config.r, k2)},
                    zero="lokr_w1", name=name)  # C = 0: ΔW = 0 at initialisation
        self.scaling = {name: config.alpha / config.r}

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · C ⊗ BA (d, k), for merging and tests."""
        c, b, a = (getattr(self, f)[name] for f in FACTORS)
        return torch.kron(c, b @ a) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, k) -> (B, T, d)
        out = self.base_layer(x)
        name = self.active_adapter
        if name is None:
            return out
        c, b, a = (getattr(self, f)[name] for f in FACTORS)
        return out + kron_update(x.to(c.dtype), c, b, a, self.scaling[name]).to(out.dtype)

    # ---- per row (RowSite) --------------------------------------------------------------------------------

    ROW_FILL = (0.0, 0.0, 0.0, 0.0)
    """C = B = A = 0, s = 0: no update (rows without LoKr here are not computed anyway)."""

    def row_key(self) -> str:
        c = self.lokr_w1[self.active_adapter]
        return f"lokr:{c.shape[0]}x{c.shape[1]}"

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        c, b, a = (getattr(self, f)[self.active_adapter].detach() for f in FACTORS)
        return c, b, a, c.new_tensor(self.scaling[self.active_adapter])  # (d1, k1), (d2, r), (r, k2), ()

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + s_b (C_b ⊗ B_b A_b) x on the rows with LoKr here."""
        c, b, a, scale = rows.tensors  # (d1, k1), (d2, r), (r, k2), () or per hit row with a leading H
        out = inner(x)  # (B, T, d)
        update = kron_update(rows.take(x).to(c.dtype), c, b, a, scale.view(-1, 1, 1, 1))  # (H, T, d)
        return rows.add(out, update.to(out.dtype))


def apply(task_model: TaskModel, config: Config) -> None:
    adapt(task_model, config, lambda base, name: LoKrLinear(base, config))


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + s · C ⊗ BA."""

    def fold(layer: LoKrLinear) -> None:
        w = layer.weight_out_in()  # (d, k)
        w.add_(layer.delta_weight(ADAPTER).to(w.dtype))

    unwrap_layers(task_model, LoKrLinear, fold)


def estimate_site(config: Config, k: int, d: int) -> SiteEstimate:
    """C (d1, k1), B (d2, r), A (r, k2); per token the update keeps x, X Aᵀ (k1 · r) and X Aᵀ Bᵀ (k1 · d2)."""
    (d1, d2), (k1, k2) = factor_pair(d), factor_pair(k)
    sizes = (d1 * k1, d2 * config.r, config.r * k2)
    return SiteEstimate(sum(sizes), max(sizes), k1 * config.r, per_token=k1 * d2)


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors): `X.lokr_w1.default` -> `X.lokr_w1`. peft keeps the second factor
    whole (`lokr_w2`) when r >= max(d2, k2) / 2: then B A is exported as it."""
    out: dict[str, torch.Tensor] = {}
    targets = sorted({k.split(".lokr_w1.")[0] for k in tensors if ".lokr_w1." in k})
    for key, value in tensors.items():
        if key.rsplit(".", 2)[-2] not in FACTORS:
            out[key] = value
    for t in targets:
        c, b, a = (tensors[f"{t}.{f}.{ADAPTER}"] for f in FACTORS)
        out[f"{t}.lokr_w1"] = c
        if config.r >= max(b.shape[0], a.shape[1]) / 2:
            out[f"{t}.lokr_w2"] = b @ a
        else:
            out[f"{t}.lokr_w2_a"], out[f"{t}.lokr_w2_b"] = b, a
    fields = {"r": config.r, "alpha": config.alpha, "module_dropout": 0.0, "rank_dropout": 0.0,
              "decompose_both": False, "decompose_factor": -1, "target_modules": targets}
    return fields, out


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft for peft's default layout (a whole C, a decomposed B A)."""
    if adapter_config.get("decompose_both") or adapter_config.get("rank_pattern") or any(
            k.endswith((".lokr_w2", ".lokr_w1_a", ".lokr_t2")) for k in tensors):
        raise UserError("peft LoKr with a whole second factor (r >= half its size), decompose_both, conv or rank "
                        "patterns is not supported: deltatune's LoKr is C ⊗ (B A) with B A of rank r")
    targets = sorted({k.removesuffix(".lokr_w1") for k in tensors if k.endswith(".lokr_w1")})
    if not targets:
        raise UserError("the peft adapter holds no LoKr weights (no '*.lokr_w1' tensors)")
    config = Config(r=int(adapter_config["r"]), alpha=float(adapter_config["alpha"]), target_modules=tuple(targets))
    ours = {k if k.rsplit(".", 1)[-1] not in FACTORS else f"{k}.{ADAPTER}": v for k, v in tensors.items()}
    return config, ours
