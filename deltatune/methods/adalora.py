"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, ICLR, arXiv:2303.10512).

The update is kept in SVD form and rank moves, during training, to the matrices that need it:

    h = W0 x + (alpha / r0) · P Λ Q x      Q: r0×k (lora_A), Λ = diag(λ): r0×1 (lora_E), P: d×r0 (lora_B)

         x ──┬──────────────── W0 (frozen) ─────────────────────┐
             └── Q (r0×k) ──> ⊙ λ (r0) ──> P (d×r0) ── · alpha/r0 ── + ──> h
                               ▲
                 triplet i = (P[:, i], λ_i, Q[i, :]); a triplet of low importance is dropped: λ_i = 0

Importance of one weight w, after each optimizer step, from its gradient:
    I = |w · ∂L/∂w|    Ī ← β1 Ī + (1 − β1) I   (sensitivity, smoothed)
                       Ū ← β2 Ū + (1 − β2) |I − Ī|   (uncertainty)          s(w) = Ī · Ū
    triplet score  S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)

Budget b(t) = number of triplets kept over all adapted matrices (n of them), step t of T:
    b0 = init_r · n                                          t ≤ tinit          (warm-up)
    bT + (b0 − bT) · (1 − (t − tinit) / (T − tfinal − tinit))³   tinit < t < T − tfinal   (every deltaT steps)
    bT = target_r · n, and the mask is fixed from then on    t ≥ T − tfinal
Each reallocation keeps the b(t) triplets of highest S (over all matrices: ranks move between them).
Loss += orth_reg_weight · mean over P, Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F, so that dropping λ_i removes
one direction and little else.

The training loop drives all of this through `on_train_step` and `extra_loss`. The scale follows peft
(alpha / (init_r + 1e-5), unchanged as triplets are dropped), so export to / import from peft's
AdaLoRA gives the same logits; peft stores only the kept triplets plus a `rank_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import (
    AdaptedLayer,
    replace_module,
    resolve_targets,
    train_head,
    trainable_state,
    unwrap_layers,
)
from deltatune.methods.lora import LoRALinear, lora_update
from deltatune.options import option

NAME = "adalora"
DEFAULT_LR = 1e-2
"""λ starts at 0 and P, Q small, so the update grows slowly: with 1e-3 or 3e-3, 189 steps on rotten-tomatoes
(MiniLM, 2000 examples) stayed near the majority class (0.58-0.59 test accuracy); with 1e-2 they reached
0.775 (LoRA at its 1e-3: 0.763)."""
ADAPTER = "default"
PEFT_TYPE = "ADALORA"
RANK_EPS = 1e-5
"""peft divides by (ranknum + 1e-5); kept so that outputs match peft's to the last bit."""
PARTS = ("lora_A", "lora_E", "lora_B")
RESTORE_BEST_EPOCH = False
"""The delta is the end of training: an earlier epoch's λ predate the final budget's mask."""


@dataclass
class Config:
    init_r: int = option(12, ge=1)
    """Initial rank of every adapted matrix (the triplets the budget starts from)."""
    target_r: int = option(8, ge=1)
    """Average rank per matrix after the schedule: the final budget is target_r × adapted matrices."""
    alpha: float = option(8.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / init_r (peft's lora_alpha)."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the input of the update."""
    target_modules: tuple[str, ...] = ("query", "value")
    """Roles (query, key, value, attn_out, ffn_in, ffn_out) or module-name suffixes to adapt."""
    tinit: int = option(0, ge=0)
    """Warm-up optimizer steps before any triplet is dropped."""
    tfinal: int = option(0, ge=0)
    """Last optimizer steps, trained with the final budget fixed."""
    deltaT: int = option(1, ge=1)
    """Optimizer steps between two reallocations of the budget."""
    beta1: float = option(0.85, ge=0, lt=1)
    """EMA factor of the sensitivity Ī."""
    beta2: float = option(0.85, ge=0, lt=1)
    """EMA factor of the uncertainty Ū."""
    orth_reg_weight: float = option(0.1, ge=0)
    """Weight of the orthogonality regulariser on P and Q (peft's default is 0.5: while λ ≈ 0, P and Q get
    no task gradient, Adam follows the regulariser alone, and short runs learn slower; 0.1 cost little)."""
    total_step: int | None = option(None, ge=1)
    """Schedule length T in optimizer steps; None: the training loop's (recorded here when training starts)."""


class SVDLinear(AdaptedLayer):
    """A frozen linear (or Conv1D) layer plus named updates P Λ Q, each with a mask of kept triplets."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, name: str = ADAPTER):
        super().__init__(base_layer, name)
        self.lora_A = nn.ParameterDict()  # Q: (r, k) right singular vectors
        self.lora_E = nn.ParameterDict()  # λ: (r, 1) singular values
        self.lora_B = nn.ParameterDict()  # P: (d, r) left singular vectors
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.add_adapter(name, r, alpha, dropout)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float) -> None:
        device = self.base_layer.weight.device
        # λ = 0 so that ΔW = P Λ Q = 0 at initialisation; P and Q start small and random
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, device=device) * 0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=device))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=device) * 0.02)
        # 1 = triplet kept; fixed once the final budget is reached (not saved: dropped λ are saved as 0)
        self.register_buffer(f"rank_mask_{name}", torch.ones(r, 1, device=device), persistent=False)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = (alpha if alpha > 0 else r) / (r + RANK_EPS)

    def rank_mask(self, name: str = ADAPTER) -> torch.Tensor:
        return getattr(self, f"rank_mask_{name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, k) -> (B, T, d)
        out = self.base_layer(x)
        name = self.active_adapter
        if name is None:
            return out
        q, p = self.lora_A[name], self.lora_B[name]
        lam = self.lora_E[name] * self.rank_mask(name)  # (r, 1)
        update = lora_update(self.lora_dropout[name](x.to(q.dtype)), q * lam, p, self.scaling[name])  # (B, T, d)
        return out + update.to(out.dtype)

    # ---- per row (RowSite): LoRA's, with A = λ ⊙ Q (dropped triplets masked) ---------------------------

    ROW_FILL = LoRALinear.ROW_FILL
    row_forward = staticmethod(LoRALinear.row_forward)

    def row_key(self) -> str:
        return "lora"  # batches with LoRA sites at the same place (ranks zero-padded)

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        name = self.active_adapter
        a = (self.lora_A[name] * (self.lora_E[name] * self.rank_mask(name))).detach()  # λ ⊙ Q: (r, k)
        return a, self.lora_B[name].detach(), a.new_tensor(self.scaling[name])  # (r, k), (d, r), ()


def svd_layers(task_model: TaskModel) -> dict[str, SVDLinear]:
    return {n: m for n, m in task_model.module.named_modules() if isinstance(m, SVDLinear)}


def ranks(task_model: TaskModel) -> dict[str, int]:
    """Kept rank of every adapted matrix: its nonzero, unmasked λ."""
    return {n: int(((m.lora_E[ADAPTER] * m.rank_mask()) != 0).sum()) for n, m in svd_layers(task_model).items()}


def _check(config: Config) -> None:
    if not 0 <= config.target_r <= config.init_r:
        raise UserError(f"adalora: target_r ({config.target_r}) must be between 0 and init_r ({config.init_r})")
    if not (0 < config.beta1 < 1 and 0 < config.beta2 < 1):
        raise UserError("adalora: beta1 and beta2 must lie strictly between 0 and 1")
    if config.deltaT < 1 or config.tinit < 0 or config.tfinal < 0 or config.orth_reg_weight < 0:
        raise UserError("adalora: deltaT must be >= 1; tinit, tfinal and orth_reg_weight >= 0")


def apply(task_model: TaskModel, config: Config) -> None:
    _check(config)
    module = task_model.module
    for name in resolve_targets(task_model, config.target_modules):
        layer = SVDLinear(module.get_submodule(name), config.init_r, config.alpha, config.dropout)
        replace_module(module, name, layer)
        for part in PARTS:
            getattr(layer, part)[ADAPTER].requires_grad_(True)
    train_head(task_model)


def extra_loss(task_model: TaskModel, config: Config) -> torch.Tensor:
    """orth_reg_weight · mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
    if config.orth_reg_weight == 0:
        return torch.zeros((), device=task_model.device())
    terms = []
    for layer in svd_layers(task_model).values():
        q, p = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)  # (r, r)
        terms.append(torch.linalg.matrix_norm(q @ q.T - eye))  # Q Qᵀ: (r, r)
        terms.append(torch.linalg.matrix_norm(p.T @ p - eye))  # Pᵀ P: (r, r)
    if not terms:
        return torch.zeros((), device=task_model.device())
    return config.orth_reg_weight * torch.stack(terms).mean()


@dataclass
class _Allocator:
    """Importance statistics of one training run, keyed by '<module>.<part>'."""

    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)  # Ī
    uncertainty: dict[str, torch.Tensor] = field(default_factory=dict)  # Ū
    fixed: bool = False  # the final budget has been allocated


def _allocator(task_model: TaskModel) -> _Allocator:
    state = getattr(task_model.module, "_adalora_allocator", None)
    if state is None:
        state = _Allocator()
        task_model.module._adalora_allocator = state
    return state


def budget_at(step: int, total: int, config: Config, n_matrices: int) -> tuple[int, bool]:
    """(budget b(t), whether step t reallocates) for the cubic schedule above."""
    b0, bt = config.init_r * n_matrices, config.target_r * n_matrices
    final = max(1, total - config.tfinal)
    if step >= final:
        return bt, True
    if step <= config.tinit:
        return b0, False
    progress = (step - config.tinit) / (final - config.tinit)
    return int(bt + (b0 - bt) * (1 - progress) ** 3), step % config.deltaT == 0


@torch.no_grad()
def _update_importance(layers: dict[str, SVDLinear], state: _Allocator, config: Config) -> None:
    for name, layer in layers.items():
        for part in PARTS:
            w = getattr(layer, part)[ADAPTER]
            if w.grad is None:
                continue
            key = f"{name}.{part}"
            ipt = (w * w.grad).abs()  # I = |w · ∂L/∂w|
            bar = state.sensitivity.get(key, torch.zeros_like(ipt))
            unc = state.uncertainty.get(key, torch.zeros_like(ipt))
            bar = config.beta1 * bar + (1 - config.beta1) * ipt
            state.uncertainty[key] = config.beta2 * unc + (1 - config.beta2) * (ipt - bar).abs()
            state.sensitivity[key] = bar


def _scores(name: str, layer: SVDLinear, state: _Allocator) -> torch.Tensor:
    """S_i of each triplet of one matrix: (r,)."""
    r = layer.lora_E[ADAPTER].shape[0]

    def s(part: str) -> torch.Tensor:
        key = f"{name}.{part}"
        if key not in state.sensitivity:
            return torch.zeros_like(getattr(layer, part)[ADAPTER])
        return state.sensitivity[key] * state.uncertainty[key]

    score = s("lora_E").view(r) + s("lora_A").mean(dim=1) + s("lora_B").mean(dim=0)  # (r,)
    return score.float()


@torch.no_grad()
def _mask_to_budget(layers: dict[str, SVDLinear], state: _Allocator, budget: int, fix: bool) -> None:
    """Keep the `budget` triplets of highest score over all matrices; λ of the others becomes 0."""
    scores = [_scores(name, layer, state) for name, layer in layers.items()]  # [(r,)] per matrix
    flat = torch.cat([s.cpu() for s in scores])
    keep = torch.zeros(flat.shape[0], dtype=torch.bool)
    keep[flat.topk(min(budget, flat.shape[0])).indices] = True
    for layer, kept in zip(layers.values(), keep.split([s.shape[0] for s in scores])):
        lam = layer.lora_E[ADAPTER]
        lam.masked_fill_(~kept.to(lam.device).view(-1, 1), 0.0)
        if fix:
            layer.rank_mask().copy_(kept.view(-1, 1).to(layer.rank_mask()))


def on_train_step(task_model: TaskModel, config: Config, step: int, total_steps: int) -> None:
    """After optimizer step `step` (gradients still present): update importance, reallocate the budget."""
    if config.total_step is None:
        config.total_step = total_steps  # recorded in the delta (peft's total_step)
    layers = svd_layers(task_model)
    state = _allocator(task_model)
    if state.fixed:  # the optimizer's momentum must not bring a dropped triplet back
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_E[ADAPTER].mul_(layer.rank_mask())
        return
    _update_importance(layers, state, config)
    budget, reallocate = budget_at(step, config.total_step, config, len(layers))
    if step >= max(1, config.total_step - config.tfinal):
        _mask_to_budget(layers, state, budget, fix=True)
        state.fixed = True
        state.sensitivity.clear()
        state.uncertainty.clear()
    elif reallocate:
        _mask_to_budget(layers, state, budget, fix=False)


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """The trainable tensors, with the λ of dropped triplets saved as 0."""
    state = trainable_state(task_model.module)
    for name, layer in svd_layers(task_model).items():
        key = f"{name}.lora_E.{ADAPTER}"
        state[key] = state[key] * layer.rank_mask().cpu()
    return state


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 + s · P (λ ⊙ Q), pruned triplets masked out (merged export)."""

    def fold(layer: SVDLinear) -> None:
        q, p = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]  # (r, k), (d, r)
        lam = layer.lora_E[ADAPTER] * layer.rank_mask()  # (r, 1)
        w = layer.weight_out_in()  # (d, k)
        w.add_((p @ (q * lam) * layer.scaling[ADAPTER]).to(w.dtype))

    unwrap_layers(task_model, SVDLinear, fold)


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """peft's layout: only the kept triplets (λ != 0) of each matrix, and a `rank_pattern` saying which."""
    modules = sorted({k.split(".lora_E.")[0] for k in tensors if ".lora_E." in k})
    out = {k: v for k, v in tensors.items() if not any(f".{part}." in k for part in PARTS)}
    pattern: dict[str, list[bool]] = {}
    for m in modules:
        q, lam, p = (tensors[f"{m}.{part}.{ADAPTER}"] for part in PARTS)
        kept = lam.view(-1) != 0  # (r,)
        pattern[f"{m}.lora_E"] = kept.tolist()
        out.update({f"{m}.lora_A": q[kept], f"{m}.lora_E": lam[kept], f"{m}.lora_B": p[:, kept]})
    fields = {
        "init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": modules, "tinit": config.tinit,
        "tfinal": config.tfinal, "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight, "rank_pattern": pattern, "bias": "none",
        # peft requires tinit < total_step - tfinal even for inference
        "total_step": config.total_step or config.tinit + config.tfinal + 1,
    }
    return fields, out


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """A peft AdaLoRA adapter (names without `base_model.model.`) as this method's config and tensors.

    peft keeps only the triplets of its `rank_pattern`; they go back to their places among init_r,
    the others get λ = 0 (the same output).
    """
    if adapter_config.get("bias", "none") != "none":
        raise UserError(f"peft AdaLoRA with bias='{adapter_config['bias']}' is not supported (only 'none')")
    init_r = int(adapter_config["init_r"])
    pattern = {k.replace(f".{ADAPTER}", "").removesuffix(".lora_E"): v
               for k, v in (adapter_config.get("rank_pattern") or {}).items()}
    modules = sorted({k.removesuffix(".lora_E") for k in tensors if k.endswith(".lora_E")})
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in PARTS}
    for m in modules:
        q, lam, p = (tensors[f"{m}.{part}"] for part in PARTS)
        kept = torch.tensor(pattern.get(m, [True] * init_r), dtype=torch.bool)
        if kept.numel() != init_r or int(kept.sum()) != lam.shape[0]:
            raise UserError(f"peft AdaLoRA: rank_pattern of {m} does not match its {lam.shape[0]} saved triplets")
        full_q, full_lam = q.new_zeros(init_r, q.shape[1]), lam.new_zeros(init_r, 1)
        full_p = p.new_zeros(p.shape[0], init_r)
        full_q[kept], full_lam[kept], full_p[:, kept] = q, lam, p
        out.update({f"{m}.lora_A.{ADAPTER}": full_q, f"{m}.lora_E.{ADAPTER}": full_lam,
                    f"{m}.lora_B.{ADAPTER}": full_p})
    config = Config(
        init_r=init_r, target_r=int(adapter_config.get("target_r", init_r)),
        alpha=float(adapter_config.get("lora_alpha", 8)), dropout=float(adapter_config.get("lora_dropout", 0.0)),
        target_modules=tuple(modules), tinit=int(adapter_config.get("tinit", 0)),
        tfinal=int(adapter_config.get("tfinal", 0)), deltaT=int(adapter_config.get("deltaT", 1)),
        beta1=float(adapter_config.get("beta1", 0.85)), beta2=float(adapter_config.get("beta2", 0.85)),
        orth_reg_weight=float(adapter_config.get("orth_reg_weight", 0.5)),
        total_step=adapter_config.get("total_step"))
    return config, out


def checkpoint_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """What a resumed run needs beyond the tensors: the importance EMAs Ī, Ū, whether the final budget is
    fixed, and the rank masks (a checkpoint mid-schedule resumes the same allocation)."""
    state = _allocator(task_model)
    out = {f"sensitivity/{k}": v.detach().cpu() for k, v in state.sensitivity.items()}
    out.update({f"uncertainty/{k}": v.detach().cpu() for k, v in state.uncertainty.items()})
    out.update({f"rank_mask/{name}": layer.rank_mask().detach().cpu() for name, layer in svd_layers(task_model).items()})
    out["fixed"] = torch.tensor(state.fixed)
    return out


def load_checkpoint_state(task_model: TaskModel, config: Config, saved: dict[str, torch.Tensor]) -> None:
    state = _allocator(task_model)
    layers = svd_layers(task_model)
    for key, tensor in saved.items():
        kind, _, name = key.partition("/")
        if kind in ("sensitivity", "uncertainty"):
            getattr(state, kind)[name] = tensor.to(layers[name.rsplit(".", 1)[0]].lora_E[ADAPTER].device)
        elif kind == "rank_mask":
            layers[name].rank_mask().copy_(tensor)
    state.fixed = bool(saved.get("fixed", torch.tensor(False)))
