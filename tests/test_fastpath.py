"""The fast path is an equivalence, not a new model: bf16 logits and gradient directions match fp32 for
every registered method, fused projections and explicit attention match the unfused / SDPA results
in fp32, padding and bucketing change no prediction, deltas keep their names."""

import json

import pytest
import torch

from deltatune import fast
from deltatune.backbone import load_task_model
from deltatune.batching import Encoded, eval_batches
from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.evaluate import predict_logits
from deltatune.fast.fused import FusedSlice
from deltatune.loading import load_delta
from deltatune.methods import REGISTRY, resolve_method
from deltatune.methods.base import trainable_state
from deltatune.storage import BF16Weight, storage_of

GRADIENT_METHODS = [n for n, m in REGISTRY.items() if not m.runs_own_job]  # icl / knn: no weights
TEXTS = ["good movie", "the plot was awful and dull and the music too", "a film", "great cast but weak ending"]


def build(tiny_dir, kind: str, method: str, options: dict | None = None, seed: int = 1):
    """A tiny task model with `method` applied and its trainable tensors moved off their init."""
    tm = load_task_model(tiny_dir(kind), num_labels=3, pooling="last" if kind == "llama" else "hf")
    tm.label_names = ["neg", "neu", "pos"]
    module, config = resolve_method(method, options)
    torch.manual_seed(0)
    module.apply(tm, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nonzero LoRA B, adapter Up...: every trainable tensor gets a gradient
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return tm


def inputs_of(tm) -> dict:
    return dict(tm.tokenizer(TEXTS, padding=True, return_tensors="pt"))


def logits_and_grads(tm) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tm.module.train()  # dropout is set to 0 by `prepare`
    out = tm.module(**inputs_of(tm), labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    grads = {n: p.grad.float().flatten() for n, p in tm.module.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_bf16_matches_fp32_logits_and_gradient_directions(tiny_dir, kind, method):
    try:
        ref, tm = build(tiny_dir, kind, method), build(tiny_dir, kind, method)
    except UserError:  # e.g. bitfit on a backbone without biases
        pytest.skip(f"{method} does not apply to {kind}")
    fast.prepare(ref, precision="fp32", attention="model", dropout=0.0, fuse=False)
    info = fast.prepare(tm, precision="bf16", attention="explicit", dropout=0.0)
    assert info.precision == "bf16" and info.bf16_modules > 0 and not info.untouched
    ref_logits, ref_grads = logits_and_grads(ref)
    got_logits, got_grads = logits_and_grads(tm)
    assert got_logits.dtype == torch.float32  # the head and the loss run in fp32
    scale = max(1.0, ref_logits.abs().max().item())
    assert (got_logits - ref_logits).abs().max().item() < 0.03 * scale  # bf16: ~3 significant digits
    assert set(got_grads) == set(ref_grads)
    if not ref_grads:  # features: nothing trains by gradient
        return
    assert cosine(torch.cat(list(got_grads.values())), torch.cat(list(ref_grads.values()))) > 0.99
    for name, grad in ref_grads.items():
        if grad.norm() > 1e-3 * max(g.norm() for g in ref_grads.values()):
            assert cosine(got_grads[name], grad) > 0.99, name


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_restore_gives_back_the_plain_fp32_model(tiny_dir, kind, method):
    try:
        ref, tm = build(tiny_dir, kind, method), build(tiny_dir, kind, method)
    except UserError:
        pytest.skip(f"{method} does not apply to {kind}")
    classes = {n: type(m) for n, m in tm.module.named_modules()}
    dropouts = {n: m.p for n, m in tm.module.named_modules() if isinstance(m, torch.nn.Dropout)}
    attention = tm.module.config._attn_implementation
    fast.prepare(tm, precision="bf16", attention="explicit", dropout=0.0)
    fast.restore(tm)
    assert {n: type(m) for n, m in tm.module.named_modules()} == classes
    assert {n: m.p for n, m in tm.module.named_modules() if isinstance(m, torch.nn.Dropout)} == dropouts
    assert tm.module.config._attn_implementation == attention
    expected = ref.module.state_dict()
    for name, value in tm.module.state_dict().items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
    inputs = inputs_of(tm)
    ref.module.eval(), tm.module.eval()
    with torch.no_grad():
        got, want = tm.module(**inputs).logits, ref.module(**inputs).logits
    if method == "dora":  # equal tensors, but DoRA's row norms come out ~1e-8 apart after the round trip
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # (root cause not found: see RESULTS)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_trainable_tensors_stay_fp32_and_frozen_ones_become_bf16(tiny_dir, kind):
    tm = build(tiny_dir, kind, "lora")
    fast.prepare(tm, precision="bf16")
    for name, p in tm.module.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    frozen = {n: p.dtype for n, p in tm.module.named_parameters() if not p.requires_grad}
    assert {d for n, d in frozen.items() if "norm" not in n.lower()} == {torch.bfloat16}
    assert {d for n, d in frozen.items() if "norm" in n.lower()} == {torch.float32}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method,options", [("lora", None), ("ia3", None), ("head", None),
                                            ("lora", {"target_modules": "query,key,value"})])
def test_fused_projections_match_unfused_in_fp32(tiny_dir, kind, method, options):
    ref, tm = build(tiny_dir, kind, method, options), build(tiny_dir, kind, method, options)
    fast.prepare(ref, precision="fp32", attention="eager", dropout=0.0, fuse=False)
    info = fast.prepare(tm, precision="fp32", attention="eager", dropout=0.0, fuse=True)
    assert info.fused_layers == 2
    assert sum(isinstance(storage_of(m), FusedSlice) for m in tm.module.modules()) == 6
    assert set(tm.module.state_dict()) == set(ref.module.state_dict())  # names unchanged
    ref_logits, ref_grads = logits_and_grads(ref)
    got_logits, got_grads = logits_and_grads(tm)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_trainable_projections_are_not_fused(tiny_dir):
    tm = build(tiny_dir, "bert", "full")
    assert fast.prepare(tm, precision="bf16").fused_layers == 0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_explicit_attention_matches_sdpa_with_padding(tiny_dir, kind):
    ref, tm = build(tiny_dir, kind, "lora"), build(tiny_dir, kind, "lora")
    assert fast.prepare(ref, precision="fp32", attention="sdpa", dropout=0.0).attention == "sdpa"
    assert fast.prepare(tm, precision="fp32", attention="explicit", dropout=0.0).attention == "explicit"
    ref_logits, ref_grads = logits_and_grads(ref)
    got_logits, got_grads = logits_and_grads(tm)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_to_a_bucket_changes_no_logit(tiny_dir, kind, precision):
    tm = build(tiny_dir, kind, "lora")
    fast.prepare(tm, precision=precision)
    tm.module.eval()
    inputs = inputs_of(tm)
    padded = fast.pad_width(inputs, 32, tm.tokenizer.pad_token_id)
    assert padded["input_ids"].shape[1] == 32
    with torch.no_grad():
        torch.testing.assert_close(tm.module(**padded).logits, tm.module(**inputs).logits, atol=1e-5, rtol=0)


def test_bucketed_evaluation_keeps_every_example_in_order(tiny_dir):
    tm = build(tiny_dir, "bert", "lora")
    fast.prepare(tm, precision="bf16")
    texts = [" ".join(["good", "film", "awful"][: 1 + i % 3] * (1 + i % 7)) for i in range(23)]
    rows = [Encoded(key=f"x:{i}", input_ids=tm.tokenizer(t)["input_ids"], token_type_ids=None, label=0)
            for i, t in enumerate(texts)]
    batches = eval_batches([len(r.input_ids) for r in rows], 4)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    together = predict_logits(tm, rows, batch_size=4)
    alone = torch.cat([predict_logits(tm, [r], batch_size=1) for r in rows])
    torch.testing.assert_close(together, alone, atol=2e-2, rtol=0)  # bf16 sums differ with the batch width


def test_dropout_policy_touches_only_the_backbone(tiny_dir):
    tm = build(tiny_dir, "bert", "lora", {"dropout": 0.2})
    fast.prepare(tm, precision="fp32", dropout="auto")
    loaded = [m for m in tm.module.modules() if isinstance(m, torch.nn.Dropout) and m in tm.loaded_modules]
    assert loaded and all(m.p == fast.DEFAULT_DROPOUT for m in loaded)
    lora_dropouts = [m for n, m in tm.module.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert lora_dropouts and all(m.p == 0.2 for m in lora_dropouts)
    keep = build(tiny_dir, "bert", "lora")
    fast.prepare(keep, precision="fp32", dropout="model")
    assert any(m.p == 0.1 for m in keep.module.modules() if isinstance(m, torch.nn.Dropout))


def test_options_are_checked():
    assert fast.parse_dropout("0.1") == 0.1 and fast.parse_dropout("model") is None
    for bad in ("x", "1.5"):
        with pytest.raises(UserError):
            fast.parse_dropout(bad)
    with pytest.raises(UserError):
        fast.resolve_precision("fp16", torch.device("cpu"))
    assert fast.resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


def test_fast_trained_delta_loads_on_the_plain_path(tiny_dir, toy_csv, tmp_path, capsys):
    out = tmp_path / "d"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(out),
              "--epochs", "1", "--precision", "bf16", "--no-progress", "--json"])
    assert exit_info.value.code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["precision"] == "bf16" and metrics["fast_path"]["fused_layers"] == 2
    loaded = load_delta(out)  # fp32, unfused, sdpa: the names are the plain model's
    assert all(p.dtype == torch.float32 for p in loaded.task_model.module.parameters())
    meta = json.loads((out / "delta.json").read_text())
    assert "train_seconds" in meta["history"][0]
    assert set(trainable_state(loaded.task_model.module)) <= set(loaded.task_model.module.state_dict())
    with pytest.raises(SystemExit):  # the test metrics are the reloaded delta's, to the last digit
        main(["eval", str(out), "--data", toy_csv, "--json"])
    assert json.loads(capsys.readouterr().out)["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_projections_compute_through_their_storage(tiny_dir, kind):
    tm = build(tiny_dir, kind, "lora")
    classes = {n: type(m) for n, m in tm.module.named_modules()}
    fast.prepare(tm, precision="bf16", fuse=False)
    assert {n: type(m) for n, m in tm.module.named_modules()} == classes  # no class swap
    stored = [m for m in tm.module.modules() if isinstance(storage_of(m), BF16Weight)]
    linears = [m for m in stored if not isinstance(m, torch.nn.Embedding)]
    assert linears and any(isinstance(m, torch.nn.Embedding) for m in stored)
    for m in linears:  # nn.Linear and GPT-2's Conv1D (stored (in, out)) alike
        kept = storage_of(m)
        w = kept.dequantize()  # (out, in) fp32
        x = torch.randn(2, 3, w.shape[1])
        y = m(x)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, w.shape[0])
        bias = 0 if m.bias is None else m.bias.float()
        torch.testing.assert_close(y.float(), x.bfloat16().float() @ w.T + bias, atol=3e-2, rtol=3e-2)
        assert kept.nbytes == sum(p.numel() * 2 for p in m.parameters(recurse=False))  # frozen: bf16
