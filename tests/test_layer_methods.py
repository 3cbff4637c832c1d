"""adapter (serial, parallel), ia3 and mam on tiny BERT / Llama / GPT-2: what trains, identity at
init, the formulas, save -> load, learning, gradient checkpointing, and IA3 parity with peft."""

import json

import pytest
import tiny
import torch
from safetensors.torch import load_file

from deltatune.backbone import load_task_model
from deltatune.delta import save_delta
from deltatune.loading import load_delta
from deltatune.methods import REGISTRY, adapter, ia3, resolve_method
from deltatune.peft_format import export_peft, import_peft

KINDS = ["bert", "llama", "gpt2"]
CASES = {
    "adapter": ("adapter", {"reduction_factor": 4}),
    "adapter-ffn": ("adapter", {"placement": "ffn", "bottleneck": 4}),
    "parallel": ("adapter", {"parallel": True, "bottleneck": 8}),
    "ia3": ("ia3", {}),
}
if "mam" in REGISTRY:
    CASES["mam"] = ("mam", {"num_virtual_tokens": 3, "encoder_hidden_size": 8, "bottleneck": 8})
TRAINED = [c for c in CASES if c != "adapter-ffn"]  # adapter-ffn runs the same code as adapter
METHOD_PARAMS = (".adapter_down.", ".adapter_up.", ".ia3_l.", "prompt_encoder.")


def prepared(tiny_dir, kind, case, num_labels=2, pooling="hf"):
    task_model = load_task_model(tiny_dir(kind), num_labels=num_labels, pooling=pooling)
    name, options = CASES[case]
    method, config = resolve_method(name, options)
    method.apply(task_model, config)
    return task_model, method, config


def batch(task_model):
    texts = ["good movie", "the plot was awful and dull", "a film with a very fine cast"]
    return dict(task_model.tokenizer(texts, padding=True, return_tensors="pt"))


def logits(task_model, inputs):
    task_model.module.eval()
    with torch.no_grad():
        return task_model.module(**inputs).logits


def perturb(task_model, seed=1):
    """Move every trainable tensor away from its init, so updates and gradients are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(task_model.module.named_parameters()):
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=gen) * 0.3)


def no_dropout(task_model):
    for module in task_model.module.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@pytest.fixture(autouse=True)
def one_thread():
    with tiny.torch_threads(1):  # tiny models: threads only add overhead on a shared machine
        yield


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_trains_only_its_params_is_identity_at_init_and_round_trips(tiny_dir, tmp_path, kind, case):
    plain = load_task_model(tiny_dir(kind), num_labels=2)
    task_model, method, config = prepared(tiny_dir, kind, case)
    trainable = {n for n, p in task_model.module.named_parameters() if p.requires_grad}
    method_params = {n for n in trainable if any(tag in n for tag in METHOD_PARAMS)}
    assert method_params and trainable - method_params == set(task_model.head_names)
    inputs = batch(plain)
    if case != "mam":  # prefix tuning changes the attention from the start
        assert torch.equal(logits(task_model, inputs), logits(plain, inputs))
    perturb(task_model)
    save_delta(tmp_path / "delta", task_model, method, config, {"head_names": task_model.head_names})
    loaded = load_delta(tmp_path / "delta")
    if case == "mam":  # the prefix MLP is folded into the prefix when saving: equal up to rounding
        torch.testing.assert_close(logits(loaded.task_model, inputs), logits(task_model, inputs))
    else:
        assert torch.equal(logits(loaded.task_model, inputs), logits(task_model, inputs))


def test_adapter_layer_formulas(tiny_dir):
    """Serial BERT: LayerNorm(y + a(y) + x), y = dropout(dense(h)); parallel BERT: LayerNorm(y + s·a(x) + x);
    parallel Llama MLP: mlp(x) + s·a(x)."""
    torch.manual_seed(0)
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for parallel, scale in ((False, 1.0), (True, 2.0)):
        task_model = load_task_model(tiny_dir("bert"), num_labels=2)
        adapter.apply(task_model, adapter.Config(parallel=parallel, scale=scale))
        perturb(task_model)
        block = task_model.layers()[0].attention.output  # BertSelfOutput
        layer = block.dropout if not parallel else block
        base = block.base_layer if parallel else block
        y = base.dropout(base.dense(h)) if parallel else base.dense(h)
        a = scale * adapter.bottleneck_update(y if not parallel else x, layer.adapter_down["default"].weight,
                                              layer.adapter_down["default"].bias,
                                              layer.adapter_up["default"].weight,
                                              layer.adapter_up["default"].bias, torch.relu)
        torch.testing.assert_close(block(h, x), base.LayerNorm(y + a + x))
    task_model = load_task_model(tiny_dir("llama"), num_labels=2)
    adapter.apply(task_model, adapter.Config(parallel=True, placement="ffn", bottleneck=3))
    perturb(task_model)
    mlp = task_model.layers()[0].mlp
    expected = mlp.base_layer(x) + 4.0 * adapter.bottleneck_update(
        x, mlp.adapter_down["default"].weight, mlp.adapter_down["default"].bias,
        mlp.adapter_up["default"].weight, mlp.adapter_up["default"].bias, torch.relu)
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.adapter_down["default"].weight.shape == (3, 32)


def test_batched_adapter_update_matches_one_by_one():
    """One adapter per row (as a server routing tasks would pass) gives each row its own adapter's update."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    weights = [(torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8)) for _ in range(3)]
    stacked = [torch.stack(w) for w in zip(*weights)]
    batched = adapter.bottleneck_update(x, stacked[0], stacked[1][:, None], stacked[2], stacked[3][:, None],
                                        torch.relu)
    for row, (dw, db, uw, ub) in enumerate(weights):
        torch.testing.assert_close(batched[row], adapter.bottleneck_update(x[row], dw, db, uw, ub, torch.relu))


def test_ia3_scales_keys_values_and_ffn(tiny_dir):
    """Llama GQA: k/v vectors have num_kv_heads * head_dim entries; GPT-2: only c_attn's k and v thirds."""
    task_model, _, _ = prepared(tiny_dir, "llama", "ia3")
    layer = task_model.layers()[0]
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (2 * 8, 1)  # 2 kv heads of dim 8
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 37)
    task_model, _, _ = prepared(tiny_dir, "gpt2", "ia3")
    c_attn = task_model.layers()[0].attn.c_attn
    c_attn.ia3_l["default"].data.fill_(2.0)
    x = torch.randn(1, 3, 32)
    out, base = c_attn(x), c_attn.base_layer(x)
    torch.testing.assert_close(out[..., :32], base[..., :32])
    torch.testing.assert_close(out[..., 32:], 2 * base[..., 32:])


@pytest.mark.parametrize("case", TRAINED)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_drops_on_toy_data(tiny_dir, kind, case):
    torch.manual_seed(0)
    pooling = "mean" if kind == "bert" else "hf"  # a random tiny BERT's pooled CLS token carries little
    task_model, method, _ = prepared(tiny_dir, kind, case, pooling=pooling)
    rows = tiny.toy_sentiment_rows(16)
    inputs = dict(task_model.tokenizer([t for t, _ in rows], padding=True, return_tensors="pt"))
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    params = [p for p in task_model.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr={"ia3": 3e-2}.get(method.NAME, 1e-2))  # random backbone: large steps
    task_model.module.train()
    losses = []
    for _ in range(20):
        loss = task_model.module(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("case", TRAINED)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, kind, case):
    task_model, _, _ = prepared(tiny_dir, kind, case)
    perturb(task_model)
    no_dropout(task_model)
    inputs, labels = batch(task_model), torch.tensor([1, 0, 1])

    def grads():
        task_model.module.train()
        task_model.module(**inputs, labels=labels).loss.backward()
        out = {n: p.grad.clone() for n, p in task_model.module.named_parameters() if p.requires_grad}
        task_model.module.zero_grad(set_to_none=True)
        return out

    plain = grads()
    task_model.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert all(plain[n].abs().sum() > 0 for n in plain if "ia3_l" in n or "adapter_up" in n)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_ia3_export_to_peft_gives_the_same_logits(tiny_dir, tmp_path, kind):
    from peft import PeftModel

    task_model, method, config = prepared(tiny_dir, kind, "ia3")
    base = load_task_model(tiny_dir(kind), num_labels=2).module
    perturb(task_model)
    inputs = batch(task_model)
    trained = logits(task_model, inputs)
    for module in task_model.module.modules():
        if isinstance(module, ia3.IA3Linear):
            module.active_adapter = None
    assert (logits(task_model, inputs) - trained).abs().max() > 1e-3  # the vectors themselves matter
    for module in task_model.module.modules():
        if isinstance(module, ia3.IA3Linear):
            module.active_adapter = "default"
    save_delta(tmp_path / "delta", task_model, method, config, {"head_names": task_model.head_names})
    export_peft(tmp_path / "delta", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    assert (trained - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_ia3_import_from_peft_gives_the_same_logits(tiny_dir, tmp_path, kind):
    """peft's default IA3 targets (BERT: key, value and every `output.dense`, input-scaled), through
    `deltatune import` (peft_format.import_peft -> ia3.from_peft) and load_delta."""
    from peft import IA3Config, get_peft_model

    base = load_task_model(tiny_dir(kind), num_labels=2).module
    peft_model = get_peft_model(base, IA3Config(task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(2)
    for _, p in sorted(peft_model.named_parameters()):
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    options, tensors = ia3.from_peft(adapter_config, load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(options["feedforward_modules"]) == (4 if kind == "bert" else 2)
    import_peft(tmp_path / "peft", tmp_path / "delta", model=tiny_dir(kind), labels="neg,pos")
    loaded = load_delta(tmp_path / "delta")
    assert loaded.meta["method"] == "ia3"
    inputs = batch(loaded.task_model)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    assert (logits(loaded.task_model, inputs) - expected).abs().max() <= 1e-4


@pytest.mark.skipif("mam" not in REGISTRY, reason="mam needs methods/prefix.py")
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mam_is_prefix_tuning_plus_a_scaled_parallel_ffn_adapter(tiny_dir, kind):
    task_model, _, _ = prepared(tiny_dir, kind, "mam")
    layer = task_model.layers()[0]
    ffn = layer.output if kind == "bert" else layer.mlp
    assert isinstance(ffn, adapter.AdapterLayer)
    assert ffn.mode == ("residual" if kind == "bert" else "parallel") and ffn.scaling["default"] == 4.0
    adapted = [n for n, m in task_model.module.named_modules() if isinstance(m, adapter.AdapterLayer)]
    assert len(adapted) == 2  # one per layer, none at the attention
    assert "default" in task_model.module.prompt_encoder
