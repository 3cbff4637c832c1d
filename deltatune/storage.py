"""Frozen-weight storage: how a frozen projection keeps its weight, and multiplies by it.

    storage      the frozen weight is stored as          linear(x) computes in   returns
    ───────────  ──────────────────────────────────────  ──────────────────────  ───────
    FP32Weight   fp32, as loaded                         fp32                    fp32
    BF16Weight   bf16 (half the memory); a trainable     bf16                    bf16
                 weight stays an fp32 master, cast per call
    NF4Weight    4-bit NormalFloat, blocks of 64, double-    bf16 or fp32            input's
                 quantised absmax (storage_bnb.py; QLoRA)                            dtype
    FP4Weight    4-bit float, same layout (storage_bnb.py)   bf16 or fp32            input's
    Int8Weight   int8 per output row, absmax scale           bf16 or fp32            input's
                 (storage_bnb.py; LLM.int8's storage)
    HQQ2Weight   2 / 3 bits, groups of 64 with a bf16 scale  bf16 or fp32            input's
    HQQ3Weight   and zero (half-quadratic fit; storage_hqq.py)

A quantised storage (`QuantizedWeight`) replaces its source's frozen `weight` in place by the packed
tensor (same Parameter object and name, now an integer tensor, so the fp32 values are freed) and keeps
its scales beside it; `dequantize()` rebuilds the (out, in) weight, and its matmul keeps only the
packed tensor for backward (`_DequantLinear`: dx = dy W, W dequantised again), never a full copy.

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


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W dequantised in forward and again in backward: no full-size weight is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kept: QuantizedWeight) -> torch.Tensor:
        # x: (N, in) in the compute dtype -> (N, out)
        ctx.kept = kept
        return x @ kept.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # grad: (N, out) -> dx (N, in); the frozen weight gets no gradient
        return grad @ ctx.kept.dequantize(grad.dtype), None


class QuantizedWeight(FrozenWeight):
    """A frozen weight stored in fewer bits: `quantize` packs the source's fp32 weight once, at attach
    time; `linear` computes in `compute_dtype` (bf16 or fp32) and returns the input's dtype."""

    bits: ClassVar[float]
    """Stored bits per weight, scales included (the estimator's and the benchmark's figure)."""

    def __init__(self, source: WeightSource, compute_dtype: torch.dtype = torch.float32,
                 transposed: bool | None = None):
        super().__init__(source, transposed)
        self.dtype = compute_dtype  # type: ignore[misc]  # an instance's compute dtype
        if source.weight.requires_grad:
            raise ValueError("a trainable weight cannot be stored quantised")
        weight = super().dequantize()  # (out, in) fp32, as loaded
        self.shape = tuple(weight.shape)
        packed, self.state = self.quantize(weight)
        source.weight.data = packed  # the Parameter and its name stay; the fp32 values are freed

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(out, in) fp32 -> (packed tensor, the state `dequantize` needs)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight rebuilt from the packed tensor, in `dtype`."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything stored: the packed weight and its scales (fingerprinted, counted in nbytes)."""
        return {"packed": self.source.weight}

    def to_store(self) -> list[nn.Parameter]:
        return []  # stored already

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out) in x's dtype, computed in self.dtype
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)  # (N, in)
        out = _DequantLinear.apply(flat, self)  # (N, out)
        if self.source.bias is not None:
            out = out + self.source.bias.to(self.dtype)
        return out.view(*x.shape[:-1], self.shape[0]).to(x.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.name} storage holds projections, not embeddings")

    @property
    def nbytes(self) -> int:
        stored = list(self.tensors().values()) + ([self.source.bias] if self.source.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in stored)


KINDS: dict[str, type[FrozenWeight] | str] = {
    "fp32": FP32Weight, "bf16": BF16Weight,
    "nf4": "deltatune.storage_bnb:NF4Weight", "fp4": "deltatune.storage_bnb:FP4Weight",
    "int8": "deltatune.storage_bnb:Int8Weight",
    "2bit": "deltatune.storage_hqq:HQQ2Weight", "3bit": "deltatune.storage_hqq:HQQ3Weight",
    "q4_1": "deltatune.storage_gguf:Q41Weight",
}
"""Storage classes by name; a quantised kind is named by its module (bitsandbytes and hqq are imported
only when used): `kind_class` resolves it."""


def kind_class(name: str) -> type[FrozenWeight]:
    """The storage class of a kind in KINDS (imports its library on first use)."""
    found = KINDS[name]
    if isinstance(found, str):
        import importlib

        module, _, cls = found.partition(":")
        found = KINDS[name] = getattr(importlib.import_module(module), cls)
    return found


def is_quantized(module: nn.Module) -> bool:
    """Whether a module computes through a quantised storage (its weight is packed, not a float)."""
    return isinstance(module.__dict__.get("frozen_weight"), QuantizedWeight)


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
