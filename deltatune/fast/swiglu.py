"""The gated MLP's activation, silu(gate) ⊙ up, keeping only its two inputs for backward.

Shazeer, "GLU Variants Improve Transformer" (2020): FFN_SwiGLU(x) = W_down (silu(x W_gate) ⊙ x W_up),
silu(g) = g · σ(g). The Llama-family MLPs compute it as

    gate (N, F) ──silu──> a (N, F) ──┐
                                     ⊙ ──> m (N, F) ──> down_proj
    up   (N, F) ─────────────────────┘

and autograd keeps gate (for silu's backward), a and up (for the product's): three (T, F) tensors per
layer. `SwiGLU` keeps gate and up only and recomputes a = silu(gate) in backward (one elementwise pass):
6.3 MB less per layer at 2,048 tokens for SmolLM2 (F = 1,536, bf16), 189 MB over its 30 layers.

    ∂up   = ∂m ⊙ silu(gate)
    ∂gate = silu_backward(∂m ⊙ up, gate)         = ∂m ⊙ up ⊙ σ(g)(1 + g(1 − σ(g)))

the same kernels, in the same dtype, as autograd's own path, so gradients are bitwise those of the
unfused MLP. `fuse_swiglu` gives each MLP whose forward is exactly transformers' Llama-style
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU activation this forward (an instance
attribute, undone by `unfuse_swiglu`); its projections, and a method's wrappers around them, are called
as before, so names and deltas do not change.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.fast.forwards import long_rows, replace_forward, restore_forward

LLAMA_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
"""The MLP forward (whitespace removed) that `fuse_swiglu` replaces."""


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # gate, up: (..., F) -> silu(gate) ⊙ up (..., F); saved: gate and up, not silu(gate)
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors  # (..., F) each
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None  # silu recomputed, as forward rounded it
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up, keeping only gate and up for backward: (..., F)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLU.apply(gate, up)
    return F.silu(gate) * up


def _swiglu_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H) -> (B, T, H); short rows: the class's own forward (forwards.LONG_ROWS)
    if not long_rows(x):
        return type(mlp).forward(mlp, x)
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


@functools.cache
def _is_llama_mlp(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return LLAMA_FORWARD in re.sub(r"\s+", "", source)


def is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and "forward" not in module.__dict__ and _is_llama_mlp(type(module))


def fuse_swiglu(module: nn.Module) -> list[nn.Module]:
    """Give every Llama-style SwiGLU MLP under `module` the forward above; returns them (for `unfuse_swiglu`)."""
    return replace_forward([m for m in module.modules() if is_swiglu_mlp(m)], _swiglu_mlp_forward)


unfuse_swiglu = restore_forward
