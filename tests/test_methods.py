"""Every registered method on a tiny random BERT: what trains, identity at init, save -> load."""

import pytest
import torch

from deltatune.backbone import load_task_model
from deltatune.delta import save_delta
from deltatune.loading import load_delta
from deltatune.methods import REGISTRY, method_names, resolve_method

CORE = ["features", "head", "last2", "full", "lora", "bitfit"]


def tiny_model(tiny_dir, kind="bert", pooling="hf", num_labels=3):
    return load_task_model(tiny_dir(kind), num_labels=num_labels, pooling=pooling)


def batch(task_model):
    enc = task_model.tokenizer(["good movie", "the plot was awful and dull", "a film"], padding=True,
                               return_tensors="pt")
    return dict(enc)


def logits(task_model, inputs):
    task_model.module.eval()
    with torch.no_grad():
        return task_model.module(**inputs).logits


def test_registry_has_the_core_methods():
    assert set(CORE) <= set(method_names())


@pytest.mark.parametrize("name", CORE)
def test_only_the_method_parameters_train(tiny_dir, name):
    tm = tiny_model(tiny_dir)
    before = {n for n, _ in tm.module.named_parameters()}
    method, config = resolve_method(name)
    method.apply(tm, config)
    trainable = {n for n, p in tm.module.named_parameters() if p.requires_grad}
    new = trainable - before
    old = trainable & before
    head = set(tm.head_names)
    if name == "full":
        assert trainable == {n for n, _ in tm.module.named_parameters()}
    elif name == "lora":
        assert new and all(".lora_A." in n or ".lora_B." in n for n in new)
        assert old == head
    elif name == "bitfit":
        assert old - head and all(n.endswith(".bias") for n in old - head)
        assert not new
    elif name in ("head", "features"):
        assert old == head if name == "head" else old == {"classifier.weight", "classifier.bias"}
    elif name == "last2":
        layers = {n for n in old if ".layer." in n}  # the tiny model has 2 layers: both train
        assert layers and old - layers - head == set()
        assert not any("embeddings" in n for n in trainable)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_lora_is_an_identity_at_init(tiny_dir, kind):
    tm = tiny_model(tiny_dir, kind)
    inputs = batch(tm)
    reference = logits(tm, inputs)
    method, config = resolve_method("lora", {"target_modules": "query,value,ffn_out"})
    method.apply(tm, config)
    assert torch.equal(logits(tm, inputs), reference)


@pytest.mark.parametrize("name", [m for m in REGISTRY if m not in ("features",)] + ["last2"])
def test_save_then_load_gives_the_same_logits(tiny_dir, tmp_path, name):
    tm = tiny_model(tiny_dir)
    method, config = resolve_method(name)
    method.apply(tm, config)
    torch.manual_seed(1)
    with torch.no_grad():  # move every trainable tensor away from its initial value
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = batch(tm)
    expected = logits(tm, inputs)
    save_delta(tmp_path / name, tm, method, config, {"task": {"name": "toy", "label_names": ["a", "b", "c"]}})
    loaded = load_delta(tmp_path / name)
    assert torch.allclose(logits(loaded.task_model, inputs), expected, atol=1e-6)


def test_lora_delta_holds_only_lora_and_head_tensors(tiny_dir, tmp_path):
    tm = tiny_model(tiny_dir)
    method, config = resolve_method("lora")
    method.apply(tm, config)
    save_delta(tmp_path / "d", tm, method, config, {"task": {"name": "toy", "label_names": ["a", "b", "c"]}})
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "d" / "delta.safetensors")))
    assert names == {n for n, p in tm.module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("classifier.") for n in names)
