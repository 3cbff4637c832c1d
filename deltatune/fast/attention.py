"""Attention for training on the CPU: two matmuls and an fp32 softmax, registered with transformers.

    q (B, h, T, d) ─ ·d^-½ ─┐
                           matmul ──> S (B, h, T, Tk) ──> + mask, softmax (fp32 sums) ──> P ──────┐
    k (B, hk, Tk, d) ──────┘                                                                   matmul ──> o
    v (B, hk, Tk, d) ─────────────────────────────────────────────────────────────────────────┘

At training shapes (T <= a few hundred) this beats torch's SDPA on the CPU, whose flash-attention
backward (chosen when attention dropout is 0) dominates a step. Grouped-query attention needs no
copies: the g = h / hk query heads of one key/value head are stacked into one (g·T, d) matrix.
The softmax takes and returns the compute dtype (bf16: P saved for backward at half the size) and
accumulates in fp32 inside torch's kernels, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "deltatune_explicit"
CHOICES = ("auto", "explicit", "sdpa", "eager", "model")
"""auto: explicit on the CPU, sdpa on CUDA; eager / sdpa: transformers' own; model: leave as loaded."""


def explicit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: returns ((B, T, h, d), None)."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("explicit attention supports neither softcap nor position_bias")
    b, h, t, d = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    groups = h // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    q = (query * scale).reshape(b, kv_heads, groups * t, d)  # query heads of one k/v head stacked
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, h, t, tk)  # (B, h, T, Tk)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :tk].to(scores.dtype)  # 0 or the dtype's most negative value
    probs = torch.softmax(scores, dim=-1)  # (B, h, T, Tk); bf16 in and out, accumulated in fp32
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(b, kv_heads, groups * t, tk), value).view(b, h, t, d)  # (B, h, T, d)
    return out.transpose(1, 2).contiguous(), None  # (B, T, h, d)


def explicit_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' eager additive mask: 0 where attended, the most negative bf16 (which fp32 can hold
    too) elsewhere, so one mask serves both compute dtypes."""
    from transformers.masking_utils import eager_mask

    kwargs["dtype"] = torch.bfloat16
    return eager_mask(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, explicit_attention)
    AttentionMaskInterface.register(NAME, explicit_mask)


def resolve(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "sdpa" if device.type == "cuda" else "explicit"
    return requested


def pretrained(module: nn.Module) -> nn.Module | None:
    from transformers import PreTrainedModel

    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def set_attention(module: nn.Module, choice: str) -> tuple[str, str | None]:
    """Switch the model's attention implementation; returns (the one in use, the one before) (the model's
    own when it cannot switch, e.g. T5 with its position bias)."""
    model = pretrained(module)
    if model is None:
        return "model", None
    current = model.config._attn_implementation
    if choice == "model" or not getattr(model, "_supports_attention_backend", False):
        return current, None
    name = NAME if choice == "explicit" else choice
    if name == NAME:
        register()
    model.set_attn_implementation(name)
    now = model.config._attn_implementation
    return ("explicit" if now == NAME else now), current


def reset_attention(module: nn.Module, previous: str | None) -> None:
    if previous is not None:
        pretrained(module).set_attn_implementation(previous)
