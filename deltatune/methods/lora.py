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

Options (the variants most users pick first):
- scaling=rslora  s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732): high ranks keep learning.
- init=gaussian   A ~ N(0, 1/r²), B = 0 (peft's "gaussian").
- init=pissa      A0 = sqrt(S_r) V_rᵀ / sqrt(s), B0 = U_r sqrt(S_r) / sqrt(s): the top-r SVD of W0
                  (PiSSA, Meng et al. 2024, arXiv:2404.02948); init=olora: B0 = Q_r, A0 = R_r of W0 = QR
                  (OLoRA, Büyükakyüz 2024, arXiv:2406.01775). The shared backbone is never modified: W0
                  stays, and the initial product is subtracted from the update,
                      h = W0 x + s (B A − B0 A0) x,
                  kept as two extra ranks of the same update, [B, −B0] [A; A0] (frozen `lora_A0`,
                  `lora_B0`, saved in the delta), so training, serving and merging run plain LoRA math
                  and the adapted model equals the base one at initialisation.
- lr_ratio        LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B's learning rate = lr_ratio × A's.
- random_ranks=LO-HI  each adapted matrix gets its own rank, drawn from [LO, HI] seeded by rank_seed and
                  the module name (preset `rrlora`: 1-16); s = alpha / r_i per matrix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune import storage
from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import (
    AdaptedLayer,
    SiteEstimate,
    decay_groups,
    layer_of,
    layer_selection,
    replace_module,
    resolve_targets,
    train_head,
    trainable_state,
    unwrap_layers,
)
from deltatune.methods.rows import Rows
from deltatune.options import option

NAME = "lora"
DEFAULT_LR = 1e-3
ADAPTER = "default"
RRLORA = {"random_ranks": "1-16"}
"""The preset `rrlora` (seed 004's Random Rank LoRA ablation), registered in methods/__init__.py."""


@dataclass
class Placement:
    """Where a LoRA-family method adapts (its Config's first fields: `adapt` reads them)."""

    target_modules: tuple[str, ...] = ("query", "value")
    """Roles (query, key, value, attn_out, ffn_in, ffn_out) or module-name suffixes to adapt."""
    bias: str = option("none", choices=("none", "all", "lora_only"))
    """'none', 'all' (every bias in the backbone trains) or 'lora_only' (biases of adapted layers)."""
    layers: tuple[int, ...] | None = option(None, ge=0)
    """Adapt only the targets in these transformer layers (indices from 0); None: every layer."""


@dataclass
class Config(Placement):
    r: int = option(8, ge=1)
    """Rank of the update BA."""
    alpha: float = option(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the LoRA input x (not on the frozen path)."""
    scaling: str = option("default", choices=("default", "rslora"))
    """'default': s = alpha / r; 'rslora': s = alpha / sqrt(r)."""
    init: str = option("default", choices=("default", "gaussian", "pissa", "olora"))
    """Initialisation of A and B: kaiming A, B = 0 ('default'), N(0, 1/r²) A ('gaussian'), W0's top-r SVD
    ('pissa') or QR ('olora'), minus the initial product (the adapted model starts as the base one)."""
    lr_ratio: float = option(1.0, gt=0)
    """LoRA+: B's learning rate is lr_ratio times A's (and the other trainable tensors')."""
    random_ranks: str | None = None
    """'LO-HI': each adapted matrix gets a seeded random rank in [LO, HI] instead of r."""
    rank_seed: int = option(0, ge=0)
    """The seed of random_ranks (with the module name)."""

    def scale(self, r: int) -> float:
        """s = alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        return self.alpha / (math.sqrt(r) if self.scaling == "rslora" else r)

    def __post_init__(self) -> None:
        self.rank_range()  # a bad random_ranks is refused when the config is built, before any model loads

    def rank_range(self) -> tuple[int, int] | None:
        """random_ranks as (LO, HI), or None."""
        if self.random_ranks is None:
            return None
        low, _, high = str(self.random_ranks).partition("-")
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
            raise UserError(f"option 'random_ranks' must be LO-HI with 1 <= LO <= HI, got '{self.random_ranks}'")
        return int(low), int(high)

    def rank_of(self, module_name: str) -> int:
        """r, or the module's seeded random rank in random_ranks' range."""
        span = self.rank_range()
        return self.r if span is None else random.Random(f"{self.rank_seed}:{module_name}").randint(*span)


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """s · B A x for one task (A (r, k), B (d, r), s a number) or one per row (A (B, r, k), B (B, d, r),
    s (B, 1, 1): batched matmuls, Punica / S-LoRA)."""
    # x: (B, T, k) -> (B, T, r) -> (B, T, d); s scales the (B, T, r) intermediate, not the (B, T, d) output
    return ((x @ a.transpose(-1, -2)) * scale) @ b.transpose(-1, -2)


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The frozen layer's weight as (out, in) floats, dequantised if it is stored packed (--quantize)."""
    return storage.storage_of(base_layer).dequantize()


def initial_factors(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, k), B0 (d, r)) from W0 (d, k): s·B0A0 is W0's top-r SVD part (pissa) or B0 = Q_r, A0 = R_r
    of W0 = QR (olora, peft's layout)."""
    w = weight.detach().float()  # (d, k)
    if init == "olora":
        q, rr = torch.linalg.qr(w)  # (d, m), (m, k), m = min(d, k)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (d, m), (m,), (m, k)
    root = (sv[:r] / scale).sqrt()  # (r,): s · B0 A0 = U_r S_r V_rᵀ
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


class LowRankSite(AdaptedLayer):
    """A frozen layer plus an update s · B A x, (A, B) = `factors(name)`, s = `scaling[name]`, on the input
    through `lora_dropout[name]`: LoRA, and the variants whose update is one (VeRA: (Λ_b B)(Λ_d A), LoHa: a
    Khatri-Rao product of rank r²). They train through this forward and serve per row as LoRA does."""

    scaling: dict[str, float]
    lora_dropout: nn.ModuleDict

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, k) -> (B, T, d)
        out = self.base_layer(x)
        name = self.active_adapter
        if name is None:
            return out
        a, b = self.factors(name)
        update = lora_update(self.lora_dropout[name](x.to(a.dtype)), a, b, self.scaling[name])  # (B, T, d)
        return self.combine(out, update, name)

    def combine(self, out: torch.Tensor, update: torch.Tensor, name: str) -> torch.Tensor:
        """The output from the frozen layer's `out` and the update s·BAx (both (B, T, d)); DoRA renormalises."""
        return out + update.to(out.dtype)

    # ---- per row (RowSite): a batch whose rows carry different tasks' LoRA, or none -----------------------

    ROW_FILL = (0.0, 0.0, 0.0)
    """A = B = 0, s = 0: a row without LoRA here gets no update."""

    def row_key(self) -> str:
        return "lora"

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        name = self.active_adapter
        a, b = (t.detach() for t in self.factors(name))
        return a, b, a.new_tensor(self.scaling[name])  # (r, k), (d, r), ()

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + s_b (x A_bᵀ) B_bᵀ, only on the rows with LoRA here (zero-padded ranks add nothing)."""
        a, b, scale = rows.tensors  # (r, k), (d, r), () or per hit row (H, r, k), (H, d, r), (H,)
        out = inner(x)  # (B, T, d)
        update = lora_update(rows.take(x).to(a.dtype), a, b, scale.view(-1, 1, 1))  # (H, T, d)
        return rows.add(out, update.to(out.dtype))


class LoRALinear(LowRankSite):
    """A frozen linear (or Conv1D) layer plus named low-rank updates."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, name: str = ADAPTER,
                 scale: float | None = None, init: str = "default"):
        super().__init__(base_layer, name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_A0 = nn.ParameterDict()  # pissa / olora: the frozen initial product, subtracted
        self.lora_B0 = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.add_adapter(name, r, alpha, dropout, scale, init)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, scale: float | None = None,
                    init: str = "default") -> None:
        weight = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r if scale is None else scale
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, k), (d, r)
        if init in ("pissa", "olora"):
            a0, b0 = initial_factors(dense_weight(self.base_layer), r, self.scaling[name], init)
            with torch.no_grad():
                a.copy_(a0)
                b.copy_(b0)
            self.lora_A0[name] = nn.Parameter(a0.clone(), requires_grad=False)
            self.lora_B0[name] = nn.Parameter(b0.clone(), requires_grad=False)
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)  # B = 0 so that ΔW = BA = 0 at initialisation

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the update s·BA: with pissa / olora, [A; A0] (r + r, k) and [B, −B0] (d, r + r)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, k), (d, r)
        if name not in self.lora_A0:
            return a, b
        return torch.cat([a, self.lora_A0[name]]), torch.cat([b, -self.lora_B0[name]], dim=1)

def apply(task_model: TaskModel, config: Config) -> None:
    adapt(task_model, config, sized(LoRALinear, config))


def sized(layer_type: type[LoRALinear], config: Config) -> Callable[[nn.Module, str], LoRALinear]:
    """`adapt`'s builder of a LoRALinear (or DoRALinear) with the module's rank, scale and init."""

    def build(base: nn.Module, name: str) -> LoRALinear:
        r = config.rank_of(name)
        return layer_type(base, r, config.alpha, config.dropout, scale=config.scale(r), init=config.init)

    return build


def adapted_names(task_model: TaskModel, config: Any) -> list[str]:
    """The modules config.target_modules names, within config.layers."""
    targets = resolve_targets(task_model, config.target_modules)
    chosen = layer_selection(task_model, config.layers)
    return targets if chosen is None else [name for name in targets if layer_of(task_model, name) in chosen]


def adapt(task_model: TaskModel, config: Any, build: Callable[[nn.Module, str], AdaptedLayer]) -> None:
    """Replace every target (config.target_modules, in config.layers) by `build(frozen layer, its name)`: the
    layer's new tensors train (those it made frozen stay so: pissa's A0, B0), biases as config.bias says,
    and the head (LoRA and its variants: DoRA, VeRA, LoHa, LoKr)."""
    module = task_model.module
    for name in adapted_names(task_model, config):
        layer = build(module.get_submodule(name), name)  # its new parameters are trainable from creation
        replace_module(module, name, layer)
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in task_model.backbone.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    train_head(task_model)


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + s · B A (pissa / olora: s · (B A − B0 A0)) in every adapted layer, which becomes its base layer
    again (merged export)."""

    unwrap_layers(task_model, LoRALinear, fold_low_rank)


def fold_low_rank(layer: LowRankSite) -> None:
    """W0 ← W0 + s · B A (`merge` of LoRA and the variants whose update is low-rank factors)."""
    a, b = layer.factors(ADAPTER)  # (r, k), (d, r)
    w = layer.weight_out_in()  # (d, k)
    w.add_((b @ a * layer.scaling[ADAPTER]).to(w.dtype))


def param_groups(task_model: TaskModel, config: Config, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups; LoRA+: every B matrix in groups of its own at lr_ratio × lr."""
    groups = decay_groups(task_model.module, lr, weight_decay)
    if config.lr_ratio == 1.0:
        return groups
    b_ids = {id(p) for n, p in task_model.module.named_parameters() if ".lora_B." in n}
    split = []
    for group in groups:
        for is_b in (False, True):
            params = [p for p in group["params"] if (id(p) in b_ids) == is_b]
            if params:
                split.append({**group, "params": params, "lr": lr * config.lr_ratio if is_b else lr})
    return split


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """The trainable tensors, plus pissa / olora's frozen initial factors (the update subtracts them)."""
    state = trainable_state(task_model.module)
    state.update({n: t.detach().to("cpu").contiguous() for n, t in task_model.module.named_parameters()
                  if ".lora_A0." in n or ".lora_B0." in n})
    return state


def estimate_site(config: Config, k: int, d: int) -> SiteEstimate:
    """B·A on a (k → d) matrix: r(k + d) parameters, z of width r (random_ranks: the middle of the range, the
    mean of the seeded draws); pissa / olora form [A; A0], [B, −B0] of rank 2r each step (torch.cat)."""
    span = config.rank_range()
    r = config.r if span is None else sum(span) / 2
    if config.init in ("pissa", "olora"):
        return SiteEstimate(r * (k + d), r * max(k, d), 2 * r, formed=(2 * r * k, 2 * r * d))
    return SiteEstimate(r * (k + d), r * max(k, d), r)


PEFT_TYPE = "LORA"


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensor names) for a LoRA delta: drop the adapter name from keys.

    rsLoRA sets use_rslora; random ranks a rank_pattern. pissa / olora export as peft does after
    training (its `path_initial_model_for_weight_conversion`): plain LoRA of rank 2r, [A; A0] and [B, −B0]."""
    tensors = dict(tensors)
    targets = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})
    ranks = {t: tensors[f"{t}.lora_A.{ADAPTER}.weight"].shape[0] for t in targets}
    fields: dict[str, Any] = {"r": config.r, "lora_alpha": config.alpha, "use_rslora": config.scaling == "rslora"}
    if config.init in ("pissa", "olora"):
        if config.random_ranks is not None:
            raise UserError("peft export of random_ranks with init=pissa/olora is not supported")
        for t in targets:
            a0, b0 = tensors.pop(f"{t}.lora_A0.{ADAPTER}"), tensors.pop(f"{t}.lora_B0.{ADAPTER}")
            a, b = f"{t}.lora_A.{ADAPTER}.weight", f"{t}.lora_B.{ADAPTER}.weight"
            tensors[a], tensors[b] = torch.cat([tensors[a], a0]), torch.cat([tensors[b], -b0], dim=1)
        fields = {"r": 2 * config.r, "lora_alpha": config.scale(config.r) * 2 * config.r, "use_rslora": False}
    elif len(set(ranks.values())) > 1 or config.random_ranks is not None:
        fields["rank_pattern"] = ranks
    peft_tensors = {k.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B."): v
                    for k, v in tensors.items()}
    fields.update({"lora_dropout": config.dropout, "target_modules": targets, "bias": config.bias})
    return fields, peft_tensors


def reads_peft(adapter_config: dict) -> bool:
    """peft LoRA adapters without use_dora (those are DoRA's)."""
    return adapter_config.get("peft_type") == PEFT_TYPE and not adapter_config.get("use_dora")


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The inverse of to_peft: a peft LoRA adapter (names without `base_model.model.`) as a LoRA delta.

    use_rslora becomes scaling=rslora. init_lora_weights=pissa / olora as peft saves it without
    `path_initial_model_for_weight_conversion`: the file holds A, B only, and peft's model was W0 − s·B0A0
    + s·BA with B0, A0 the SVD / QR of the original W0, which `PeftModel.from_pretrained` re-runs on the base
    it is given. The import is init=pissa / olora: `apply` draws B0, A0 from the same original W0 (the
    product s·B0A0 does not depend on the signs SVD / QR pick), and W0 stays, so logits equal peft's on the
    original base (not on a saved residual model). A converted adapter (rank 2r, init True) is plain LoRA."""
    unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern") if adapter_config.get(k)]
    if unsupported or any("lora_embedding" in k or "lora_magnitude" in k for k in tensors):
        raise UserError(f"peft LoRA with {', '.join(unsupported) or 'embedding/DoRA weights'} is not supported "
                        "(one rank and one alpha for every Linear/Conv1D layer)")
    init = str(adapter_config.get("init_lora_weights", True)).lower()
    if init not in ("pissa", "olora") and init.startswith(("pissa", "olora", "corda", "eva", "loftq", "lora_ga")):
        raise UserError(f"peft LoRA with init_lora_weights={init} needs the base model peft modified: save it "
                        "with path_initial_model_for_weight_conversion (plain LoRA) and import that")
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    scaling = "rslora" if adapter_config.get("use_rslora") else "default"
    targets = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})
    ours = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
            for k, v in tensors.items()}
    config = Config(r=r, alpha=alpha, dropout=float(adapter_config.get("lora_dropout", 0.0)),
                    target_modules=tuple(targets), bias=adapter_config.get("bias", "none"), scaling=scaling,
                    init=init if init in ("pissa", "olora") else "default")
    return config, ours
