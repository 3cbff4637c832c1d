"""Quantised backbones (--quantize nf4|fp4|int8|3bit|2bit), 8-bit optimizers: storage, training, identity, errors."""

import json

import pytest
import tiny
import torch
from torch import nn

from deltatune import quantize, storage
from deltatune.backbone import load_task_model
from deltatune.errors import UserError
from deltatune.methods import resolve_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tests/tiny.py's models with an even FFN width (40, not 37): bitsandbytes' CPU 4-bit kernel takes even
    rows, an odd one goes through its torch.compile'd fallback (seconds per shape; the results are equal)."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("even")

    def make(kind="bert", hidden=32):
        folder = root / f"{kind}-{hidden}"
        if not folder.exists():
            config = tiny.tiny_config(kind)
            config.intermediate_size, config.hidden_size = 40 if hidden == 32 else 2 * hidden, hidden
            torch.manual_seed(0)
            AutoModel.from_config(config).save_pretrained(folder)
            tiny._tokenizer(kind).save_pretrained(folder)
        return str(folder)

    return make


def lm_batch(tm, n=4):
    ids = torch.randint(7, tiny.VOCAB_SIZE, (n, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def quantised_lora(tiny_dir, kind, method="lora", options=None):
    tm = load_task_model(tiny_dir("llama"), 0, pooling="lm", quantize=kind, precision="fp32")
    m, cfg = resolve_method(method, options or {})
    quantize.apply_method(tm, m, cfg)
    return tm, m, cfg


def test_nf4_holds_linear_weights_in_under_0_3x_their_16bit_size():
    lin = nn.Linear(512, 512, bias=False).requires_grad_(False)
    kept = storage.kind_class("nf4")(lin, torch.float32)
    assert lin.weight.dtype == torch.uint8  # the same Parameter, now packed: the fp32 values are gone
    assert kept.nbytes <= 0.3 * 512 * 512 * 2
    x = torch.randn(3, 512)
    exact = x @ kept.dequantize().t()
    assert torch.allclose(kept.linear(x), exact, atol=1e-3)  # bitsandbytes' matmul = x Ŵᵀ


@pytest.mark.parametrize("kind", ["nf4", "int8", "2bit"])
def test_quantised_lora_step_reduces_the_loss_and_only_trainable_tensors_get_gradients(tiny_dir, kind):
    torch.manual_seed(0)
    tm, _, _ = quantised_lora(tiny_dir, kind)
    layers = quantize.quantizable(tm)
    assert layers and all(storage.is_quantized(m) for _, m in layers)
    packed = {name: m.weight.detach().clone() for name, m in layers}
    trainable = [p for p in tm.module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = lm_batch(tm)
    tm.module.train()
    losses = []
    for _ in range(5):
        loss = tm.module(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in tm.module.parameters() if not p.requires_grad)
        assert all(p.grad is not None for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(m.weight, packed[name]) for name, m in layers)  # the backbone never moved


@pytest.mark.parametrize("method", ["adalora", "ia3", "adapter", "prompt", "prefix", "ptuning", "mam", "head"])
def test_every_backbone_freezing_method_trains_on_nf4(tiny_dir, method):
    tm, _, _ = quantised_lora(tiny_dir, "nf4", method)
    tm.module.train()
    tm.module(**lm_batch(tm, 2)).loss.backward()
    grads = [p.grad for p in tm.module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) or method == "head"


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_methods_training_quantised_tensors_are_refused(tiny_dir, method):
    tm = load_task_model(tiny_dir("bert"), 2, quantize="nf4", precision="fp32")
    m, cfg = resolve_method(method, {})
    with pytest.raises(UserError, match=f"method '{method}' trains .*, which --quantize nf4 stores quantised"):
        quantize.apply_method(tm, m, cfg)


def test_fingerprint_covers_the_kind_and_a_delta_checks_it(tiny_dir, tmp_path, capsys):
    from deltatune.delta import save_delta
    from deltatune.loading import load_delta

    tm, m, cfg = quantised_lora(tiny_dir, "nf4")
    other = load_task_model(tiny_dir("llama"), 0, pooling="lm", quantize="fp4", precision="fp32")
    plain = load_task_model(tiny_dir("llama"), 0, pooling="lm")
    assert tm.fingerprint == other.fingerprint == plain.fingerprint  # the model as loaded
    assert tm.quantization["fingerprint"] != other.quantization["fingerprint"]
    assert tm.quantization["kind"] == "nf4" and plain.quantization is None
    tiny.perturb(tm.module)
    save_delta(tmp_path / "d", tm, m, cfg, {})
    assert json.loads((tmp_path / "d" / "delta.json").read_text())["backbone"]["quantization"]["kind"] == "nf4"
    batch = lm_batch(tm, 2)
    tm.module.eval()
    with torch.no_grad():
        want = tm.module(**batch).logits
        again = load_delta(tmp_path / "d").task_model  # rebuilt quantised, as recorded
        assert again.quantization["fingerprint"] == tm.quantization["fingerprint"]
        assert torch.allclose(again.module(**batch).logits, want, atol=1e-5)
        with pytest.raises(UserError, match="trained on a --quantize nf4 backbone, not --quantize int8"):
            load_delta(tmp_path / "d", quantize="int8")
        capsys.readouterr()
        full = load_delta(tmp_path / "d", quantize="none").task_model  # allowed, with a warning
        assert "warning: delta was trained on --quantize nf4" in capsys.readouterr().err
        assert full.module(**batch).logits.shape == want.shape
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    meta["backbone"]["quantization"]["fingerprint"] = "0" * 16  # another library version's codes
    (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="quantise with the same library version"):
        load_delta(tmp_path / "d")


def test_unknown_kind_is_a_one_line_error():
    assert quantize.parse("4bit") == "nf4" and quantize.parse("none") is None
    with pytest.raises(UserError, match="--quantize must be one of nf4, fp4, int8, 3bit, 2bit"):
        quantize.parse("nf5")


def test_a_device_without_kernels_says_what_runs_instead():
    with pytest.raises(UserError, match="bitsandbytes has no kernels for device 'mps'.*runs instead: --quantize 3bit"):
        quantize.check_runnable("nf4", torch.device("mps"))


def test_adamw8bit_step_follows_adamw():
    from deltatune.optimizers import build, resolve_optimizer

    assert resolve_optimizer("adam8bit") == "adamw8bit"  # the estimator's name
    torch.manual_seed(0)
    start = torch.randn(128, 64)  # >= 4096 values: 8-bit state (smaller tensors keep fp32 state)
    target = torch.randn(128, 64)
    moves = {}
    for name in ("adamw", "adamw8bit"):
        p = nn.Parameter(start.clone())
        opt = build(name, [{"params": [p], "weight_decay": 0.0}], 1e-2, torch.device("cpu"))
        for _ in range(10):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
        moves[name] = (p.detach() - start).flatten()
    cosine = nn.functional.cosine_similarity(moves["adamw"], moves["adamw8bit"], dim=0)
    assert cosine > 0.99, cosine


def test_serve_engine_on_an_nf4_backbone_matches_predict(tiny_dir, toy_csv, tmp_path):
    from deltatune.config import TrainConfig
    from deltatune.data import TaskArgs
    from deltatune.loading import load_delta
    from deltatune.predict import predict_texts
    from deltatune.serve.engine import Engine
    from deltatune.workflow import TrainJob, run_train_job

    config = TrainConfig(epochs=1, batch_size=32, progress=False, quantize="nf4", device="cpu")
    task = TaskArgs(data=toy_csv).load(0)
    run_train_job(TrainJob("lora", task, model=tiny_dir("bert"), pooling="mean", train=config), tmp_path / "d")
    texts = ["a good film", "the plot was awful"]
    want = predict_texts(load_delta(tmp_path / "d"), texts, 8)
    engine = Engine(tiny_dir("bert"), device="cpu", quantize="nf4")
    engine.add_task("t", tmp_path / "d")
    got = engine.classify([("t", t) for t in texts])
    for w, g in zip(want, got):
        assert w["label"] == g["label"]
        assert all(abs(w["probabilities"][k] - g["probabilities"][k]) < 1e-3 for k in w["probabilities"])


def test_a_qlora_delta_exports_to_peft_which_loads_it_on_a_bitsandbytes_base_with_the_same_logits(tiny_dir, tmp_path):
    """peft + transformers' BitsAndBytesConfig quantise the same weights with the same bitsandbytes call (nf4,
    blocks of 64, double quantisation): the codes are equal, so are the logits. The peer runs in train mode
    (Llama has no dropout): in eval mode on a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its
    weights for a bf16 inference kernel that needs out_features % 32 == 0 (the tiny vocab is 99)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.delta import save_delta
    from deltatune.peft_format import export_peft

    model = tiny_dir("llama", 64)
    tm, m, cfg = quantised_lora(lambda kind: model, "nf4")
    tiny.perturb(tm.module)
    save_delta(tmp_path / "d", tm, m, cfg, {})
    export_peft(tmp_path / "d", tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(model, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    peer = PeftModel.from_pretrained(base, tmp_path / "peft").train()
    batch = lm_batch(tm, 2)
    tm.module.eval()
    with torch.no_grad():
        ours = tm.module(input_ids=batch["input_ids"]).logits
        theirs = peer(input_ids=batch["input_ids"]).logits
    plain = load_task_model(model, 0, pooling="lm").module.eval()
    with torch.no_grad():
        unquantised = plain(input_ids=batch["input_ids"]).logits
    assert (ours - unquantised).abs().max() > 1e-3  # quantisation shows
    assert torch.allclose(ours, theirs, atol=2e-2), (ours - theirs).abs().max()


@pytest.mark.parametrize("args,fragment", [
    (["--quantize", "nf5"], "--quantize must be one of nf4, fp4, int8, 3bit, 2bit, q4_1 (or none), not 'nf5'"),
    (["--quantize", "nf4", "--method", "full"], "method 'full' trains its weights, which --quantize nf4 stores"),
    (["--optimizer", "lion"], "--optimizer must be one of adamw, adamw8bit, paged_adamw8bit, not 'lion'"),
])
def test_bad_quantisation_flags_are_one_line_errors(tiny_dir, toy_csv, tmp_path, args, fragment):
    from test_cli import assert_user_error, run

    proc = run("train", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(tmp_path / "d"),
               "--epochs", "1", "--no-progress", *args)
    assert_user_error(proc, fragment)


def test_a_peft_qlora_adapter_imports_with_quantize_and_gives_the_same_logits(tiny_dir, tmp_path):
    """A peft LoRA trained on transformers' BitsAndBytesConfig nf4 base (runs on this CPU: bitsandbytes >= 0.50)
    names only the base in adapter_config.json; `import --quantize nf4` applies it to deltatune's nf4 backbone
    (the same bitsandbytes call, so the same codes), and the delta records that backbone's fingerprint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.loading import load_delta
    from deltatune.peft_format import import_peft

    model = str(tmp_path / "base")  # a causal LM with its own lm_head (tiny_dir's has none: each load draws one)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_pretrained(tiny_dir("llama", 64)).save_pretrained(model)
    tiny._tokenizer("llama").save_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    peer = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    tiny.perturb(peer)  # lora_B off zero: the adapter changes the logits
    peer.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "d", model=model, quantize="nf4")
    recorded = json.loads((tmp_path / "d" / "delta.json").read_text())["backbone"]["quantization"]
    expected = load_task_model(model, 0, pooling="lm", quantize="nf4").quantization
    assert recorded["kind"] == "nf4" and recorded["fingerprint"] == expected["fingerprint"]
    loaded = load_delta(tmp_path / "d").task_model  # rebuilt nf4, checked by fingerprint
    ids = lm_batch(loaded, 2)["input_ids"]
    peer.train()  # see the export test: bitsandbytes' eval-mode CPU kernel needs out_features % 32 == 0
    with torch.no_grad():
        ours, theirs = loaded.module.eval()(input_ids=ids).logits.float(), peer(input_ids=ids).logits
        plain = load_task_model(model, 0, pooling="lm").module.eval()(input_ids=ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter and the quantisation show
    assert torch.allclose(ours, theirs, atol=2e-2), (ours - theirs).abs().max()  # bf16 against fp32 compute
    full = tmp_path / "full"
    import_peft(tmp_path / "peft", full, model=model)  # without --quantize: the base as stored
    assert json.loads((full / "delta.json").read_text())["backbone"]["quantization"] is None
    with pytest.raises(UserError, match="--quantize must be one of nf4"):
        import_peft(tmp_path / "peft", tmp_path / "bad", model=model, quantize="nf5")


def test_estimate_quantize_names_trains_kinds_and_without_measure_is_the_dtype(capsys):
    from deltatune.estimate.cli import estimate, quantize_kinds

    assert quantize_kinds("nf4, int8,none,4bit") == ["nf4", "int8", None]  # 4bit: an alias of nf4
    assert quantize_kinds(None) == [None]
    outputs = []
    for flags in ({"quantize": "nf4"}, {"dtype": "4bit"}):
        estimate(model="all-minilm-l6-v2", method=["lora"], **flags)
        outputs.append(capsys.readouterr().out)
    assert ", nf4, adamw" in outputs[0] and ", 4bit, adamw" in outputs[1]  # the header names it as given
    assert outputs[0].splitlines()[1:] == outputs[1].splitlines()[1:]
    with pytest.raises(UserError, match="--quantize without --measure names one k-bit dtype"):
        estimate(model="all-minilm-l6-v2", method=["lora"], quantize="nf4,int8")
    with pytest.raises(UserError, match="--quantize must be one of"):
        estimate(model="all-minilm-l6-v2", method=["lora"], quantize="nf5", measure=True)


@pytest.mark.slow
def test_measured_peak_of_quantised_lora_on_minilm():
    """`estimate --method lora --quantize nf4,int8 --measure` on MiniLM, batch 8 x 128: within 15% (measured
    -6%/-7% on a loaded machine; /work/notes/results_qlora.md)."""
    from deltatune.estimate.measure import measure_methods

    rows = measure_methods("minilm", ["lora"], batch_size=8, seq_len=128, steps=2, quantize=["nf4", "int8"])
    assert [r.method for r in rows] == ["lora nf4", "lora int8"]
    assert all(r.error is None and abs(r.relative_error) <= 0.15 for r in rows), [
        (r.method, r.error, r.relative_error) for r in rows]


def test_quantised_qkv_stay_unfused_and_quantised_through_the_fast_path(tiny_dir):
    """The fast path leaves quantised q/k/v unfused: a dequantise-and-stack group was measured slower per
    whole step on SmolLM2 (4 interleaved runs; /work/notes/results_qlora.md); `restore` keeps the storages."""
    from deltatune import fast

    tm, _, _ = quantised_lora(tiny_dir, "nf4")
    info = fast.prepare(tm, precision="bf16")
    assert info.fused_layers == 0 and info.lm_loss == "chunked"  # the chunked LM loss does apply
    tm.module.train()
    fast.training_forward(tm)(lm_batch(tm, 2)).loss.backward()
    fast.restore(tm)
    assert all(storage.is_quantized(m) for _, m in quantize.quantizable(tm))
