"""Attention computed block by block of queries, one autograd node for all blocks; for long sequences it
keeps no T x Tk probability matrix for backward (FlashAttention's recomputation, in torch).

    forward, per block of queries (all heads):                 saved for backward: Q, K, V, mask
                                                               (+ each block's P when keep=True)
        S = (Q_b · scale) Kᵀ + mask_b        (B, hk, g·bq, Tk)
        P = softmax(S)                       fused kernel: input dtype, fp32 sums (as explicit attention)
        O_b = P V                            (B, hk, g·bq, d)
    backward, per block of queries:
        P = softmax((Q_b · scale) Kᵀ + mask_b)                  recomputed (keep=False) or the saved one
        dV += Pᵀ dO_b         dP = dO_b Vᵀ
        dS = P ⊙ (dP − rowsum(dP ⊙ P))       torch's fused softmax backward
        dQ_b = dS K · scale   dK += dSᵀ (Q_b · scale)

Grouped-query attention needs no copies of K and V: the g = h / hk query heads of one key/value head
are stacked into one (g·bq, d) matrix, as in explicit attention. The additive mask (B or 1, 1, T, Tk)
carries causality, padding, soft-prompt and prefix positions and packed sequences alike: whatever
transformers' mask function built; a block skips the keys outside the span its rows attend
(`spans.block_span`: the causal upper triangle, about half of S at long sequences, and the other
examples of a packed row). Blocks are sized so that one block's S stays near BLOCK_ELEMENTS
values (a few MB, cache-friendly on a CPU). What it costs: one more Q Kᵀ matmul and softmax in
backward; what it saves: the (B, h, T, Tk) P of every layer, ~75 MB per SmolLM2 layer at 2,048 tokens
in bf16. `explicit_attention` chooses it when P would be large (fast/attention.py); on CUDA, SDPA's
flash / memory-efficient kernels do the same job.
"""

from __future__ import annotations

import torch

from deltatune.fast.spans import block_span

BLOCK_ELEMENTS = 1 << 22
"""Target size of one block's score tensor S (4M values: 8 MB in bf16)."""


def block_size(b: int, h: int, t: int, tk: int) -> int:
    return max(16, min(t, BLOCK_ELEMENTS // max(1, b * h * tk)))


def _probs(q_b: torch.Tensor, k: torch.Tensor, mask_b: torch.Tensor | None) -> torch.Tensor:
    # q_b (pre-scaled): (B, hk, g, bq, d), k: (B, hk, Tk, d), mask_b (B|1, 1, 1, bq, Tk) -> P (B, hk, g·bq, Tk)
    b, hk, g, bq, d = q_b.shape
    s = torch.matmul(q_b.reshape(b, hk, g * bq, d), k.transpose(-1, -2))  # (B, hk, g·bq, Tk)
    if mask_b is not None:
        s = (s.view(b, hk, g, bq, -1) + mask_b.to(s.dtype)).view(b, hk, g * bq, -1)  # mask: (B|1, 1, 1, bq, Tk)
    return torch.softmax(s, dim=-1)


Block = tuple[slice, int, int, int, int]
"""(batch rows, query rows [s, e), keys [lo, hi)): one block's product."""


def _select(mask5: torch.Tensor | None, rows: slice, s: int, e: int, lo: int, hi: int) -> torch.Tensor | None:
    """The block's (B|1, 1, 1, e−s, hi−lo) slice of the (B|1, 1, 1, T, Tk) mask (a one-row mask serves all)."""
    if mask5 is None:
        return None
    return mask5[rows if mask5.shape[0] > 1 else slice(None), ..., s:e, lo:hi]


class BlockAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v over the given blocks (every query row in exactly one), one autograd
    node for all of them: dK and dV accumulate in place (no per-block slice gradients). keep=True saves
    each block's P (short sequences, fast/spans.py); keep=False recomputes it in backward (long ones)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, blocks: list[Block], keep: bool):
        # q: (B, h, T, d), k, v: (B, hk, Tk, d), mask: (B|1, 1, T, Tk) additive or None -> (B, h, T, d)
        b, h, t, d = q.shape
        hk = k.shape[1]
        g = h // hk
        qs = (q * scale).view(b, hk, g, t, d)
        m5 = mask.unsqueeze(2) if mask is not None else None  # (B|1, 1, 1, T, Tk)
        out = torch.empty_like(qs)
        probs = []
        for rows, s, e, lo, hi in blocks:
            p = _probs(qs[rows, :, :, s:e], k[rows, :, lo:hi], _select(m5, rows, s, e, lo, hi))  # (b', hk, g·bq, n)
            out[rows, :, :, s:e] = torch.matmul(p.to(v.dtype), v[rows, :, lo:hi]).view(p.shape[0], hk, g, -1, d)
            if keep:
                probs.append(p)
        ctx.save_for_backward(qs, k, v, mask if mask is not None else torch.empty(0))
        ctx.scale, ctx.has_mask, ctx.blocks, ctx.probs = scale, mask is not None, blocks, probs
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, mask = ctx.saved_tensors
        b, hk, g, t, d = qs.shape
        do5 = grad_out.reshape(b, hk, g, t, d).to(qs.dtype)
        m5 = mask.unsqueeze(2) if ctx.has_mask else None
        dq = torch.empty_like(qs)
        acc = torch.promote_types(k.dtype, torch.float32)  # K/V gradients summed over blocks in fp32
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for i, (rows, s, e, lo, hi) in enumerate(ctx.blocks):
            q_b = qs[rows, :, :, s:e]  # (b', hk, g, bq, d)
            n, bq = q_b.shape[0], e - s
            k_b, v_b = k[rows, :, lo:hi], v[rows, :, lo:hi]  # keys outside [lo, hi) get nothing from this block
            p = ctx.probs[i] if ctx.probs else _probs(q_b, k_b, _select(m5, rows, s, e, lo, hi))  # (b', hk, g·bq, n)
            do_b = do5[rows, :, :, s:e].reshape(n, hk, g * bq, d)
            dv[rows, :, lo:hi] += torch.matmul(p.transpose(-1, -2).to(do_b.dtype), do_b)  # (b', hk, n, d)
            dp = torch.matmul(do_b, v_b.transpose(-1, -2)).to(p.dtype)  # (b', hk, g·bq, n)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[rows, :, :, s:e] = torch.matmul(ds, k_b).view(n, hk, g, bq, d)
            dk[rows, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), q_b.reshape(n, hk, g * bq, d))
        ctx.probs = None
        dq = (dq * ctx.scale).view(b, hk * g, t, d)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    blocks: list[Block], keep: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over `blocks`: (B, h, T, d)."""
    return BlockAttention.apply(q, k, v, mask, scale, blocks, keep)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v without keeping the probabilities: (B, h, T, d). Blocks of
    `block_size` query rows over all batch rows, each over the key span its rows attend."""
    b, h, t, _ = q.shape
    tk = k.shape[2]
    step = block_size(b, h, t, tk)
    m5 = mask.unsqueeze(2) if mask is not None else None
    blocks = [(slice(None), s, min(s + step, t), *block_span(m5[..., s:s + step, :] if m5 is not None else None, tk))
              for s in range(0, t, step)]
    return block_attention(q, k, v, mask, scale, blocks, keep=False)
