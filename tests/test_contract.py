"""The one method contract (methods/base.py `Method`): every method meets it, every hook has a default,
nothing outside methods/ probes a method, and a method written as one file trains, saves and loads."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest
import tiny
import torch
from torch import nn

from deltatune.backbone import load_task_model
from deltatune.batching import encode
from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.delta import apply_delta, read_meta, read_tensors, save_delta
from deltatune.methods import REGISTRY
from deltatune.methods.base import Method, decay_groups, replace_module, resolve_targets, train_head
from deltatune.train import train_model

PACKAGE = Path(__file__).resolve().parents[1] / "deltatune"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_meets_the_contract(name):
    method = REGISTRY[name]
    assert isinstance(method, Method) and method.NAME == name
    assert dataclasses.is_dataclass(method.Config)
    for hook in ("apply", "default_lr", "pooling_for", "param_groups", "extra_loss", "on_train_step",
                 "checkpoint_state", "load_checkpoint_state", "delta_state", "load_delta_state"):
        assert callable(getattr(method, hook)), hook
    assert method.default_lr(method.Config()) >= 0
    assert (method.to_peft is None) == (method.from_peft is None) or method.PEFT_TYPE
    assert method.ROW_INPUT in (None, "soft_tokens", "prefix")


def test_nothing_outside_methods_probes_a_method():
    probe = re.compile(r"(hasattr|getattr)\((method|REGISTRY\[[^]]+\]|REGISTRY\.get\([^)]*\))\s*,")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if "methods" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not offenders, offenders


def test_a_module_without_the_required_names_is_refused():
    with pytest.raises(TypeError, match="apply"):
        Method.of(types.ModuleType("half", "a method file without apply"))


def test_constants_pass_through_but_unknown_hooks_do_not():
    lora = REGISTRY["lora"]
    assert lora.ADAPTER == "default"  # a constant of the method file
    with pytest.raises(AttributeError):
        lora.not_a_hook  # noqa: B018


# ---- a method added as one file: a learned per-channel scale on the value projections -------------------

class ScaleLinear(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.scale = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):  # (B, T, k) -> (B, T, d)
        return self.base_layer(x) * self.scale


@dataclasses.dataclass
class ScaleConfig:
    target_modules: tuple[str, ...] = ("value",)


def scale_apply(task_model, config):
    for name in resolve_targets(task_model, config.target_modules):
        layer = ScaleLinear(task_model.module.get_submodule(name))
        replace_module(task_model.module, name, layer)
        layer.scale.requires_grad_(True)
    train_head(task_model)


def scale_module(**hooks) -> types.ModuleType:
    module = types.ModuleType("scale")
    module.__dict__.update(NAME="scale", Config=ScaleConfig, DEFAULT_LR=1e-2, apply=scale_apply, **hooks)
    return module


def test_a_one_file_method_trains_saves_and_loads(tiny_dir, toy_csv, tmp_path):
    steps: list[int] = []
    groups_seen: list[int] = []

    def param_groups(task_model, config, lr, weight_decay):  # LoRA+-style: the scales at 10x
        groups = decay_groups(task_model.module, lr, weight_decay)
        groups_seen.append(len(groups))
        return groups

    method = Method.of(scale_module(on_train_step=lambda tm, c, step, total: steps.append(step),
                                    param_groups=param_groups))
    task = load_task(data=toy_csv)
    with tiny.torch_threads(1):
        tm = load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean")
        config = method.Config()
        method.apply(tm, config)
        rows = {s: encode(tm.tokenizer, getattr(task, s), 32, s) for s in ("train", "validation")}
        train_model(tm, method, config, rows["train"][:32], rows["validation"][:16],
                    TrainConfig(epochs=1, batch_size=16, progress=False, cache="off"))
        assert steps == [1, 2] and groups_seen == [2]
        scales = [p for n, p in tm.module.named_parameters() if n.endswith(".scale")]
        assert scales and any(not torch.equal(p, torch.ones_like(p)) for p in scales)
        save_delta(tmp_path / "d", tm, method, config, {"task": {"name": "toy"}})
        fresh = load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean")
        apply_delta(fresh, read_meta(tmp_path / "d"), read_tensors(tmp_path / "d"), method, config)
        batch = dict(tm.tokenizer(["good movie"], return_tensors="pt"))
        tm.module.eval()
        fresh.module.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh.module(**batch).logits, tm.module(**batch).logits)


def test_adalora_budget_state_survives_a_checkpoint(tiny_dir, toy_csv):
    """A run resumed from a checkpoint continues AdaLoRA's allocation where it stopped."""
    method = REGISTRY["adalora"]
    task = load_task(data=toy_csv)
    with tiny.torch_threads(1):
        tm = load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean")
        config = method.Config(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1)
        method.apply(tm, config)
        rows = encode(tm.tokenizer, task.train[:48], 32, "train")
        train_model(tm, method, config, rows[:32], rows[32:], TrainConfig(epochs=1, batch_size=8, progress=False,
                                                                           cache="off"))
        saved = method.checkpoint_state(tm, config)
        masks = [v for k, v in saved.items() if k.startswith("rank_mask/")]
        assert saved["fixed"] and masks and any(not bool(m.all()) for m in masks)  # some triplets dropped
        fresh = load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean")
        method.apply(fresh, config)
        method.load_checkpoint_state(fresh, config, saved)
        assert method.checkpoint_state(fresh, config).keys() == saved.keys()
        for key, value in method.checkpoint_state(fresh, config).items():
            torch.testing.assert_close(value, saved[key])
