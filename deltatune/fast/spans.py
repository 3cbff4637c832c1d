"""Attention over the key span each block of queries attends: what a causal or packed mask removes is
never computed.

    mask (B|1, 1, T, Tk) ──> per query row i: first and last attended key, lo_i and hi_i
    query blocks [s, e): a new block at each packed example's start (lo_i = i) and every BLOCK rows
    block [s, e) attends keys [min lo, max hi) only; every other score of its rows is masked anyway:
        S_b = (Q_b · scale) K[lo:hi]ᵀ + mask[s:e, lo:hi]     (B, hk, g·(e−s), hi−lo)
        O_b = softmax(S_b) V[lo:hi]                           (B, hk, g·(e−s), d)

Two plans, the cheaper one runs (or the dense product, when neither saves enough):
    shared    blocks of BLOCK rows, spans the union over the batch's rows: one batched product per block
              (length-bucketed rows: the causal triangle's blocks past the diagonal, 1/4 of S at 256)
    per row   each row its own blocks, cut at its packed examples' starts: a packed row of 256 tokens
              holding ~100-token examples computes ~40% of S, where the shared union would keep most of it
The cost model counts score elements plus a fixed cost per block (the Python and kernel-launch overhead
of the block's few small matmuls), measured on a 1-thread CPU (benchmarks/RESULTS.md, session 13).

Exact: a block's softmax sees the same live keys as the dense row; a block holding a query row that
attends no key at all (left padding's first positions) keeps every key, as the dense softmax would.
The spans are read once per mask (every layer of a forward receives the same mask tensor). The blocks
run as one autograd node (fast/blockwise.py `block_attention`, keeping each block's P for backward).
"""

from __future__ import annotations

import weakref

import torch

BLOCK = 128
"""Query rows per block at most: small enough to skip the causal triangle, large enough to keep the
matmuls efficient."""
BLOCK_COST = 4096
"""The overhead of one block's products (one batch row or all of them), in score elements per head."""
MIN_SAVING = 0.8
"""Blocks run only when they cost at most this share of the dense product."""
MIN_QUERIES = 2 * 64
"""Fewer query rows than this are never split (decoding steps, short rows)."""

Span = tuple[int, int, int, int]  # query rows [s, e), keys [lo, hi)
Block = tuple[slice, int, int, int, int]  # (batch rows, s, e, lo, hi): what blockwise.block_attention runs

_last: tuple | None = None
"""(weakref to the last mask, (B, T, Tk), its plan): a forward's layers share one mask. One tuple, read
and replaced whole, so threads decoding side by side never pair one mask with another's plan."""


def live_keys(mask: torch.Tensor) -> torch.Tensor:
    """(B|1, T, Tk) bool: True where a query attends a key (a bool mask, or an additive one above its
    dtype's most negative half)."""
    m = mask[:, 0]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def key_bounds(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) (B|1, T): each query row's first and one-past-last attended key; a row attending none
    gets (0, Tk), the whole row, as the dense softmax spreads it."""
    tk = live.shape[-1]
    idx = torch.arange(tk, device=live.device)
    lo = torch.where(live, idx, tk).amin(-1)
    hi = torch.where(live, idx, -1).amax(-1) + 1
    none = hi == 0
    return lo.masked_fill(none, 0), hi.masked_fill(none, tk)


def block_span(mask_b: torch.Tensor | None, tk: int) -> tuple[int, int]:
    """[lo, hi): the keys any query row of this block (B|1, 1, [1,] bq, Tk) attends (blockwise.py)."""
    if mask_b is None:
        return 0, tk
    lo, hi = key_bounds(live_keys(mask_b.reshape(mask_b.shape[0], 1, -1, tk)))
    return int(lo.min()), int(hi.max())


def _row_blocks(lo: list[int], hi: list[int], cuts: bool) -> list[Span]:
    spans, s = [], 0
    for i in range(1, len(lo) + 1):
        if i == len(lo) or i - s >= BLOCK or (cuts and lo[i] == i):
            spans.append((s, i, min(lo[s:i]), max(hi[s:i])))
            s = i
    return spans


def _cost(spans: list[Span], rows: int = 1) -> int:
    """Score elements of `rows` batch rows computed over these spans, plus one overhead per block."""
    return sum(rows * (e - s) * (hi - lo) + BLOCK_COST for s, e, lo, hi in spans)


def _saves(cost: int, batch: int, t: int, tk: int) -> bool:
    """Do blocks of this cost beat the dense product by MIN_SAVING?"""
    return cost <= MIN_SAVING * _cost([(0, t, 0, tk)], batch)


def plan(mask: torch.Tensor | None, batch: int, t: int, tk: int) -> list[Block] | None:
    """The cheaper of the shared and per-row blocks for this mask, or None (dense) when neither costs
    at most MIN_SAVING of the dense product."""
    if mask is None or t < MIN_QUERIES:
        return None
    global _last
    last = _last
    if last is not None and last[0]() is mask and last[1] == (batch, t, tk):
        return last[2]
    lo, hi = key_bounds(live_keys(mask[..., :tk]))  # (B|1, T)
    shared = _row_blocks(lo.amin(0).tolist(), hi.amax(0).tolist(), cuts=False)
    options = [(_cost(shared, batch), [(slice(None), *span) for span in shared])]
    if lo.shape[0] == batch:  # a mask per row: packed rows differ in where their examples start
        rows = [_row_blocks(lo[r].tolist(), hi[r].tolist(), cuts=True) for r in range(batch)]
        options.append((sum(_cost(r) for r in rows),
                        [(slice(r, r + 1), *span) for r, spans in enumerate(rows) for span in spans]))
    cost, best = min(options, key=lambda o: o[0])
    chosen = best if _saves(cost, batch, t, tk) else None
    _last = (weakref.ref(mask), (batch, t, tk), chosen)
    return chosen


def causal_columns(batch: int, t: int, tk: int) -> float:
    """Mean keys per query row that a causal batch's scores span (the shared plan, or every key when
    it stays dense): the estimator's probabilities per row. Keys before the row's own (a prefix) count
    for every row."""
    if t < MIN_QUERIES:
        return tk
    shared = _row_blocks([0] * t, [tk - t + i + 1 for i in range(t)], cuts=False)  # row i: keys [0, prefix + i]
    if not _saves(_cost(shared, batch), batch, t, tk):
        return tk
    return sum((e - s) * (hi - lo) for s, e, lo, hi in shared) / t
