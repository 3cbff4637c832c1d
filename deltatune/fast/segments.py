"""Per-example attention of packed rows: each example's queries meet its own keys only, computed on the
example alone instead of on the whole row under a block-diagonal mask.

    packed row (T = 12)        a a a a a b b b c c c c        the mask way: one (T, T) score matrix per
    position_ids               0 1 2 3 4 0 1 2 0 1 2 3        head, most of it masked out (cost ~ T²)
    segments                   a: 0..5   b: 5..8   c: 8..12   this way: each example's own (l, l) scores
                                                              (cost ~ Σ l²), examples of similar length
    bucket of width 8 (pads)   a a a a a · · ·                batched together, padded to a multiple of
                               c c c c · · · ·                BUCKET (a causal mask that also hides the
                               b b b · · · · ·                padded keys)

The output of every example is exactly what the mask way gives (masked scores are exp(-inf) = 0 there
too). Packed rows of examples about l tokens long in rows of T tokens cost about l / T of the mask way's
attention.

`PackedSegments` is a KV context (fast/attention.py's `attend`): the training forward puts it under
KV_KWARG and transformers hands it to deltatune's attention functions; with transformers' own attention
(--attention eager/sdpa) it is not passed, and the block-diagonal mask does the same job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BUCKET = 32
"""Examples are batched with others whose length rounds up to the same multiple of BUCKET tokens."""


@dataclass
class _Bucket:
    index: torch.Tensor  # (n, L) flat (row * T + t) positions of n examples, padded with position 0
    keep: torch.Tensor  # (m,) which of the n * L bucket slots are real tokens
    dest: torch.Tensor  # (m,) their flat positions in the batch
    mask: torch.Tensor  # (n, 1, L, L) bool: causal, and no padded key


class PackedSegments:
    """Where each packed example sits in a (B, T) batch, and attention over each alone."""

    def __init__(self, spans: list[tuple[int, int, int]], width: int, device: torch.device | str = "cpu"):
        # spans: (row, start, length) of every example; width: T
        self.width = width
        by_width: dict[int, list[tuple[int, int, int]]] = {}
        for span in spans:
            by_width.setdefault(-(-span[2] // BUCKET) * BUCKET, []).append(span)
        self.buckets = [self._bucket(members, size, device) for size, members in sorted(by_width.items())]

    def _bucket(self, members: list[tuple[int, int, int]], size: int, device) -> _Bucket:
        offsets = torch.arange(size)  # (L,)
        starts = torch.tensor([row * self.width + start for row, start, _ in members])  # (n,)
        lengths = torch.tensor([length for *_, length in members])  # (n,)
        real = offsets[None, :] < lengths[:, None]  # (n, L)
        index = torch.where(real, starts[:, None] + offsets[None, :], 0)  # (n, L)
        causal = torch.ones(size, size, dtype=torch.bool).tril()  # (L, L)
        mask = causal[None, None] & real[:, None, None, :]  # (n, 1, L, L)
        keep = real.flatten().nonzero().squeeze(1)  # (m,)
        return _Bucket(index.to(device), keep.to(device), index.flatten()[keep].to(device), mask.to(device))

    @classmethod
    def from_position_ids(cls, positions: torch.Tensor) -> PackedSegments:
        """From a packed batch's (B, T) position_ids, which restart at 0 with every example (a row's
        trailing padding is a run of its own, so it is a segment too: it attends to itself only)."""
        b, t = positions.shape
        starts = (positions == 0).cpu()  # (B, T)
        spans = []
        for row in range(b):
            at = starts[row].nonzero().squeeze(1).tolist() + [t]
            spans += [(row, a, z - a) for a, z in zip(at, at[1:])]
        return cls(spans, t, positions.device)

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, kernel, scaling: float, dropout: float) -> torch.Tensor:
        # query (B, h, T, d), key / value (B, hk, T, d) -> (B, h, T, d); `mask` (the row's) is not needed
        b, h, t, d = query.shape
        flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]  # (B·T, heads, d)
        outs, dests = [], []
        for bucket in self.buckets:
            q, k, v = (x[bucket.index].transpose(1, 2) for x in flat)  # (n, heads, L, d)
            o = kernel(q, k, v, bucket.mask, scaling, dropout)  # (n, h, L, d)
            outs.append(o.transpose(1, 2).reshape(-1, h, d)[bucket.keep])  # (m, h, d)
            dests.append(bucket.dest)
        out = query.new_zeros(b * t, h, d).index_copy(0, torch.cat(dests), torch.cat(outs))  # (B·T, h, d)
        return out.view(b, t, h, d).transpose(1, 2)  # (B, h, T, d)
