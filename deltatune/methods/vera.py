"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

One pair of frozen random matrices A (r, k_max), B (d_max, r), drawn from a seed and shared by every
adapted layer (each uses its top-left (r, k) / (d, r) slice); per layer only two vectors train:

    h = W0 x + Λ_b B Λ_d A x            Λ_d = diag(d) (r,) starts at d_initial, Λ_b = diag(b) (d,) at 0

      x ──> W0 ─────────────────────────────────┐
      x ──> A (frozen) ──> ⊙ d ──> B (frozen) ──> ⊙ b ──> + ──> h

About 10x fewer trained numbers than LoRA (r + d per layer against r (d + k)). A and B are not saved: they
are drawn again from `projection_prng_key` exactly as peft draws them (kaiming-uniform on a CPU
generator, A first), so a delta holds the vectors and peft interop is a rename. Served per row as a
LoRA update, (Λ_b B)(Λ_d A) with s = 1 (key "lora"), so VeRA rows batch with LoRA rows in one matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import SiteEstimate, linear_dims, unwrap_layers
from deltatune.methods.lora import LowRankSite, Placement, adapt, adapted_names, fold_low_rank
from deltatune.methods.rows import Rows
from deltatune.options import option

NAME = "vera"
DEFAULT_LR = 1e-2  # the vectors scale fixed random matrices: they take large steps, as IA3's do
ADAPTER = "default"
PEFT_TYPE = "VERA"


@dataclass
class Config(Placement):
    r: int = option(256, ge=1)
    """Rank of the shared random matrices (cheap: only r numbers per layer train for it)."""
    d_initial: float = option(0.1, gt=0)
    """The starting value of every d (b starts at 0, so the update is 0 at initialisation)."""
    projection_prng_key: int = option(0, ge=0)
    """The seed the shared A and B are drawn from."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the VeRA input x."""


def projections(r: int, k_max: int, d_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A (r, k_max) and B (d_max, r), drawn as peft draws them (kaiming uniform, gain sqrt 2)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # fan_in = shape[1]
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    return kaiming((r, k_max)), kaiming((d_max, r))


class VeRALinear(LowRankSite):
    """A frozen linear (or Conv1D) layer plus Λ_b B Λ_d A x, A and B slices of the shared matrices."""

    def __init__(self, base_layer: nn.Module, shared: tuple[torch.Tensor, torch.Tensor], config: Config,
                 name: str = ADAPTER):
        super().__init__(base_layer, name)
        device = base_layer.weight.device
        a, b = shared  # (r, k_max), (d_max, r): the same tensors in every layer, not saved
        self.register_buffer("vera_A", a[:, : self.in_features], persistent=False)  # (r, k)
        self.register_buffer("vera_B", b[: self.out_features], persistent=False)  # (d, r)
        self.vera_lambda_d = nn.ParameterDict({name: nn.Parameter(torch.full((config.r,), config.d_initial,
                                                                             device=device))})
        self.vera_lambda_b = nn.ParameterDict({name: nn.Parameter(torch.zeros(self.out_features, device=device))})
        self.lora_dropout = nn.ModuleDict({name: nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()})
        self.scaling = {name: 1.0}  # the vectors scale: s = 1
        self.projection_key = (config.r, config.projection_prng_key)  # equal keys: equal vera_A, vera_B here

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Λ_d A (r, k), Λ_b B (d, r)): VeRA's update as LoRA factors."""
        d, b = self.vera_lambda_d[name], self.vera_lambda_b[name]  # (r,), (d,)
        return d[:, None] * self.vera_A.to(d.dtype), b[:, None] * self.vera_B.to(b.dtype)


    # ---- per row (RowSite): the frozen projections once for every VeRA task, the vectors per row ----------

    ROW_FILL = (None, None, 0.0, 0.0)
    """A, B: shared by every task of the row key (never stacked); Λ_d = Λ_b = 0: no update."""

    def row_key(self) -> str:
        return "vera:{}:{}".format(*self.projection_key)

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        name = self.active_adapter
        return (self.vera_A, self.vera_B, self.vera_lambda_d[name].detach(),  # (r, k), (d, r), (r,)
                self.vera_lambda_b[name].detach())  # (d,)

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + Λ_b,row B Λ_d,row A x: two dense matmuls with the shared A, B for every VeRA row (a
        LoRA-style per-row gather of rank-r factors would copy (H, r, k) for r = 256), the vectors per row."""
        a, b, lambda_d, lambda_b = rows.tensors  # (r, k), (d, r), (r,) or (H, r), (d,) or (H, d)
        out = inner(x)  # (B, T, d)
        if rows.batched:
            lambda_d, lambda_b = lambda_d.unsqueeze(-2), lambda_b.unsqueeze(-2)  # (H, 1, r), (H, 1, d)
        z = (rows.take(x).to(a.dtype) @ a.t()) * lambda_d  # (H, T, r)
        return rows.add(out, ((z @ b.t()) * lambda_b).to(out.dtype))  # (H, T, d)


def apply(task_model: TaskModel, config: Config) -> None:
    module = task_model.module
    names = adapted_names(task_model, config)
    dims = [linear_dims(module.get_submodule(n)) for n in names]  # (k, d) each
    if not dims:
        raise UserError("vera: no module to adapt (check target_modules and layers)")
    device = module.get_submodule(names[0]).weight.device
    shared = tuple(t.to(device) for t in projections(config.r, max(k for k, _ in dims), max(d for _, d in dims),
                                                        config.projection_prng_key))
    adapt(task_model, config, lambda base, name: VeRALinear(base, shared, config))


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + Λ_b B Λ_d A."""
    unwrap_layers(task_model, VeRALinear, fold_low_rank)


def estimate_site(config: Config, k: int, d: int) -> SiteEstimate:
    """d (r) and b (d) train; z is r wide and the scaled Λ_d A (r, k), Λ_b B (d, r) are kept each step (the
    shared A, B themselves are frozen buffers of r · (k_max + d_max), not counted)."""
    r = config.r
    return SiteEstimate(r + d, max(r, d), r, formed=(r * k, d * r))


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors): `X.vera_lambda_d.default` -> `X.vera_lambda_d`; the
    projections are not saved (save_projection false: peft draws them from the same key)."""
    out = {k.removesuffix(f".{ADAPTER}"): v for k, v in tensors.items()}
    targets = sorted({k.split(".vera_lambda_")[0] for k in tensors if ".vera_lambda_" in k})
    fields = {"r": config.r, "d_initial": config.d_initial, "projection_prng_key": config.projection_prng_key,
              "save_projection": False, "vera_dropout": config.dropout, "target_modules": targets,
              "bias": config.bias}
    return fields, out


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft; saved projections are checked against the ones the key draws."""
    tensors = {k.removeprefix("base_model."): v for k, v in tensors.items()}
    targets = sorted({k.split(".vera_lambda_")[0] for k in tensors if ".vera_lambda_" in k})
    if not targets:
        raise UserError("the peft adapter holds no VeRA vectors (no '*.vera_lambda_d' tensors)")
    config = Config(r=int(adapter_config["r"]), d_initial=float(adapter_config.get("d_initial", 0.1)),
                    projection_prng_key=int(adapter_config.get("projection_prng_key", 0)),
                    dropout=float(adapter_config.get("vera_dropout", 0.0)), target_modules=tuple(targets),
                    bias=adapter_config.get("bias", "none"))
    saved = [tensors.pop(k) for k in ("vera_A", "vera_B") if k in tensors]
    if saved:
        drawn = projections(config.r, saved[0].shape[1], saved[1].shape[0], config.projection_prng_key)
        if not all(torch.equal(s.float(), d) for s, d in zip(saved, drawn)):
            raise UserError("the peft VeRA adapter's saved projections are not the ones its projection_prng_key "
                            "draws: not supported")
    ours = {k if ".vera_lambda_" not in k else f"{k}.{ADAPTER}": v for k, v in tensors.items()}
    return config, ours
