"""AdaLoRA: identity at init, the budget schedule, the rank budget after training, the orthogonality term."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.backbone import load_task_model
from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.errors import UserError
from deltatune.loading import load_delta
from deltatune.methods import adalora, resolve_method
from deltatune.workflow import TrainJob, run_train_job

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


def inputs_of(task_model) -> dict:
    return dict(task_model.tokenizer(["good movie", "the plot was awful and dull"], padding=True,
                                      return_tensors="pt"))


@torch.no_grad()
def logits(task_model, inputs) -> torch.Tensor:
    task_model.module.eval()
    return task_model.module(**inputs).logits


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_adalora_is_an_identity_at_init_and_trains_only_p_lambda_q(tiny_dir, kind):
    tm = load_task_model(tiny_dir(kind), num_labels=2)
    inputs = inputs_of(tm)
    reference = logits(tm, inputs)
    method, config = resolve_method("adalora", {"target_modules": "query,value,ffn_out", "init_r": "6", "target_r": "4"})
    method.apply(tm, config)
    assert torch.equal(logits(tm, inputs), reference)  # λ = 0
    new = {n for n, p in tm.module.named_parameters() if p.requires_grad} - set(tm.head_names)
    assert new and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_E", "lora_B") for n in new)
    layer = next(iter(adalora.svd_layers(tm).values()))
    assert layer.lora_A["default"].shape == (6, layer.in_features)  # Q: (r, k)
    assert layer.lora_B["default"].shape == (layer.out_features, 6)  # P: (d, r)


def test_budget_schedule_is_cubic_between_tinit_and_tfinal():
    config = adalora.Config(init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5)
    n = 10  # adapted matrices: budget 120 -> 40
    budgets = [adalora.budget_at(t, 100, config, n) for t in range(1, 101)]
    assert budgets[9] == (120, False)  # t = tinit: warm-up, nothing dropped
    assert budgets[79] == (40, True) and budgets[99] == (40, True)  # t >= T - tfinal: final budget
    phase = [b for b, _ in budgets[10:79]]
    assert phase == sorted(phase, reverse=True) and 40 <= phase[-1] < phase[0] < 120
    assert budgets[44][0] == int(40 + 80 * (1 - 35 / 70) ** 3)  # t = 45
    assert [t for t in range(11, 80) if budgets[t - 1][1]] == list(range(15, 80, 5))  # every deltaT


def test_rank_budget_is_respected_after_the_schedule(tiny_dir, toy_csv, tmp_path):
    task = load_task(data=toy_csv, train_size=64, val_size=16, test_size=16)
    options = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2,
               "target_modules": "query,value,ffn_out"}
    config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, progress=False)
    run_train_job(TrainJob(method="adalora", task=task, model=tiny_dir("bert"), options=options, train=config),
                  tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert meta["method_config"]["total_step"] == 24  # recorded from the loop: 8 steps x 3 epochs
    tensors = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    lambdas = {k: v for k, v in tensors.items() if ".lora_E." in k}
    assert len(lambdas) == 6  # 2 layers x 3 roles
    kept = {k: int((v != 0).sum()) for k, v in lambdas.items()}
    assert sum(kept.values()) == 2 * 6  # target_r x matrices, reallocated freely between them
    loaded = load_delta(tmp_path / "delta")
    assert sum(adalora.ranks(loaded.task_model).values()) == 12


def test_masked_triplets_stay_dropped_during_the_final_phase(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=2)
    method, config = resolve_method("adalora", {"init_r": 4, "target_r": 1, "tfinal": 2})
    method.apply(tm, config)
    inputs = inputs_of(tm)
    params = [p for p in tm.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tm.module.train()
    for step in range(1, 6):  # T = 5: the budget is fixed at step 3, then kept for 2 steps
        loss = tm.module(**inputs, labels=torch.tensor([0, 1])).loss + method.extra_loss(tm, config)
        loss.backward()
        optimizer.step()
        method.on_train_step(tm, config, step, 5)
        optimizer.zero_grad()
        if step >= 3:
            assert sum(adalora.ranks(tm).values()) == 4  # 1 x 4 matrices, even as Adam keeps moving
    masks = [layer.rank_mask() for layer in adalora.svd_layers(tm).values()]
    assert sum(int(m.sum()) for m in masks) == 4


def test_orthogonality_regulariser_is_added_by_the_training_loop(tiny_dir, toy_csv, tmp_path, monkeypatch):
    tm = load_task_model(tiny_dir("bert"), num_labels=2)
    method, config = resolve_method("adalora", {"orth_reg_weight": 0.5})
    method.apply(tm, config)
    reg = method.extra_loss(tm, config)
    reg.backward()  # ‖PᵀP − I‖ and ‖QQᵀ − I‖ pull P and Q towards orthogonal columns / rows
    layer = next(iter(adalora.svd_layers(tm).values()))
    assert reg.item() > 0 and layer.lora_A["default"].grad.abs().sum() > 0
    assert method.extra_loss(tm, adalora.Config(orth_reg_weight=0.0)).item() == 0.0
    calls = []
    real = adalora.extra_loss
    from dataclasses import replace

    from deltatune import methods

    counted = replace(methods.REGISTRY["adalora"], extra_loss=lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(methods.REGISTRY, "adalora", counted)
    task = load_task(data=toy_csv, train_size=16, val_size=8, test_size=8)
    run_train_job(TrainJob(method="adalora", task=task, model=tiny_dir("bert"),
                           train=TrainConfig(epochs=1, batch_size=8, progress=False)), tmp_path / "d")
    assert len(calls) == 2  # once per training batch


def test_bad_options_are_user_errors(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=2)
    method, config = resolve_method("adalora", {"init_r": 4, "target_r": 8})
    with pytest.raises(UserError, match="target_r"):
        method.apply(tm, config)
    with pytest.raises(UserError, match="beta1"):
        method.apply(tm, adalora.Config(beta1=1.0))
