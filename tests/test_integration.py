"""The real packaged all-MiniLM-L6-v2 on a small rotten-tomatoes subset (a few seconds each)."""

import pytest
import torch

from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.loading import load_delta
from deltatune.workflow import TrainJob, run_train_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_task():
    return load_task("rotten-tomatoes", train_size=400, val_size=100, test_size=200)


def test_minilm_loads_with_a_stable_fingerprint():
    from deltatune.backbone import load_task_model

    a = load_task_model("minilm", num_labels=2)
    b = load_task_model("minilm", num_labels=2, pooling="mean")
    assert a.fingerprint == b.fingerprint  # the head does not enter the fingerprint
    assert a.arch.family == "bert" and len(a.layers()) == 6


def test_features_on_real_data_beats_chance(small_task, tmp_path):
    metrics = run_train_job(TrainJob(method="features", task=small_task, pooling="mean",
                                     train=TrainConfig(progress=False)), tmp_path / "f")
    assert metrics["accuracy"] > 0.62  # mean-pooled MiniLM embeddings carry sentiment
    assert metrics["trainable_params"] == 384 * 2 + 2


def test_lora_trains_saves_and_reloads_on_real_minilm(small_task, tmp_path):
    metrics = run_train_job(TrainJob(method="lora", task=small_task,
                                     train=TrainConfig(epochs=1, batch_size=32, progress=False)), tmp_path / "l")
    assert metrics["trainable_pct"] < 1.0
    loaded = load_delta(tmp_path / "l")
    tok = loaded.task_model.tokenizer
    inputs = dict(tok(["a gorgeous, moving film", "a dull mess"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        probs = loaded.task_model.module(**inputs).logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
