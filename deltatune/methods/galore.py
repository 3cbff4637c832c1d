"""GaLore (Zhao et al., ICML 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Full-parameter training whose optimizer state lives in a rank-r subspace of each weight's gradient:

    G_t = ∂L/∂W  (m × n)                       every T steps:  P_t = U[:, :r],  U S Vᵀ = SVD(G_t)
    R_t = P_tᵀ G_t            (r × n)           Adam's moments M, V are (r × n), not (m × n)
    N_t = M̂_t / (√V̂_t + ε)    (Adam on R_t)
    W  ← W − η · α · P_t N_t                    α: `scale`;  (the smaller side of W is projected)

Every Linear weight inside the transformer layers is projected; biases, norms and the head train with
plain AdamW; the embeddings stay frozen unless `embeddings`. Optimizer state: 2·r·n per weight instead of
2·m·n. The gradient itself is still full-size here (galore-torch's GaLoreAdamW, without the paper's
per-layer weight update), so the saving is the optimizer's share. The delta is every trained weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import already_merged, decay_groups, train_head
from deltatune.options import option

NAME = "galore"
DEFAULT_LR = 5e-5
RESTORE_BEST_EPOCH = True


@dataclass
class Config:
    rank: int = option(8, ge=1)
    """r: rank of the gradient subspace the optimizer state lives in."""
    update_proj_gap: int = option(200, ge=1)
    """T: optimizer steps between two SVDs of the gradient (a new subspace)."""
    scale: float = option(4.0, gt=0)
    """α: the projected update's scale (the paper's GLUE runs use 4 with rank 8)."""
    proj_type: str = option("std", choices=("std", "reverse_std", "left", "right", "full"))
    """Which side of W is projected: std (the smaller one), reverse_std, left, right, full (both)."""
    embeddings: bool = False
    """Also train the embeddings (with plain AdamW: they are no matmul's weight)."""


def projected(task_model: TaskModel) -> list[nn.Parameter]:
    """The 2-D weights of the Linear / Conv1D projections inside the transformer layers."""
    from deltatune.quantize import quantizable

    return [m.weight for _, m in quantizable(task_model) if m.weight.requires_grad and m.weight.ndim == 2]


def apply(task_model: TaskModel, config: Config) -> None:
    task_model.module.requires_grad_(True)
    if not config.embeddings:
        task_model.backbone.get_submodule(task_model.arch.embeddings).requires_grad_(False)
        task_model.backbone.get_input_embeddings().requires_grad_(False)  # tied to an LM head too
    train_head(task_model)


def param_groups(task_model: TaskModel, config: Config, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    low_rank = projected(task_model)
    ids = {id(p) for p in low_rank}
    rest = [g | {"params": [p for p in g["params"] if id(p) not in ids]}
            for g in decay_groups(task_model.module, lr, weight_decay)]
    galore = {"params": low_rank, "lr": lr, "weight_decay": weight_decay, "rank": config.rank,
              "update_proj_gap": config.update_proj_gap, "scale": config.scale, "proj_type": config.proj_type}
    return [g for g in (galore, *rest) if g["params"]]


def make_optimizer(task_model: TaskModel, config: Config, groups: list[dict], lr: float,
                   name: str) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW (or GaLoreAdamW8bit with --optimizer adamw8bit)."""
    from deltatune.optimizers import import_bitsandbytes, resolve_optimizer

    try:
        import_bitsandbytes()  # quietly, before galore-torch imports it
        import galore_torch
    except ImportError as exc:
        raise UserError(f"method galore needs galore-torch ({exc}): pip install 'deltatune[quant]'") from exc
    name = resolve_optimizer(name)
    if name == "paged_adamw8bit":
        raise UserError("method galore: --optimizer paged_adamw8bit has no GaLore form; use adamw or adamw8bit")
    if name == "adamw8bit":
        if task_model.device().type != "cuda":
            raise UserError("method galore: galore-torch's 8-bit optimizer (GaLoreAdamW8bit) runs on CUDA only; "
                            "runs here: --optimizer adamw")
        return galore_torch.GaLoreAdamW8bit(groups, lr=lr)
    return galore_torch.GaLoreAdamW(groups, lr=lr, no_deprecation_warning=True)


merge = already_merged  # the trained weights are the model's own
