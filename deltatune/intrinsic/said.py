"""Subspace fine-tuning: the `intrinsic` method (Li et al. 2018, "Measuring the Intrinsic Dimension of
Objective Landscapes", arXiv:1804.08838) and its structure-aware variant SAID (Aghajanyan, Gupta &
Zettlemoyer 2021, "Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning").

    DID:   θ   = θ0   + P θ_d                 θ_d (d,) trains; P (D × d) random and fixed
    SAID:  θ_i = θ0_i + λ_i · (P θ_{d-m})_i   one scale λ_i per weight tensor i (m tensors): d trainable in all

        θ_d (d) ──> P (dense, or Fastfood: H G Π H B) ──> Δθ (D) ──slices──> every weight W_i = W0_i + Δθ_i
                                                                            (torch.nn.utils.parametrize)

Every backbone weight becomes a function of θ_d; the task head trains normally, as Aghajanyan et al.
do. The product P θ_d is computed once per forward (never a d × D matrix with Fastfood) and its
gradient Pᵀ g in backward (`projection.py`). The delta is d numbers (+ the head): `delta.json` keeps
the seed and d that regenerate P, `delta.safetensors` keeps `intrinsic.vector` (and `intrinsic.scales`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.intrinsic.projection import KINDS, Projection, make_projection
from deltatune.methods.base import train_head
from deltatune.options import option

NAME = "intrinsic"
DEFAULT_LR = 2e-2
"""Measured on rotten-tomatoes (400 examples, 2 epochs, d = 1000, mean pooling): validation 0.70 at 2e-2,
0.665 at 5e-3; θ_d and the head share it, and the head alone trains best near 2e-2 too (methods/head.py)."""
MODULE = "intrinsic"
"""Attribute of the task model's module that holds θ_d, the scales and P."""


@dataclass
class Config:
    dim: int = option(1000, ge=1)
    """d, the trainable dimensions (SAID: d - m through P, plus m per-tensor scales)."""
    projection: str = option("auto", choices=KINDS)
    """P: dense (Gaussian, kept in memory), fastfood (matrix-free) or auto (dense while D·d <= 2^24)."""
    said: bool = False
    """Structure-aware (SAID): one trainable scale λ_i per weight tensor."""
    seed: int = option(0, ge=0, lt=2**32)
    """Seed that regenerates P: the delta stores it, never P."""
    exclude: tuple[str, ...] = ()
    """Parameter-name suffixes left out of θ (stay frozen), e.g. word_embeddings.weight."""


class Subspace(nn.Module):
    """θ_d, the SAID scales and P; `piece(i)` is tensor i's slice of Δθ = P θ_d (times λ_i)."""

    def __init__(self, sizes: list[int], config: Config, device: torch.device):
        super().__init__()
        self.sizes = sizes
        scaled = len(sizes) if config.said else 0
        if config.dim - scaled < 1:
            raise UserError(f"intrinsic: SAID needs dim > {scaled} (one scale per weight tensor), got {config.dim}")
        self.projection: Projection = make_projection(config.projection, sum(sizes), config.dim - scaled,
                                                      config.seed, device)
        self.vector = nn.Parameter(torch.zeros(config.dim - scaled, device=device))  # θ_d = 0: θ = θ0 at init
        self.scales = nn.Parameter(torch.ones(scaled, device=device)) if scaled else None
        self._pieces: tuple[torch.Tensor, ...] | None = None
        self._key: tuple | None = None

    def _version(self) -> tuple:
        return (self.vector._version, None if self.scales is None else self.scales._version, torch.is_grad_enabled())

    def reset(self) -> None:
        self._pieces = self._key = None

    def pieces(self) -> tuple[torch.Tensor, ...]:
        """Δθ = P θ_d split per tensor, computed once per forward (and again only after θ_d changes).
        One split, not a slice per tensor: its backward assembles the (D,) gradient once."""
        key = self._version()
        if self._pieces is None or self._key != key:
            self._pieces, self._key = self.projection(self.vector).split(self.sizes), key
        return self._pieces

    def piece(self, index: int) -> torch.Tensor:
        piece = self.pieces()[index]
        return piece * self.scales[index] if self.scales is not None else piece


class Shifted(nn.Module):
    """The parametrization W = W0 + Δθ_i: W0 is the frozen original, Δθ_i a slice of the subspace."""

    def __init__(self, subspace: Subspace, index: int):
        super().__init__()
        self.index = index
        self._subspace = [subspace]  # in a list: not a child module, so P is not registered on every layer
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        subspace = self._subspace[0]
        if torch.is_grad_enabled():
            self._cached = None
        elif self._cached is not None and self._cached[0] == subspace._version():
            return self._cached[1]  # evaluation: W is computed once until θ_d changes
        shift = subspace.piece(self.index).view_as(original)  # fp32, even when θ0 is stored in bf16
        weight = original.to(shift.dtype) + shift
        if not torch.is_grad_enabled():
            self._cached = (subspace._version(), weight)
        return weight


def subspace_parameters(task_model: TaskModel, exclude: tuple[str, ...]) -> list[list[tuple[str, nn.Module, str]]]:
    """The weights of θ, one entry per distinct tensor: its (full name, owner module, attribute) uses
    (a tied tensor has several owners). The head and integer tensors stay outside."""
    module, head = task_model.module, set(task_model.head_names)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if name in head or not param.is_floating_point() or any(name.endswith(s) for s in exclude):
            continue
        parent, _, attr = name.rpartition(".")
        owners.setdefault(id(param), []).append((name, module.get_submodule(parent), attr))
    return list(owners.values())


def apply(task_model: TaskModel, config: Config) -> None:
    if config.projection not in KINDS:
        raise UserError(f"intrinsic: unknown projection '{config.projection}': choose {', '.join(KINDS)}")
    if config.dim < 1:
        raise UserError(f"intrinsic: dim must be at least 1, got {config.dim}")
    module = task_model.module
    if hasattr(module, MODULE):
        raise UserError("intrinsic: this model already has a subspace")
    tensors = subspace_parameters(task_model, tuple(config.exclude))
    if not tensors:
        raise UserError("intrinsic: no backbone weights left to train in a subspace")
    sizes = [getattr(owners[0][1], owners[0][2]).numel() for owners in tensors]
    subspace = Subspace(sizes, config, task_model.device())
    setattr(module, MODULE, subspace)
    for index, owners in enumerate(tensors):
        getattr(owners[0][1], owners[0][2]).requires_grad_(False)  # θ0 stays fixed: only θ_d moves it
        for _, owner, attr in owners:
            parametrize.register_parametrization(owner, attr, Shifted(subspace, index), unsafe=True)
    module.register_forward_pre_hook(_fresh_graph(subspace))
    module.no_prefix_cache = True  # every layer changes: nothing frozen at the bottom to cache
    train_head(task_model)


def _fresh_graph(subspace: Subspace):
    """Training forwards recompute Δθ (autograd frees the last graph after backward); no-grad forwards
    reuse it until θ_d changes."""

    def hook(*_):
        if torch.is_grad_enabled():
            subspace.reset()

    return hook


def subspace_of(task_model: TaskModel) -> Subspace:
    return getattr(task_model.module, MODULE)


def full_dim(task_model: TaskModel) -> int:
    """D: how many backbone numbers the subspace moves."""
    return subspace_of(task_model).projection.full_dim
