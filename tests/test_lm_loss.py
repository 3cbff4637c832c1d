"""The chunked LM-head loss equals the full-logits cross-entropy, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.fast.lm_loss import IGNORE, chunked_lm_loss


def reference(hidden, labels, weight, bias):
    logits = F.linear(hidden, weight, bias)[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk, train_head):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=train_head)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=train_head)
    labels = torch.randint(0, 37, (3, 11))
    labels[:, :4] = IGNORE  # the prompt
    labels[2, 7:] = IGNORE  # padding
    ours = chunked_lm_loss(hidden, labels, weight, bias, chunk=chunk)
    ref = reference(hidden, labels, weight, bias)
    torch.testing.assert_close(ours.double(), ref.double())
    wrt = [hidden] + ([weight, bias] if train_head else [])
    g_ours = torch.autograd.grad(ours * 2.5, wrt)  # an upstream gradient other than 1
    g_ref = torch.autograd.grad(ref * 2.5, wrt)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_bf16_hidden_gives_the_fp32_loss_within_bf16_tolerance():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    ours = chunked_lm_loss(hidden.bfloat16().requires_grad_(), labels, weight.bfloat16(), chunk=4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference(hidden, labels, weight, None), atol=0.05, rtol=0.02)


def test_no_labelled_token_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_lm_loss(hidden, torch.full((1, 4), IGNORE), torch.randn(10, 8))
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_deferred_head_gives_the_models_own_loss_and_gradients(tiny_dir, kind):
    from transformers import AutoModelForCausalLM

    from deltatune.fast.lm_loss import defer_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(kind))
    ids = torch.randint(5, 99, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    reference = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    undo = defer_lm_head(model)
    assert undo is not None
    ours = model(input_ids=ids, labels=labels).loss
    grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, reference)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    undo()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, reference)
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_path_uses_the_chunked_loss_with_the_same_gradients(tiny_dir, kind, checkpointing):
    """Generation training goes through the chunked loss by default (evaluation keeps real logits), with
    gradient checkpointing too; --attention model keeps transformers' own loss."""
    from deltatune import fast
    from deltatune.backbone import load_task_model
    from deltatune.config import TrainConfig
    from deltatune.evaluate import forward_batch
    from deltatune.methods import resolve_method
    from deltatune.train import gradient_checkpointing

    torch.manual_seed(0)
    tm = load_task_model(tiny_dir(kind), num_labels=0, pooling="lm")
    method, config = resolve_method("lora", {"target_modules": "query,value,ffn_out"})
    method.apply(tm, config)
    info = fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    assert info.lm_loss == "chunked"
    ids = torch.randint(5, 99, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "keys": None}
    params = [p for p in tm.module.parameters() if p.requires_grad]
    with gradient_checkpointing(tm, checkpointing):
        tm.module.train()
        chunked = fast.training_forward(tm)(batch)
        assert chunked.logits.shape[-1] == tm.module.config.hidden_size  # hidden states: no vocab logits
        g_chunked = torch.autograd.grad(chunked.loss, params)
        plain = forward_batch(tm, batch)
        assert plain.logits.shape[-1] == tm.module.config.vocab_size
        g_plain = torch.autograd.grad(plain.loss, params)
    torch.testing.assert_close(chunked.loss, plain.loss)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    fast.restore(tm)
    assert fast.prepare_for_training(tm, TrainConfig(attention="model")).lm_loss == "model"


@pytest.mark.parametrize("kind,method", [("llama", "lora"), ("gpt2", "prompt"), ("llama", "prefix"), ("t5", "lora")])
def test_evaluation_loss_through_the_chunked_head_equals_the_full_logits(tiny_dir, kind, method):
    """`evaluate_lm` never holds (B, T, vocab) logits, and scores what the model's own logits score."""
    from test_decoding import lm_model

    from deltatune.batching import collate
    from deltatune.evaluate import forward_batch
    from deltatune.generation import batch_nll, token_nll

    tm = lm_model(tiny_dir, kind, method)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[1] = IGNORE  # a row with nothing to score
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if kind == "t5":
        batch["decoder_input_ids"] = ids  # the seq2seq collate's shape: targets as labels
    with torch.no_grad():
        expected = token_nll(forward_batch(tm, batch).logits, labels, shift=kind != "t5")
        nll, tokens = batch_nll(tm, batch, None)
    assert tokens == expected[1] > 0
    assert nll == pytest.approx(expected[0], rel=1e-5)
    assert collate  # the rows evaluate_lm collates are the batches above
