"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a trained magnitude m (one number per output feature) and a direction,
the LoRA-updated weight normalised per output feature (the paper's column norm ‖·‖_c of W (k, d)):

    W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_c          m starts at ‖W0‖_c, B at 0: W' = W0 at init

      x ──> W0 x ──────────────┐
      x ──> A ──> B ──> · s ───┴─ + ──> ⊙ m / n ──> + bias ──> h        n = ‖W0 + s·BA‖_c, detached (§4.3)

n is computed without materialising W0 + s·BA (d × k per layer, per row when serving): for output row i,

    n_i² = ‖W0_i‖² + 2s·⟨B_i, (W0 Aᵀ)_i⟩ + s²·B_i (A Aᵀ) B_iᵀ        W0 Aᵀ (d, r), A Aᵀ (r, r)

and the output reuses the frozen layer's own product: h = (m / n) ⊙ (W0 x + s·BAx) + b. As in peft, n is
treated as a constant in backward (the paper's §4.3: far less memory, the same accuracy). The options
are LoRA's (rsLoRA scaling, init, LoRA+, random ranks); the magnitude lives in
`<module>.lora_magnitude_vector["default"]`, peft's name, beside the LoRA factors.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods import lora as lora_method
from deltatune.methods.base import SiteEstimate, unwrap_layers
from deltatune.methods.lora import ADAPTER, Config, LoRALinear, adapt, dense_weight, lora_update, sized
from deltatune.methods.rows import Rows

NAME = "dora"
DEFAULT_LR = lora_method.DEFAULT_LR
PEFT_TYPE = "LORA"
param_groups = lora_method.param_groups  # LoRA+ (lr_ratio) and pissa's saved A0, B0 work as in LoRA
delta_state = lora_method.delta_state


def row_norms(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """‖W0 + s·BA‖ per output row, (d,) for one task (A (r, k), B (d, r)) or (H, d) per row (A (H, r, k),
    B (H, d, r), s (H, 1)), from W0 (d, k) without forming the (d, k) sum."""
    w = w.to(a.dtype)
    cross = ((w @ a.transpose(-1, -2)) * b).sum(-1)  # (..., d): ⟨B_i, (W0 Aᵀ)_i⟩
    quad = ((b @ (a @ a.transpose(-1, -2))) * b).sum(-1)  # (..., d): B_i A Aᵀ B_iᵀ
    squared = w.pow(2).sum(-1) + 2 * scale * cross + scale * scale * quad
    return squared.clamp_min(0).sqrt()


def dora_output(out: torch.Tensor, bias: torch.Tensor | None, update: torch.Tensor,
                ratio: torch.Tensor) -> torch.Tensor:
    """(m / n) ⊙ (W0 x + s·BAx) + b from the frozen layer's out = W0 x + b (B, T, d), update (B, T, d) and
    ratio m / n (d,) or (B, 1, d)."""
    plain = out if bias is None else out - bias
    result = ratio * (plain + update)
    return result if bias is None else result + bias


def frozen_bias(inner: nn.Module) -> torch.Tensor | None:
    """The bias of the frozen Linear / Conv1D under `inner` (through the serve engine's routers)."""
    while not isinstance(inner, nn.Linear) and type(inner).__name__ != "Conv1D":
        inner = inner.inner
    return inner.bias


class DoRALinear(LoRALinear):
    """A LoRALinear whose LoRA-updated weight is renormalised per output feature and scaled by m."""

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, scale: float | None = None,
                    init: str = "default") -> None:
        super().add_adapter(name, r, alpha, dropout, scale, init)
        if "lora_magnitude_vector" not in self._modules:
            self.lora_magnitude_vector = nn.ParameterDict()
        a, b = self.factors(name)
        with torch.no_grad():  # m = ‖W0 + s·B0A0‖ (= ‖W0‖ but for pissa's subtraction): W' = W0 at init
            self.lora_magnitude_vector[name] = nn.Parameter(row_norms(dense_weight(self.base_layer), a, b,
                                                                      self.scaling[name]))

    def ratio(self, name: str) -> torch.Tensor:
        """m / n (d,), n detached."""
        a, b = self.factors(name)
        n = row_norms(dense_weight(self.base_layer), a.detach(), b.detach(), self.scaling[name])
        return self.lora_magnitude_vector[name] / n

    def combine(self, out: torch.Tensor, update: torch.Tensor, name: str) -> torch.Tensor:
        """(m / n) ⊙ (W0 x + s·BAx) + b from the frozen layer's out = W0 x + b and the update (B, T, d)."""
        return dora_output(out.to(update.dtype), self.bias, update, self.ratio(name)).to(out.dtype)

    # ---- per row (RowSite) ----------------------------------------------------------------------------

    ROW_FILL = (0.0, 0.0, 0.0, 1.0)
    """A = B = 0, s = 0, m / n = 1 (rows without DoRA here are not computed: they pass through)."""

    def row_key(self) -> str:
        return "dora"

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        """LoRA's payload and m / n (d,): a served delta is frozen, so its norm is computed once, here."""
        a, b, scale = super().row_payload()
        return a, b, scale, self.ratio(self.active_adapter).detach()  # ..., (d,)

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """The training forward on the rows with DoRA here: A, B, s, m / n one task's or gathered per row."""
        a, b, scale, ratio = rows.tensors  # (r, k), (d, r), (), (d,) or (H, r, k), (H, d, r), (H,), (H, d)
        bias = frozen_bias(inner)
        out = inner(x)  # (B, T, d)
        s = scale.view(-1, 1) if rows.batched else scale  # (H, 1) or ()
        update = lora_update(rows.take(x).to(a.dtype), a, b, s.unsqueeze(-1))  # (H, T, d)
        mixed = dora_output(rows.take(out).to(a.dtype), bias, update, ratio.unsqueeze(-2) if rows.batched else ratio)
        return rows.put(out, mixed.to(out.dtype))


def apply(task_model: TaskModel, config: Config) -> None:
    adapt(task_model, config, sized(DoRALinear, config))


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← (m / n) ⊙ (W0 + s·BA) per output row; the bias stays."""

    def fold(layer: DoRALinear) -> None:
        ratio = layer.ratio(ADAPTER)  # (d,)
        a, b = layer.factors(ADAPTER)  # (r, k), (d, r)
        w = layer.weight_out_in()  # (d, k)
        w.copy_(((w.to(a.dtype) + layer.scaling[ADAPTER] * b @ a) * ratio[:, None]).to(w.dtype))

    unwrap_layers(task_model, DoRALinear, fold)


def estimate_site(config: Config, k: int, d: int) -> SiteEstimate:
    """LoRA's, plus m (d) and, per token, the d-wide W0 x + s·BAx that m's gradient keeps; each step forms n
    and m / n (d each) from (d, r) products: nothing of size d × k is kept."""
    site = lora_method.estimate_site(config, k, d)
    return dataclasses.replace(site, params=site.params + d, largest=max(site.largest, d),
                               per_token=site.per_token + d, formed=(site.formed[0], site.formed[1] + 2 * d))


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """peft LoRA with use_dora: LoRA's fields and names, the magnitude as `X.lora_magnitude_vector`."""
    suffix = f".lora_magnitude_vector.{ADAPTER}"
    magnitudes = {k.replace(suffix, ".lora_magnitude_vector"): v for k, v in tensors.items() if k.endswith(suffix)}
    fields, out = lora_method.to_peft(config, {k: v for k, v in tensors.items() if not k.endswith(suffix)})
    return {**fields, "use_dora": True}, {**out, **magnitudes}


def reads_peft(adapter_config: dict) -> bool:
    """peft LoRA adapters with use_dora (LoRA reads the others)."""
    return adapter_config.get("peft_type") == PEFT_TYPE and bool(adapter_config.get("use_dora"))


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft: LoRA's reading (rsLoRA, pissa / olora as there), plus the magnitudes."""
    suffix = ".lora_magnitude_vector"
    magnitudes = {k.removesuffix(".weight").replace(suffix, f"{suffix}.{ADAPTER}"): v
                  for k, v in tensors.items() if suffix in k}
    if not magnitudes:
        raise UserError("the peft adapter says use_dora but holds no '*.lora_magnitude_vector' tensors")
    config, ours = lora_method.from_peft({**adapter_config, "use_dora": False},
                                         {k: v for k, v in tensors.items() if suffix not in k})
    return config, {**ours, **magnitudes}
