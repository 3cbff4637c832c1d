"""Attention that keeps no T x Tk probability matrix for backward (FlashAttention's recomputation, in torch).

    forward, per block of queries (all heads):                 saved for backward: Q, K, V, O, L
        S = Q_b Kᵀ · scale + mask_b          (B, hk, g, bq, Tk)
        L_b = logsumexp(S)                   (B, hk, g, bq)     the row log-sum-exp, fp32
        O_b = exp(S − L_b) V                 (B, hk, g, bq, d)
    backward, per block of queries:
        P = exp(Q_b Kᵀ · scale + mask_b − L_b)                  recomputed, never stored
        dV += Pᵀ dO_b         dP = dO_b Vᵀ
        dS = P ⊙ (dP − rowsum(dO_b ⊙ O_b))
        dQ_b = dS K · scale   dK += dSᵀ Q_b · scale

Grouped-query attention needs no copies of K and V: the g = h / hk query heads of one key/value head
share them. The additive mask (B or 1, 1, T, Tk) carries causality, padding, soft-prompt and prefix
positions, and packed sequences alike: whatever transformers' mask function built. Blocks are sized
so that one block's S stays near BLOCK_ELEMENTS values (a few MB, cache-friendly on a CPU).
What it costs: one more Q Kᵀ matmul in backward; what it saves: the (B, h, T, Tk) P of every layer,
which at 2,048 tokens is ~75 MB per SmolLM2 layer in bf16. `explicit_attention` chooses it when P
would be large (see fast/attention.py); on CUDA, SDPA's flash / memory-efficient kernels do this.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 21
"""Target size of one block's score tensor S (2M values: 8 MB in fp32)."""


def block_size(b: int, h: int, t: int, tk: int) -> int:
    return max(16, min(t, BLOCK_ELEMENTS // max(1, b * h * tk)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and K/V gradient sums: fp32, or the inputs' dtype when wider (fp64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q_b, k, mask_b, scale):
    # q_b: (B, hk, g, bq, d), k: (B, hk, Tk, d) -> S (B, hk, g, bq, Tk) in fp32 (or wider)
    b, hk, g, bq, d = q_b.shape
    s = torch.matmul(q_b.reshape(b, hk, g * bq, d), k.transpose(-1, -2)).view(b, hk, g, bq, -1)
    s = s.to(acc_dtype(q_b.dtype))
    s.mul_(scale)
    if mask_b is not None:
        s += mask_b  # (B|1, 1, 1, bq, Tk)
    return s


class BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float):
        # q: (B, h, T, d), k, v: (B, hk, Tk, d), mask: (B|1, 1, T, Tk) additive or None -> (B, h, T, d)
        b, h, t, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = h // hk
        q5 = q.view(b, hk, g, t, d)
        acc = acc_dtype(q.dtype)
        m5 = mask.unsqueeze(2).to(acc) if mask is not None else None  # (B|1, 1, 1, T, Tk)
        out = torch.empty_like(q5)
        lse = q.new_empty((b, hk, g, t), dtype=acc)
        step = block_size(b, h, t, tk)
        for start in range(0, t, step):
            rows = slice(start, start + step)
            s = _scores(q5[:, :, :, rows], k, m5[..., rows, :] if m5 is not None else None, scale)
            lse_b = torch.logsumexp(s, dim=-1)  # (B, hk, g, bq)
            p = torch.exp(s - lse_b.unsqueeze(-1)).to(v.dtype)
            bq = p.shape[3]
            out[:, :, :, rows] = torch.matmul(p.view(b, hk, g * bq, tk), v).view(b, hk, g, bq, d)
            lse[:, :, :, rows] = lse_b
        ctx.save_for_backward(q, k, v, out, lse, mask if mask is not None else torch.empty(0))
        ctx.scale, ctx.has_mask = scale, mask is not None
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        scale = ctx.scale
        b, h, t, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = h // hk
        q5, do5 = q.view(b, hk, g, t, d), grad_out.reshape(b, hk, g, t, d).to(q.dtype)
        acc = acc_dtype(q.dtype)
        m5 = mask.unsqueeze(2).to(acc) if ctx.has_mask else None
        dq = torch.empty_like(q5)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        step = block_size(b, h, t, tk)
        for start in range(0, t, step):
            rows = slice(start, start + step)
            q_b, do_b = q5[:, :, :, rows], do5[:, :, :, rows]  # (B, hk, g, bq, d)
            bq = q_b.shape[3]
            s = _scores(q_b, k, m5[..., rows, :] if m5 is not None else None, scale)
            p = torch.exp(s - lse[:, :, :, rows].unsqueeze(-1))  # (B, hk, g, bq, Tk) in acc
            flat_p = p.to(v.dtype).view(b, hk, g * bq, tk)
            flat_do = do_b.reshape(b, hk, g * bq, d)
            dv += torch.matmul(flat_p.transpose(-1, -2), flat_do).to(acc)  # (B, hk, Tk, d)
            dp = torch.matmul(flat_do, v.transpose(-1, -2)).view(b, hk, g, bq, tk).to(acc)
            delta = (do_b.to(acc) * out[:, :, :, rows].to(acc)).sum(-1, keepdim=True)  # (B, hk, g, bq, 1)
            ds = (p * (dp - delta) * scale).to(q.dtype).view(b, hk, g * bq, tk)
            dq[:, :, :, rows] = torch.matmul(ds, k).view(b, hk, g, bq, d)
            dk += torch.matmul(ds.transpose(-1, -2), q_b.reshape(b, hk, g * bq, d)).to(acc)
        return dq.view(b, h, t, d), dk.to(k.dtype), dv.to(v.dtype), None, None


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v without keeping the probabilities: (B, h, T, d)."""
    return BlockwiseAttention.apply(q, k, v, mask, scale)
