"""Blockwise attention (no stored probabilities) equals the explicit softmax attention, forward and backward."""

from __future__ import annotations

import pytest
import torch
from tiny import reference_attention as reference

from deltatune.fast import blockwise


def causal_padding_mask(b, t, tk, pad):
    """(B, 1, T, Tk): causal over the last T of Tk keys (the first tk - t are a prefix), left padding `pad`."""
    allowed = torch.ones(t, tk, dtype=torch.bool).tril(tk - t)
    allowed = allowed.expand(b, 1, t, tk).clone()
    for i, p in enumerate(pad):
        allowed[i, :, :, tk - t:tk - t + p] = False
    return torch.zeros(b, 1, t, tk, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_gradients_match(monkeypatch, heads, kv_heads, masked):
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64)  # many small blocks
    torch.manual_seed(0)
    b, t, tk, d = 2, 9, 12, 8
    q = torch.randn(b, heads, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, kv_heads, tk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv_heads, tk, d, dtype=torch.float64, requires_grad=True)
    mask = causal_padding_mask(b, t, tk, [0, 2]) if masked else None
    ours = blockwise.blockwise_attention(q, k, v, mask, d ** -0.5)
    ref = reference(q, k, v, mask, d ** -0.5)
    torch.testing.assert_close(ours, ref)
    up = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        torch.testing.assert_close(a, r)


def test_bf16_inputs_stay_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    ref = reference(q, k, v, None, 0.25)
    ours = blockwise.blockwise_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_models_train_through_blockwise_attention_with_the_same_gradients(tiny_dir, monkeypatch, kind):
    """Above BLOCKWISE_MIN the training attention keeps no P; loss and gradients equal the explicit path."""
    from deltatune import fast
    from deltatune.backbone import load_task_model
    from deltatune.config import TrainConfig
    from deltatune.fast import attention
    from deltatune.methods import resolve_method

    calls = []
    real = blockwise.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    tm = load_task_model(tiny_dir(kind), num_labels=2, pooling="hf")
    method, config = resolve_method("lora")
    method.apply(tm, config)
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    tm.module.train()
    ids = torch.randint(10, 99, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    params = [p for p in tm.module.parameters() if p.requires_grad]
    results = {}
    for limit in (10 ** 9, 16):  # explicit, then blockwise (24 x 24 >= 16)
        monkeypatch.setattr(attention, "BLOCKWISE_MIN", limit)
        loss = tm.module(**batch).loss
        results[limit] = (loss, torch.autograd.grad(loss, params))
    assert calls, "blockwise attention never ran"
    torch.testing.assert_close(results[16][0], results[10 ** 9][0])
    for a, b in zip(results[16][1], results[10 ** 9][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
