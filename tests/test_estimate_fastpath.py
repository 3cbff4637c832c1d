"""The estimator's model of deltatune's own training path: its attention kernel (blockwise at long
sequences), the chunked LM loss, partial checkpointing and the fewest-layers budget (issue 15)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_estimate import deltatune_trains, measured_saved_bytes

from deltatune.estimate import plan_for_method
from deltatune.estimate.cli import estimate_for_model
from deltatune.estimate.detailed import RunSettings, activation_report
from deltatune.estimate.shapes import load_shapes, shapes_from_config

# --- deltatune's own path: its attention kernel (blockwise at long sequences) and the chunked LM loss ---------

@pytest.mark.parametrize("method", ["full", "last2"])
@pytest.mark.parametrize("blockwise", [False, True])
def test_fast_path_model_matches_saved_tensors(monkeypatch, method, blockwise):
    """deltatune's explicit attention saves q·scale, k, P, v; blockwise (T·Tk >= BLOCKWISE_MIN) saves no P;
    the chunked LM loss saves ∂h of the labelled rows (and the head's ∂W when it trains), never (T, V)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from deltatune.fast import attention as attention_impl
    from deltatune.fast.lm_loss import defer_lm_head
    from deltatune.fast.swiglu import fuse_swiglu

    monkeypatch.setattr(attention_impl, "BLOCKWISE_MIN", 16 * 16 if blockwise else 10**9)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=99,
                                      num_key_value_heads=2, intermediate_size=48, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    attention_impl.register()
    model.set_attn_implementation(attention_impl.NAME)
    fuse_swiglu(model)  # as the fast path does (fast/swiglu.py): the MLP keeps gate and up only
    shapes = shapes_from_config(config.to_dict(), "llama")
    plan = plan_for_method(method, shapes, True)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(deltatune_trains(method, name, True))
    model.train()
    input_ids = torch.randint(1, 99, (2, 16))
    labels = input_ids.clone()
    labels[:, :8] = -100  # the prompt half: never reaches the head
    defer_lm_head(model)
    measured = measured_saved_bytes(model, dict(input_ids=input_ids, labels=labels))
    run = RunSettings(2, 16, 4, attention="deltatune", device="cpu", lm_loss="chunked", labelled_fraction=8 / 15)
    report = activation_report(shapes, plan, run)
    assert report.total_bytes == pytest.approx(measured, rel=0.04, abs=64)
    assert report.head_bytes < activation_report(shapes, plan, replace(run, lm_loss="model")).head_bytes


def test_fast_path_keeps_no_seq_squared_tensor_at_long_sequences():
    """SmolLM2 LoRA: above BLOCKWISE_MIN a layer's saved set grows linearly with the sequence, and the chunked
    loss holds one (chunk, V) block, not (T, V) logits and their gradients."""
    from deltatune.fast.attention import BLOCKWISE_MIN

    shapes = load_shapes("smollm2-135m")
    plan = plan_for_method("lora", shapes, True)

    def report(seq, **changes):
        run = RunSettings(1, seq, 2, attention="deltatune", device="cpu", lm_loss="chunked")
        return activation_report(shapes, plan, replace(run, **changes))

    long = int(BLOCKWISE_MIN**0.5)
    assert report(4 * long).layer_bytes[5] == pytest.approx(2 * report(2 * long).layer_bytes[5], rel=0.02)
    short = report(long // 2).layer_bytes[5]        # P (B, h, T, T) saved below the threshold: more per token
    assert short / (long // 2) > 1.2 * report(2 * long).layer_bytes[5] / (2 * long)
    chunked, full_logits = report(4096), report(4096, lm_loss="model")
    assert full_logits.head_bytes - chunked.head_bytes > 4096 * shapes.vocab * 4 * 0.9  # the fp32 log-probs
    assert chunked.head_backward_bytes < 4096 * shapes.vocab
    half = report(4096, labelled_fraction=0.5)
    assert half.head_bytes < chunked.head_bytes and half.forward_peak_bytes <= chunked.forward_peak_bytes


def test_partial_checkpointing_lies_between_none_and_all():
    shapes = load_shapes("smollm2-135m")

    def total(layers):
        [e] = estimate_for_model(shapes, ["lora"], batch_size=1, seq_len=2048, dtype="bf16", attention="deltatune",
                                 device="cpu", lm_loss="chunked", gradient_checkpointing=layers)
        return e.total_gb

    totals = [total(k) for k in range(0, shapes.layers + 1, 5)]
    assert totals[0] == total(False) and totals[-1] == total(True)
    assert all(a > b for a, b in zip(totals, totals[1:]))


def test_fewest_layers_is_the_smallest_count_that_fits():
    from deltatune.estimate.budget import fewest_layers

    def cost(k):  # MB: 100 per unchecked layer of 30, 10 per checkpointed one
        return 500 + 100 * (30 - k) + 10 * k

    for budget in (400, 500 + 10 * 30, 2000, 3000, 3500, 10_000):
        count, needed = fewest_layers(cost, 30, budget)
        fits = [k for k in range(31) if cost(k) <= budget]
        assert count == (fits[0] if fits else 30) and needed == cost(count)
