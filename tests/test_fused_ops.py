"""Fused ops of the fast path that keep fewer tensors for backward (deltatune/fast/swiglu.py): the same
values and gradients as the unfused ops, and fewer bytes saved."""

from __future__ import annotations

import pytest
import torch

from deltatune import fast
from deltatune.backbone import load_task_model
from deltatune.fast import forwards, recompute, swiglu
from deltatune.methods import resolve_method


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves while `fn(*args)` runs (parameters included)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def unfused_swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def lm_gradients(tm, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, the gradient of every trainable parameter) of one forward + backward."""
    tm.module.zero_grad(set_to_none=True)
    loss = tm.module(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tm.module.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def every_row_is_long(monkeypatch):
    """The tiny batches here (12-50 tokens) take the memory-saving forms, as rows >= LONG_ROWS do."""
    monkeypatch.setattr(forwards, "LONG_ROWS", 1)


def test_short_rows_keep_the_plain_mlp_and_norm(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(forwards, "LONG_ROWS", 64)
    norm = LlamaRMSNorm(16)
    recompute.recompute_rms_norms(norm)
    short, long = (torch.randn(1, t, 16, dtype=torch.bfloat16, requires_grad=True) for t in (63, 64))
    plain = LlamaRMSNorm(16)
    assert saved_bytes(norm, short) == saved_bytes(plain, short)  # an fp32 copy and the rsqrt, as before
    assert saved_bytes(norm, long) < saved_bytes(plain, long) / 2  # its bf16 input only


def token_batch() -> dict:
    ids = torch.randint(5, 90, (2, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_swiglu_is_bitwise_the_unfused_product_and_saves_a_third_less():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = (torch.randn(3, 17, 40, dtype=dtype, requires_grad=True) for _ in range(2))  # (B, T, F)
        upstream = torch.randn(3, 17, 40, dtype=dtype)
        ref = unfused_swiglu(gate, up)
        ours = swiglu.swiglu(gate, up)
        assert torch.equal(ours, ref)
        for a, r in zip(torch.autograd.grad(ours, (gate, up), upstream),
                        torch.autograd.grad(ref, (gate, up), upstream)):
            assert torch.equal(a, r)
        unfused = saved_bytes(unfused_swiglu, gate, up)
        assert saved_bytes(swiglu.swiglu, gate, up) * 3 == unfused * 2  # gate, up; not silu(gate)


def lora_llama(tiny_dir):
    torch.manual_seed(0)
    tm = load_task_model(tiny_dir("llama"), num_labels=0, pooling="lm")
    method, config = resolve_method("lora", {"target_modules": "query,value,ffn_in,ffn_out"})
    method.apply(tm, config)
    with torch.no_grad():  # B away from 0: every LoRA matrix gets a gradient
        for name, p in tm.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return tm


def test_fused_mlp_gradients_match_the_unfused_on_tiny_llama(tiny_dir):
    tm, batch = lora_llama(tiny_dir), token_batch()
    loss_ref, ref = lm_gradients(tm, batch)
    mlps = swiglu.fuse_swiglu(tm.module)
    assert len(mlps) == len(tm.layers())
    loss, ours = lm_gradients(tm, batch)
    torch.testing.assert_close(loss, loss_ref)  # fp32 tolerance
    assert ref.keys() == ours.keys() and any("gate_proj" in n for n in ours)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)
    swiglu.unfuse_swiglu(mlps)
    assert not any("forward" in m.__dict__ for m in mlps)


def test_the_fast_path_fuses_the_mlp_and_restore_undoes_it(tiny_dir):
    tm = lora_llama(tiny_dir)
    info = fast.prepare(tm, precision="fp32")
    assert info.swiglu_mlps == len(tm.layers()) and info.to_dict()["swiglu_mlps"] == 2
    assert all("forward" in layer.mlp.__dict__ for layer in tm.layers())
    fast.restore(tm)
    assert not any("forward" in layer.mlp.__dict__ for layer in tm.layers())
    bert = load_task_model(tiny_dir("bert"), num_labels=2)  # no gated MLP: nothing fused
    assert fast.prepare(bert, precision="fp32").swiglu_mlps == 0


def test_recomputed_rms_norms_give_the_same_gradients_and_keep_only_their_input(tiny_dir):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    tm, batch = lora_llama(tiny_dir), token_batch()
    _, ref = lm_gradients(tm, batch)
    norms = recompute.recompute_rms_norms(tm.module, tm.loaded_modules)
    assert len(norms) == 2 * len(tm.layers()) + 1
    _, ours = lm_gradients(tm, batch)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)
    recompute.restore_norms(norms)

    norm = LlamaRMSNorm(64)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)  # (B, T, H), a bf16 stream
    plain = saved_bytes(norm, x)  # an fp32 copy of x, the (B, T, 1) rsqrt, the weight
    recompute.recompute_rms_norms(norm)
    kept = saved_bytes(norm, x)  # x and the weight
    assert kept <= x.numel() * 2 + 64 * 4 < plain / 2
    upstream = torch.randn(2, 50, 64)
    (grad,) = torch.autograd.grad(norm(x), x, upstream)
    recompute.restore_norms([norm])
    (ref_grad,) = torch.autograd.grad(norm(x), x, upstream)
    assert torch.equal(grad, ref_grad)


def test_the_bf16_fast_path_recomputes_the_backbone_norms(tiny_dir):
    tm = lora_llama(tiny_dir)
    assert fast.prepare(tm, precision="bf16").recomputed_norms == 2 * len(tm.layers()) + 1
    assert "forward" in tm.module.model.norm.__dict__
    fast.restore(tm)
    assert "forward" not in tm.module.model.norm.__dict__
    assert fast.prepare(tm, precision="fp32").recomputed_norms == 0
