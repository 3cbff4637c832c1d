"""Frozen-weight storage: how a frozen projection keeps its weight, and multiplies by it.

    storage      the frozen weight is stored as          linear(x) computes in   returns
    ───────────  ──────────────────────────────────────  ──────────────────────  ───────
    FP32Weight   fp32, as loaded                         fp32                    fp32
    BF16Weight   bf16 (half the memory); a trainable     bf16                    bf16
                 weight stays an fp32 master, cast per call
    (next)       nf4 / int8 (bitsandbytes), 2-3 bit (hqq): one class each, same interface

Every storage answers the same four questions (`FrozenWeight`):

    linear(x) -> y     x (..., in) -> y (..., out) = W x + b, in the storage's compute dtype
    dequantize()       the full weight as an fp32 (out, in) tensor, for merging and export
    nbytes             bytes the stored weight and bias take
    name, dtype        "bf16", torch.bfloat16 (the compute dtype)

A loaded nn.Linear, GPT-2 Conv1D or nn.Embedding computes through its storage once `attach`ed: the
module object, its class and its parameter names stay (so a method's `AdaptedLayer.base_layer`, deltas
and peft exports see no change); only its call goes to `storage.linear` (a per-instance forward, as
accelerate's hooks install theirs). `detach` puts the module's own forward back. A module without an
attached storage is fp32 storage: `storage_of` says so.

The weights are read from `source` at every call, not copied: a weight that a method turned into a
function (`torch.nn.utils.parametrize`, the `intrinsic` method) is recomputed as the method wrote it.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class WeightSource(Protocol):
    """What a storage reads its tensors from: a Linear / Conv1D / Embedding, or a fused group's tensors."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class FrozenWeight:
    """A projection's weight as stored, and `linear` through it. `transposed`: stored (in, out), as
    GPT-2's Conv1D keeps it; else (out, in) as nn.Linear."""

    name: ClassVar[str]
    dtype: ClassVar[torch.dtype]

    def __init__(self, source: WeightSource, transposed: bool | None = None):
        self.source = source
        self.transposed = isinstance(source, Conv1D) if transposed is None else transposed

    def to_store(self) -> list[nn.Parameter]:
        """The source's own frozen floating parameters this storage converts (trainable ones stay fp32
        masters, so the optimizer sees only fp32)."""
        if not isinstance(self.source, nn.Module):
            return []
        return [p for p in self.source.parameters(recurse=False)
                if not p.requires_grad and p.is_floating_point() and p.dtype != self.dtype]

    def store(self, p: nn.Parameter) -> None:
        """Convert one of `to_store()` in place (the Parameter object and its name stay)."""
        p.data = p.data.to(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out) in self.dtype
        w, b, x = _cast(self.source.weight, self.dtype), _cast(self.source.bias, self.dtype), _cast(x, self.dtype)
        if not self.transposed:
            return F.linear(x, w, b)  # w: (out, in)
        flat = x.reshape(-1, x.shape[-1])  # (N, in); w: (in, out)
        out = flat @ w if b is None else torch.addmm(b, flat, w)  # (N, out)
        return out.view(*x.shape[:-1], w.shape[1])

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) -> (B, T, H) in self.dtype; the source is an nn.Embedding
        e = self.source
        return F.embedding(ids, _cast(e.weight, self.dtype), e.padding_idx, e.max_norm, e.norm_type,
                           e.scale_grad_by_freq, e.sparse)

    def dequantize(self) -> torch.Tensor:
        w = self.source.weight.detach().float()
        return w.t() if self.transposed else w  # (out, in)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.source.weight, self.source.bias) if t is not None)


class FP32Weight(FrozenWeight):
    """The weight as loaded: what every module without an attached storage is."""

    name, dtype = "fp32", torch.float32


class BF16Weight(FrozenWeight):
    """bf16 storage and compute; the output stays bf16 (the stream's dtype on the bf16 path)."""

    name, dtype = "bf16", torch.bfloat16


KINDS: dict[str, type[FrozenWeight]] = {"fp32": FP32Weight, "bf16": BF16Weight}
"""Storage classes by name: the quantised backbone adds its kinds here."""


def is_projection(module: nn.Module) -> bool:
    """A module whose weights a storage can hold: Linear, GPT-2 Conv1D (also parametrized), Embedding."""
    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def attach(module: nn.Module, storage: FrozenWeight) -> FrozenWeight | None:
    """Make `module` compute through `storage`; returns the storage it had (None: its own forward)."""
    previous = module.__dict__.get("frozen_weight")
    module.frozen_weight = storage
    module.forward = storage.embedding if isinstance(module, nn.Embedding) else storage.linear
    return previous


def detach(module: nn.Module, previous: FrozenWeight | None = None) -> None:
    """Undo `attach`: back to `previous`, or to the module's own forward."""
    if previous is not None:
        attach(module, previous)
        return
    for attr in ("frozen_weight", "forward"):
        module.__dict__.pop(attr, None)


def storage_of(module: nn.Module) -> FrozenWeight:
    """The storage a projection computes through (FP32Weight when none is attached)."""
    return module.__dict__.get("frozen_weight") or FP32Weight(module)
