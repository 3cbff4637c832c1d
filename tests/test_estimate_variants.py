"""The estimator's rows for the LoRA variants (issue 20): each method file sizes its own adapted matrices
(`estimate_site`, methods/base.py), the counts are what `apply` builds, and the detailed model keeps what
autograd really saves (DoRA's per-token W0 x + s·BAx, VeRA's and LoHa's formed factors, LoKr's reshaped
products) on tiny BERT / Llama / GPT-2 models built by deltatune itself."""

from __future__ import annotations

import json

import pytest
import torch
from test_estimate import measured_saved_bytes, with_default

from deltatune.backbone import load_task_model
from deltatune.estimate import METHODS, plan_for_method
from deltatune.estimate.cli import estimate, estimate_for_model
from deltatune.estimate.detailed import RunSettings, activation_report
from deltatune.estimate.shapes import load_shapes
from deltatune.methods import lokr, resolve_method, vera
from deltatune.methods.base import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = {  # estimate row: (method, options); rrlora with one rank so that its count is exact
    "dora": ("dora", {}), "vera": ("vera", {}), "loha": ("loha", {}), "lokr": ("lokr", {}),
    "rrlora": ("rrlora", {"random_ranks": "3-3"}), "pissa": ("lora", {"init": "pissa"}),
}


def applied(path, name: str, options: dict):
    task_model = load_task_model(path, num_labels=2)
    task_model.label_names = ["neg", "pos"]
    method, config = resolve_method(name, options)
    method.apply(task_model, config)
    return task_model, config


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_and_saved_tensors_are_what_the_method_builds(tiny_dir, kind, variant):
    path = tiny_dir(kind)
    name, options = VARIANTS[variant]
    task_model, config = applied(path, name, options)
    row = "lora" if variant == "pissa" else name
    [estimated] = estimate_for_model(str(path), [row], generation=False, num_labels=2, options={row: options})
    assert estimated.trainable_params == count_parameters(task_model.module)[0]
    task_model.module.train()
    ids = torch.randint(10, 99, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    shapes = load_shapes(str(path))
    plan = plan_for_method(row, shapes, False, config)
    report = activation_report(shapes, plan, RunSettings(2, 16, 4, attention="sdpa", device="cpu", generation=False))
    assert report.total_bytes == pytest.approx(measured_saved_bytes(task_model.module, batch, buffers_too=True), rel=0.02)


def test_every_variant_has_a_row_with_params_and_memory(capsys):
    names = ["lora", "dora", "vera", "loha", "lokr", "rrlora"]
    assert set(names) <= set(METHODS)
    assert estimate(model="minilm", method=[",".join(names)], json_=True) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == names and all(r["trainable_params"] > 0 and r["total_gb"] > 0 for r in rows.values())
    head = 384 * 2 + 2
    assert rows["vera"]["trainable_params"] == 6 * 2 * (256 + 384) + head  # d (r) and b (d) per matrix
    assert rows["dora"]["trainable_params"] == rows["lora"]["trainable_params"] + 6 * 2 * 384  # + m
    assert rows["lokr"]["trainable_params"] == 6 * 2 * (16 * 16 + 24 * 4 + 4 * 24) + head  # 384 = 16 · 24
    assert rows["dora"]["activations_gb"] > rows["lora"]["activations_gb"]  # m's gradient keeps W0 x + s·BAx


@pytest.mark.parametrize("module, defaults, delta", [
    (vera, dict(r=64), 6 * 2 * (64 + 384)), (lokr, dict(r=8), 6 * 2 * (16 * 16 + 24 * 8 + 8 * 24))])
def test_the_method_files_config_sizes_its_row(monkeypatch, module, defaults, delta):
    """The row is the method file's `estimate_site` over its own Config: a new default changes it."""
    with_default(monkeypatch, module, **defaults)
    [row] = estimate_for_model("all-minilm-l6-v2", [module.NAME])
    assert row.trainable_params == delta + 384 * 2 + 2


@pytest.mark.slow
def test_measured_peak_of_the_variants_on_minilm():
    """`estimate --measure` on MiniLM at batch 8 x 64: within 10% (2 threads-minutes; see results_variants)."""
    from deltatune.estimate.measure import measure_methods

    rows = measure_methods("minilm", ["dora", "vera", "loha", "lokr"], batch_size=8, seq_len=64, steps=2)
    assert all(r.error is None and abs(r.relative_error) <= 0.10 for r in rows), [
        (r.method, r.error, r.relative_error) for r in rows]
