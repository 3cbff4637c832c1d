"""deltatune's attention functions, registered with transformers: training on the CPU, and every
forward that carries extra keys/values (a prefix, a decode loop's KV cache).

    q (B, h, T, d) ─ ·d^-½ ─┐
                           matmul ──> S (B, h, T, Tk) ──> + mask, softmax (fp32 sums) ──> P ──────┐
    k (B, hk, Tk, d) ──────┘                                                                   matmul ──> o
    v (B, hk, Tk, d) ─────────────────────────────────────────────────────────────────────────┘

At training shapes (T <= a few hundred) this beats torch's SDPA on the CPU, whose flash-attention
backward (chosen when attention dropout is 0) dominates a step. From BLOCKWISE_MIN = T x Tk on, a
training forward keeps no probabilities: blockwise.py recomputes them block by block in backward. Grouped-query attention needs no
copies: the g = h / hk query heads of one key/value head are stacked into one (g·T, d) matrix.
The softmax takes and returns the compute dtype (bf16: P saved for backward at half the size) and
accumulates in fp32 inside torch's kernels, forward and backward.

Extra keys/values: a forward may carry a context object under the keyword `KV_KWARG`; transformers
hands every extra keyword of a model's forward down to its attention functions (and gradient
checkpointing replays them), so the context reaches each layer without touching transformers' cache
argument. The context's `attend(module, q, k, v, mask, kernel, scaling, dropout)` decides what each
attention module reads (the prefix or cached keys before the new ones, and the mask over them) and
calls `kernel`: the explicit matmuls on the CPU, torch's SDPA on CUDA (`kernel_for`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.fast import spans
from deltatune.fast.blockwise import block_attention, blockwise_attention

NAME = "deltatune_explicit"
SDPA_NAME = "deltatune_sdpa"
OURS = (NAME, SDPA_NAME)
CHOICES = ("auto", "explicit", "sdpa", "eager", "model")
"""auto: explicit on the CPU, sdpa on CUDA; eager / sdpa: transformers' own; model: leave as loaded."""
KV_KWARG = "deltatune_kv"
"""The forward keyword that carries a `KVContext` down to the attention functions."""

Kernel = Callable[..., torch.Tensor]
BLOCKWISE_MIN = 512 * 512
"""T x Tk from which training attention keeps no probabilities for backward (blockwise.py): below it,
storing P is cheaper than recomputing it (a 128-token step is as fast as before); above it, P would be
the largest thing a step keeps (75 MB per SmolLM2 layer at 2,048 tokens)."""


class KVContext(Protocol):
    """What a forward's extra keys/values offer the attention function (a prefix, a KV cache)."""

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, kernel: Kernel, scaling: float, dropout: float) -> torch.Tensor:
        """(B, h, T, d) attention output of `module` for these new queries/keys/values."""


def explicit_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v, grouped-query heads stacked: (B, h, T, d). mask: additive
    (B|1, 1, T, ≥Tk) or bool (True: attended)."""
    b, h, t, d = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    if dropout == 0:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if grad and t * tk >= BLOCKWISE_MIN:  # long sequences in training: keep no (B, h, T, Tk) P for backward
            return blockwise_attention(query, key, value, additive(mask, tk, query.dtype), scaling)
        blocks = spans.plan(mask, b, t, tk)  # causal / packed rows: only the key span each block attends
        if blocks is not None:
            return block_attention(query, key, value, additive(mask, tk, query.dtype), scaling, blocks, keep=grad)
    groups = h // kv_heads
    q = (query * scaling).reshape(b, kv_heads, groups * t, d)  # query heads of one k/v head stacked
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, h, t, tk)  # (B, h, T, Tk)
    if mask is not None:
        mask = mask[..., :tk]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)  # 0 or the dtype's most negative value
    probs = torch.softmax(scores, dim=-1)  # (B, h, T, Tk); bf16 in and out, accumulated in fp32
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs.view(b, kv_heads, groups * t, tk), value).view(b, h, t, d)  # (B, h, T, d)


def additive(mask: torch.Tensor | None, tk: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask over the first tk keys as an additive one (a bool mask: 0 where True, dtype's min else)."""
    if mask is None:
        return None
    mask = mask[..., :tk]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sdpa_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """torch's scaled_dot_product_attention with the same arguments as `explicit_kernel`."""
    if mask is not None:
        mask = mask[..., :key.shape[2]]
        mask = mask if mask.dtype == torch.bool else mask.to(query.dtype)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each k/v head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


def kernel_for(device: torch.device) -> Kernel:
    """The explicit matmuls on the CPU, SDPA elsewhere (fused kernels on CUDA)."""
    return explicit_kernel if device.type == "cpu" else sdpa_kernel


def _attention(kernel: Kernel, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("deltatune's attention does not support softcap")
    bias = kwargs.get("position_bias")  # T5: (1|B, h, T, Tk), added to the scores like an additive mask
    if bias is not None:
        attention_mask = bias if attention_mask is None else bias + attention_mask[..., :key.shape[2]].to(bias.dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    context: KVContext | None = kwargs.get(KV_KWARG)
    if context is not None:
        out = context.attend(module, query, key, value, attention_mask, kernel, scale, dropout)
    else:
        out = kernel(query, key, value, attention_mask, scale, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, T, h, d)


def explicit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: returns ((B, T, h, d), None)."""
    return _attention(explicit_kernel, module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """The same with torch's SDPA kernel (CUDA)."""
    return _attention(sdpa_kernel, module, query, key, value, attention_mask, dropout, scaling, **kwargs)


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
    AttentionInterface.register(SDPA_NAME, sdpa_attention)
    AttentionMaskInterface.register(NAME, explicit_mask)
    AttentionMaskInterface.register(SDPA_NAME, explicit_mask)


def resolve(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "sdpa" if device.type == "cuda" else "explicit"
    return requested


def pretrained(module: nn.Module) -> nn.Module | None:
    from transformers import PreTrainedModel

    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def set_attention(module: nn.Module, choice: str) -> tuple[str, str | None]:
    """Switch the model's attention implementation; returns (the one in use, the one before) (the model's
    own when it cannot switch, e.g. T5 with its position bias). A model that needs deltatune's attention
    (a prefix: `needs_kv_attention`) keeps one of deltatune's, with the kernel `choice` asks for."""
    model = pretrained(module)
    if model is None:
        return "model", None
    current = model.config._attn_implementation
    if choice == "model" or not getattr(model, "_supports_attention_backend", False):
        return current, None
    if getattr(module, "needs_kv_attention", False) and choice in ("sdpa", "eager"):
        choice = "explicit" if choice == "eager" else SDPA_NAME
    name = NAME if choice == "explicit" else choice
    if name in OURS:
        register()
    model.set_attn_implementation(name)
    now = model.config._attn_implementation
    return ("explicit" if now == NAME else now), current


def reset_attention(module: nn.Module, previous: str | None) -> None:
    if previous is not None:
        pretrained(module).set_attn_implementation(previous)


def ensure_kv_attention(module: nn.Module) -> str | None:
    """Make the model run one of deltatune's attention functions (they read `KV_KWARG`): the explicit one
    on the CPU, SDPA elsewhere. Returns the implementation before, or None when it was already ours."""
    model = pretrained(module)
    current = model.config._attn_implementation
    if current in OURS:
        return None
    register()
    device = next(model.parameters()).device
    model.set_attn_implementation(NAME if device.type == "cpu" else SDPA_NAME)
    if model.config._attn_implementation not in OURS:
        raise NotImplementedError(f"{model.config.model_type} does not take a custom attention function")
    return current


@contextlib.contextmanager
def kv_attention(module: nn.Module) -> Iterator[None]:
    """deltatune's attention for the duration (a decode loop over a task model), the model's own after."""
    previous = ensure_kv_attention(module)
    try:
        yield
    finally:
        reset_attention(module, previous)
