"""The LM-head cross-entropy over chunks of the labelled positions, never holding the (T, vocab) logits.

    hidden (B, T, H) ──labels ≠ -100, shifted──> h (N, H)        prompt positions never reach the head
    for each chunk c of ≤ `chunk` rows:
        z_c = h_c Wᵀ (+ b)                   (c, V), computed in h's dtype, softmax statistics in fp32
        ℓ_c = logsumexp(z_c) − z_c[y]        summed into the loss
        ∂ℓ/∂z_c = softmax(z_c) − onehot(y)   known at once: the loss is the graph's last operation
        ∂h_c = ∂z_c W,   ∂W += ∂z_cᵀ h_c      (∂W only when the head trains)
    loss = Σ ℓ / N                           (the mean over labelled tokens, as transformers computes it)

The gradients are computed in the forward, chunk by chunk (Liger Kernel's fused linear cross-entropy
does the same), and backward only scales them by the incoming gradient, so the step costs the same
three matmuls as the unchunked head while the peak holds one (chunk, V) block instead of (T, V) logits
and their gradient. Values and gradients equal the unchunked loss within fp32 tolerance (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
DEFAULT_CHUNK = 256
"""Rows per chunk: 256 x 49,152 fp32 logits is 50 MB (75 MB with the bf16 gradient block), where a
2,048-token sequence's full logits and their gradients take 1.2 GB; the head's matmuls stay large."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        # h: (N, H), weight: (V, H), bias: (V,) or None, targets: (N,)
        n = h.shape[0]
        loss = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (
            bias is not None and bias.requires_grad) else None
        w = weight.to(h.dtype)
        b = bias.to(h.dtype) if bias is not None else None
        for start in range(0, n, chunk):
            h_c, y = h[start:start + chunk], targets[start:start + chunk]  # (c, H), (c,)
            z = F.linear(h_c, w, b).to(torch.promote_types(h.dtype, torch.float32))  # (c, V), fp32 at least
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            loss += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            g = z.sub_(lse[:, None]).exp_()  # (c, V) softmax in place: ∂ℓ/∂z = p − onehot(y), scaled by 1/N
            g[torch.arange(len(y), device=y.device), y] -= 1.0
            g /= n
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = g @ w  # (c, H)
            if grad_w is not None:
                grad_w += (g.t() @ h_c).float()  # (V, H)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out if has else None for has in ctx.has]
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor, shift: bool = True):
    """(h (N, H), targets (N,)) of the positions whose next token is labelled (causal: t predicts t + 1)."""
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    keep = labels != IGNORE  # (B, T)
    return hidden[keep], labels[keep]


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, shift: bool = True, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens: hidden (B, T, H), labels (B, T) with -100 for ignored."""
    h, targets = labelled_positions(hidden, labels, shift)
    if h.shape[0] == 0:  # no labelled token: a zero loss that still reaches the graph
        return hidden.sum() * 0.0
    return _ChunkedCrossEntropy.apply(h, weight, bias, targets, chunk)


def deferrable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's `lm_head` when its forward computes the loss through transformers' `loss_function`
    over that head (so `defer_lm_head` applies), else None (encoder-decoders, custom heads)."""
    head = getattr(model, "lm_head", None)
    if head is None or getattr(model.config, "is_encoder_decoder", False) or head is not model.get_output_embeddings() \
            or not hasattr(type(model), "loss_function"):
        return None
    return head


def defer_lm_head(model: torch.nn.Module):
    """Make a causal LM's forward return its last hidden states as `logits` and compute `loss` with the
    chunked head above; returns the undo function, or None when the model does not compute its loss
    through transformers' `loss_function` over `lm_head` (encoder-decoders, custom heads).

    Nothing is renamed: `lm_head` keeps its parameters (tied or not, trained or frozen), only its forward
    is bypassed for the duration, so deltas and peft exports are unchanged."""
    head = deferrable_head(model)
    if head is None:
        return None

    def loss(logits, labels, vocab_size=None, num_items_in_batch=None, shift_labels=None, **kwargs):
        # logits: the (B, T, H) hidden states the bypassed head passed through
        if shift_labels is not None:  # already aligned with the positions (packed rows)
            mean = chunked_lm_loss(logits, shift_labels, head.weight, head.bias, shift=False)
            scored = int((shift_labels != IGNORE).sum())
        else:
            mean = chunked_lm_loss(logits, labels, head.weight, head.bias)
            scored = int((labels[:, 1:] != IGNORE).sum())
        if num_items_in_batch is not None:  # a global token count (accumulation, ranks): sum / count
            return mean * scored / num_items_in_batch
        return mean

    previous = head.__dict__.get("forward"), model.__dict__.get("_loss_function")  # e.g. a storage's forward
    head.forward = lambda hidden: hidden
    model.loss_function = loss

    def undo() -> None:
        for owner, name, before in ((head, "forward", previous[0]), (model, "_loss_function", previous[1])):
            if before is None:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = before

    return undo


def with_deferred_head(forward, model: torch.nn.Module):
    """A training forward whose loss is the chunked one (the head deferred only inside each call: the
    backward needs no head forward, and evaluation sees the model's own logits)."""

    def deferred(batch):
        undo = defer_lm_head(model)
        try:
            return forward(batch)
        finally:
            if undo is not None:
                undo()

    return deferred
