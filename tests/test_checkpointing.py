"""--gradient-checkpointing: every trainable method gets the gradients it gets without checkpointing, on tiny
BERT / Llama / GPT-2, on the plain fp32 path and the fast path (bf16 frozen weights, fused q/k/v, explicit
attention), through the frozen-prefix cache; the training loop switches it on and off; end to end, a LoRA
job trains to the same losses and accuracy."""

import json
import warnings

import pytest
import torch

from deltatune import fast
from deltatune.backbone import load_task_model
from deltatune.batching import encode
from deltatune.caching import FrozenPrefixCache, frozen_prefix_depth
from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.errors import UserError
from deltatune.evaluate import forward_batch
from deltatune.fast.precision import is_projection
from deltatune.methods import method_names, resolve_method
from deltatune.train import gradient_checkpointing, train_model
from deltatune.workflow import TrainJob, run_train_job

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)

KINDS = ["bert", "llama", "gpt2"]
NO_BIAS_GROUPS = "A+L,A+P,A+P,P+L"  # Llama has no biases: S4 without BitFit
SMALL = {
    "adalora": {"init_r": 4, "target_r": 2},
    "adapter": {"reduction_factor": 4},
    "mam": {"num_virtual_tokens": 3, "encoder_hidden_size": 8, "bottleneck": 8},
    "prompt": {"num_virtual_tokens": 4},
    "prefix": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "intrinsic": {"dim": 50},
    "said": {"dim": 60},
    "s4": {"lora_rank": 2, "adapter_bottleneck": 4, "prefix_tokens": 3},
}
"""Small options per method (every other method runs with its defaults)."""


def trainable_methods() -> list[str]:
    """Every registry name and preset that trains by gradient (not `fit`: features; not `run_job`: icl, knn)."""
    names = []
    for name in method_names():
        method, _ = resolve_method(name, SMALL.get(name))
        if method.trains_by_gradient:
            names.append(name)
    return names


METHODS = trainable_methods()
CASES = [(name, kind) for name in METHODS for kind in KINDS if (name, kind) != ("bitfit", "llama")]
"""Every method on every kind (Llama has no biases for BitFit)."""
TEXTS = ["good movie", "the plot was awful and dull", "a film with a very fine cast"]


def test_every_kind_of_method_is_covered():
    assert {"lora", "adalora", "bitfit", "full", "head", "last2", "s4", "intrinsic", "adapter", "ia3", "mam",
            "prompt", "prefix", "ptuning"} <= set(METHODS)
    assert not {"features", "icl", "knn"} & set(METHODS)


def prepared(tiny_dir, kind, name, **extra):
    tm = load_task_model(tiny_dir(kind), num_labels=2)
    tm.label_names = ["bad", "good"]
    options = {**SMALL.get(name, {}), **extra}
    if name == "s4" and kind == "llama":
        options["groups"] = NO_BIAS_GROUPS
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    perturb(tm)
    for module in tm.module.modules():  # the same computation in both runs, whatever a method adds
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return tm, method, config


def perturb(tm, seed=1):
    """Move every trainable tensor away from its start (LoRA's B, a prefix MLP's last layer start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(tm.module.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3)


class LayerProbe:
    """Counts the calls of one of the top layer's own projections (twice per step when the layer is
    recomputed) and whether the top layer's output requires grad (backward reaches into the layers)."""

    def __init__(self, tm):
        layer = tm.layers()[-1]
        leaf = next(m for m in layer.modules() if m in tm.loaded_modules and is_projection(m))
        self.calls, self.requires_grad = 0, []
        self.handles = [
            leaf.register_forward_pre_hook(self.count),
            layer.register_forward_hook(self.output),
        ]

    def count(self, *_):
        self.calls += 1

    def output(self, _module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        self.requires_grad.append(hidden.requires_grad)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def grads(tm, batch, checkpointing, cache=None):
    """The trainable parameters' gradients of one training step; and the probe."""
    probe = LayerProbe(tm)
    with gradient_checkpointing(tm, checkpointing):
        if checkpointing:
            assert all(layer.gradient_checkpointing for layer in tm.layers())
        tm.module.train()
        tm.module.zero_grad(set_to_none=True)
        forward_batch(tm, batch, cache).loss.float().backward()
    probe.remove()
    out = {n: p.grad.clone() for n, p in tm.module.named_parameters() if p.requires_grad}
    tm.module.zero_grad(set_to_none=True)
    return out, probe


def a_batch(tm):
    enc = tm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {**dict(enc), "labels": torch.tensor([1, 0, 1]), "keys": [f"row{i}" for i in range(len(TEXTS))]}


def check_same_gradients(tm, batch, cache=None):
    plain, plain_probe = grads(tm, batch, False, cache)
    checkpointed, probe = grads(tm, batch, True, cache)
    assert plain and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())
    assert plain_probe.calls == 1 and probe.requires_grad == plain_probe.requires_grad
    # recomputed in backward exactly when backward reaches the layer (head-only: it never does)
    assert probe.calls == (2 if probe.requires_grad[0] else 1)
    assert not any(layer.gradient_checkpointing for layer in tm.layers())  # switched off again
    return probe


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_checkpointing_gives_the_same_gradients(tiny_dir, name, kind):
    tm, _, _ = prepared(tiny_dir, kind, name)
    probe = check_same_gradients(tm, a_batch(tm))
    if name == "head":  # a frozen backbone: nothing makes the layers' outputs require grad
        assert probe.requires_grad == [False]
    else:
        assert probe.requires_grad == [True]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_checkpointing_gives_the_same_gradients_on_the_fast_path(tiny_dir, name, kind):
    tm, _, _ = prepared(tiny_dir, kind, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = fast.prepare(tm, precision="bf16", attention="explicit", dropout=0.0)
    assert info.bf16_modules > 0
    check_same_gradients(tm, a_batch(tm))
    fast.restore(tm)


@pytest.mark.parametrize("kind", ["bert", "llama"])  # GPT-2: its bottom cannot be cached exactly
def test_checkpointing_through_the_frozen_prefix_cache(tiny_dir, kind):
    tm, _, _ = prepared(tiny_dir, kind, "head", unfreeze_last=1)
    assert frozen_prefix_depth(tm) == 1
    batch = a_batch(tm)
    cache = FrozenPrefixCache(tm, 1)
    tm.module.eval()
    cache.add(batch)
    without_cache, _ = grads(tm, batch, True)
    probe = check_same_gradients(tm, batch, cache)  # the top layer alone, recomputed from the cached h_1
    assert probe.requires_grad == [True]
    for name, grad in without_cache.items():
        torch.testing.assert_close(grad, grads(tm, batch, True, cache)[0][name], msg=name)


def toy_rows(tm, toy_csv):
    task = load_task(data=toy_csv, train_size=64, val_size=32, test_size=16)
    return [encode(tm.tokenizer, getattr(task, s), 32, s) for s in ("train", "validation")]


def test_the_loop_trains_the_same_with_the_cache_and_switches_checkpointing_off(tiny_dir, toy_csv):
    histories = []
    for checkpointing in (False, True):
        tm = load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean")
        method, config = resolve_method("head", {"unfreeze_last": 1})
        method.apply(tm, config)
        train, validation = toy_rows(tm, toy_csv)
        result = train_model(tm, method, config, train, validation,
                             TrainConfig(epochs=2, batch_size=16, lr=1e-2, progress=False,
                                         gradient_checkpointing=checkpointing))
        assert result.cache["depth"] == 1  # the bottom layer came from the cache
        histories.append(result.history)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in tm.module.modules())
        assert not getattr(tm.module, "_require_grads_hooks", None)  # no hook left on the embeddings
    for plain, checkpointed in zip(*histories, strict=True):
        assert checkpointed["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
        assert checkpointed["accuracy"] == plain["accuracy"]


def test_a_model_without_checkpointing_is_a_one_line_error(tiny_dir, toy_csv):
    tm = load_task_model(tiny_dir("llama"), num_labels=2)
    method, config = resolve_method("lora")
    method.apply(tm, config)
    tm.module.supports_gradient_checkpointing = False
    train, validation = toy_rows(tm, toy_csv)
    with pytest.raises(UserError, match="does not support gradient checkpointing") as info:
        train_model(tm, method, config, train, validation,
                    TrainConfig(epochs=1, progress=False, gradient_checkpointing=True))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kind", "precision"), [("bert", "auto"), ("bert", "fp32"), ("llama", "auto")])
def test_a_checkpointed_lora_job_trains_to_the_same_result(tiny_dir, toy_csv, tmp_path, kind, precision):
    task = load_task(data=toy_csv, train_size=96, val_size=24, test_size=24)
    runs = []
    for checkpointing in (False, True):
        config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, progress=False, precision=precision,
                             gradient_checkpointing=checkpointing)
        out = tmp_path / f"ckpt{int(checkpointing)}"
        metrics = run_train_job(TrainJob(method="lora", task=task, model=tiny_dir(kind), train=config,
                                         options={"target_modules": "query,value,ffn_out"}), out)
        meta = json.loads((out / "delta.json").read_text())
        assert meta["train_config"]["gradient_checkpointing"] == ("on" if checkpointing else "off")
        runs.append((metrics, meta["history"]))
    (plain, plain_history), (checkpointed, history) = runs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for before, after in zip(plain_history, history, strict=True):
        assert after["train_loss"] == pytest.approx(before["train_loss"], abs=1e-4)
    assert checkpointed["accuracy"] == pytest.approx(plain["accuracy"], abs=1e-6)
    assert checkpointed["validation_accuracy"] == pytest.approx(plain["validation_accuracy"], abs=1e-6)
    assert checkpointed["precision"] == plain["precision"]
    if precision == "auto" and fast.resolve_precision("auto", torch.device("cpu")) == "bf16":
        assert checkpointed["fast_path"]["precision"] == "bf16"
        if kind != "gpt2":
            assert checkpointed["fast_path"]["fused_layers"] == 2
