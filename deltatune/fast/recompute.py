"""RMSNorm recomputed in backward: it keeps its bf16 input instead of an fp32 copy of it.

Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019): y = w ⊙ x / sqrt(mean(x²) + ε).
transformers' Llama-family RMSNorm computes it in fp32 from a bf16 stream:

    x (N, H) bf16 ──.float()──> x32 (N, H) fp32 ──> x32 · rsqrt(mean(x32²) + ε) ──> w ⊙ (·).to(bf16)

and autograd keeps x32 (for pow and the product) and the (N, 1) rsqrt: twice the bytes of the input
it came from, 4.7 MB per norm at 2,048 tokens for SmolLM2 (H = 576), 283 MB over its 61 norms. Here
each norm runs under non-reentrant activation checkpointing (torch.utils.checkpoint): the forward
keeps nothing but x (2.4 MB, bf16) and backward reruns the norm's own forward, elementwise work over
(N, H), before its gradient. The ops are the norm's own, so values and gradients are bitwise those of
the plain norm. Only in training (grad enabled and an input that needs it); a norm computing in its
input's dtype (LayerNorm's fused kernel keeps x and two (N, 1) statistics) gains nothing and is left.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deltatune.fast.forwards import long_rows, replace_forward, restore_forward


def is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower() and "forward" not in module.__dict__


def _recomputed_forward(norm: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # hidden: (..., H) -> (..., H); saved for backward: hidden only
    plain = type(norm).forward
    if torch.is_grad_enabled() and hidden.requires_grad and long_rows(hidden):  # forwards.LONG_ROWS
        return checkpoint(plain, norm, hidden, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return plain(norm, hidden, *args, **kwargs)


def recompute_rms_norms(module: nn.Module, among: set[nn.Module] | None = None) -> list[nn.Module]:
    """Every RMSNorm under `module` (of `among`, if given) runs as above; returns them (for `restore_norms`)."""
    return replace_forward([m for m in module.modules() if is_rms_norm(m) and (among is None or m in among)],
                           _recomputed_forward)


restore_norms = restore_forward
