"""Attention over the key spans of query blocks (fast/spans.py): equal to the dense product under causal,
padded and packed masks, in values and gradients, and chosen only when it computes less."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_same_with_grads
from tiny import reference_attention as dense

from deltatune.fast import attention as attention_impl
from deltatune.fast import blockwise, spans

NEG = torch.finfo(torch.float64).min


def packed_mask(lengths_per_row: list[list[int]], t: int) -> torch.Tensor:
    """(B, 1, T, T) additive: block-diagonal causal, one block per example, padding after the last."""
    rows = []
    for lengths in lengths_per_row:
        allowed = torch.zeros(t, t, dtype=torch.bool)
        start = 0
        for n in lengths:
            allowed[start:start + n, start:start + n] = torch.ones(n, n).tril().bool()
            start += n
        allowed[start:, :start] = torch.ones(t - start, start).bool()  # pad queries see the real keys
        rows.append(allowed)
    allowed = torch.stack(rows)[:, None]
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, NEG)


def qkv(b, t, h=4, hk=2, d=8):
    torch.manual_seed(0)
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, hk, t, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return q, k, v


def assert_matches_dense(q, k, v, mask):
    assert_same_with_grads(attention_impl.explicit_kernel(q, k, v, mask, 0.3), dense(q, k, v, mask, 0.3), (q, k, v))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(spans, "BLOCK", 64)
    monkeypatch.setattr(spans, "BLOCK_COST", 64)


def test_packed_rows_attend_only_their_examples_spans():
    t = 256
    mask = packed_mask([[100, 90, 50], [40, 120, 96], [256]], t)
    chosen = spans.plan(mask, 3, t, t)
    assert chosen is not None and {rows.start for rows, *_ in chosen} == {0, 1, 2}  # per row: examples differ
    row0 = [tuple(span) for rows, *span in chosen if rows.start == 0]
    assert (0, 64, 0, 64) in row0 and (100, 164, 100, 164) in row0  # blocks cut at the example starts
    computed = sum((e - s) * (hi - lo) for _, s, e, lo, hi in chosen)
    assert computed < 0.5 * 3 * t * t
    assert_matches_dense(*qkv(3, t), mask)


def test_causal_padded_rows_share_blocks_and_left_padding_keeps_every_key(monkeypatch):
    monkeypatch.setattr(spans, "BLOCK_COST", 4096)  # a block's overhead outweighs row 1's 42 padded keys
    t = 192
    mask = packed_mask([[192], [150]], t)  # causal; row 1 right-padded
    chosen = spans.plan(mask, 2, t, t)
    assert chosen is not None and all(rows == slice(None) for rows, *_ in chosen)  # blocks shared by both rows
    assert chosen[0][1:] == (0, 64, 0, 64)  # the first block reads the first 64 keys only
    assert_matches_dense(*qkv(2, t), mask)
    left = packed_mask([[192], [192]], t)
    left[1, :, :, :7] = NEG  # row 1 left-padded by 7: its first 7 queries attend no key
    lo, hi = spans.key_bounds(spans.live_keys(left))
    assert (lo[1, :7] == 0).all() and (hi[1, :7] == t).all()
    assert_matches_dense(*qkv(2, t), left)


def test_bool_masks_and_the_dense_fallback():
    t = 128
    allowed = packed_mask([[128]], t) == 0
    assert_matches_dense(*qkv(1, t), allowed)  # bool mask: True attends
    full = torch.zeros(1, 1, t, t, dtype=torch.float64)  # bidirectional: no span to skip
    assert spans.plan(full, 1, t, t) is None
    assert spans.plan(packed_mask([[16]], 16), 1, 16, 16) is None  # too short to split
    assert_matches_dense(*qkv(1, t), full)


def test_blockwise_attention_skips_other_examples_of_a_packed_row(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 16 * 4 * 64)
    t = 64
    mask = packed_mask([[30, 34]], t)
    assert blockwise.block_span(mask[..., 32:48, :].unsqueeze(2), t) == (30, 48)  # the second example only
    q, k, v = qkv(1, t)
    assert_same_with_grads(blockwise.blockwise_attention(q, k, v, mask, 0.3), dense(q, k, v, mask, 0.3), (q, k, v))


def test_the_estimators_columns_follow_the_plan(monkeypatch):
    """estimate/fastpath counts a causal batch's probabilities over the same spans the kernel computes."""
    monkeypatch.setattr(spans, "BLOCK", 128)
    monkeypatch.setattr(spans, "BLOCK_COST", 4096)
    for batch, t in ((8, 256), (8, 384), (1, 200)):
        mask = packed_mask([[t]] * batch, t)
        chosen = spans.plan(mask, batch, t, t)
        computed = t * t if chosen is None else sum((e - s) * (hi - lo) for _, s, e, lo, hi in chosen)
        assert spans.causal_columns(batch, t, t) == computed / t
    assert spans.causal_columns(8, 256, 256) == 192  # blocks [0, 128) and [128, 256): 128 + 256 keys
    assert spans.causal_columns(1, 200, 200) == 200  # one short row: dense
