"""The training loop: loss drops, determinism, frozen-prefix caching is exact, bucketing loses nothing."""

import pytest
import torch

from deltatune.backbone import load_task_model
from deltatune.batching import encode, eval_batches, train_batches
from deltatune.caching import frozen_prefix_depth
from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.evaluate import predict_logits
from deltatune.methods import resolve_method
from deltatune.train import train_model


def prepared(tiny_dir, toy_csv, name, kind="bert", pooling="hf", **options):
    task = load_task(data=toy_csv)
    tm = load_task_model(tiny_dir(kind), num_labels=len(task.label_names), pooling=pooling)
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    rows = {s: encode(tm.tokenizer, getattr(task, s), 32, s) for s in ("train", "validation", "test")}
    return tm, method, config, rows


@pytest.mark.parametrize("name", ["full", "lora", "head", "bitfit"])
def test_loss_drops_on_a_separable_toy_set(tiny_dir, toy_csv, name):
    # a random tiny backbone is a hard start for LoRA: adapt every projection, larger steps
    options = {"target_modules": "query,key,value,attn_out,ffn_in,ffn_out"} if name == "lora" else {}
    pooling = "mean" if name in ("head", "bitfit") else "hf"  # a random CLS token carries little content
    tm, method, config, rows = prepared(tiny_dir, toy_csv, name, pooling=pooling, **options)
    result = train_model(tm, method, config, rows["train"], rows["validation"],
                         TrainConfig(epochs=6, batch_size=16, lr={"lora": 1e-2, "head": 3e-2, "bitfit": 3e-2}.get(name, 3e-3),
                                     progress=False, cache="off"))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.9, losses


def test_features_learns_the_toy_task(tiny_dir, toy_csv):
    tm, method, config, rows = prepared(tiny_dir, toy_csv, "features", pooling="mean")
    result = train_model(tm, method, config, rows["train"], rows["validation"], TrainConfig(progress=False))
    assert result.validation["accuracy"] >= 0.6


def test_training_is_deterministic_for_a_seed(tiny_dir, toy_csv):
    outs = []
    for _ in range(2):
        tm, method, config, rows = prepared(tiny_dir, toy_csv, "lora")
        train_model(tm, method, config, rows["train"], rows["validation"],
                    TrainConfig(epochs=1, batch_size=16, progress=False))
        outs.append(predict_logits(tm, rows["test"]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,depth", [("head", 2), ("last2", 0), ("lora", 0), ("head1", 1)])
def test_frozen_prefix_depth(tiny_dir, toy_csv, name, depth):
    options = {"unfreeze_last": 1} if name == "head1" else {}
    tm, *_ = prepared(tiny_dir, toy_csv, "head" if name == "head1" else name, **options)
    assert frozen_prefix_depth(tm) == depth


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_frozen_prefix_cache_trains_exactly_like_no_cache(tiny_dir, toy_csv, kind, cache):
    results = {}
    for mode in ("off", cache):
        tm, method, config, rows = prepared(tiny_dir, toy_csv, "head", kind=kind, unfreeze_last=1)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, progress=False, cache=mode)
        result = train_model(tm, method, config, rows["train"], rows["validation"], cfg)
        results[mode] = (result, predict_logits(tm, rows["test"]))
    (plain, plain_logits), (cached, cached_logits) = results["off"], results[cache]
    assert cached.cache["depth"] == 1
    if cache == "disk":
        assert cached.cache["spilled_mb"] > 0
    assert [round(h["train_loss"], 5) for h in plain.history] == [round(h["train_loss"], 5) for h in cached.history]
    assert torch.allclose(plain_logits, cached_logits, atol=1e-5)


def test_bucketing_keeps_every_example_once():
    lengths = [(i * 7919) % 53 + 1 for i in range(1000)]
    batches = train_batches(lengths, 32, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert sorted(i for b in eval_batches(lengths, 32) for i in b) == list(range(1000))
    # each batch spans a narrow range of lengths: little padding
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10


def test_evaluation_returns_logits_in_input_order(tiny_dir, toy_csv):
    tm, _, _, rows = prepared(tiny_dir, toy_csv, "head")
    test = rows["test"]
    together = predict_logits(tm, test, batch_size=7)
    one_by_one = torch.cat([predict_logits(tm, [r], batch_size=1) for r in test])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_auto_pooling_follows_a_sentence_transformers_folder(tiny_dir, tmp_path):
    import json
    import shutil

    from deltatune.backbone import load_task_model, resolve_pooling

    plain = tiny_dir("bert")
    assert resolve_pooling(plain, "auto") == "hf" and resolve_pooling(plain, "cls") == "cls"
    st = tmp_path / "st"
    shutil.copytree(plain, st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert resolve_pooling(str(st), "auto") == "mean"
    assert load_task_model(str(st), num_labels=2, pooling="auto").pooling == "mean"
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert resolve_pooling(str(st), "auto") == "cls"
    (st / "modules.json").write_text("{not json")
    assert resolve_pooling(str(st), "auto") == "hf"


def test_eval_steps_records_a_validation_curve_without_changing_training(tiny_dir, toy_csv):
    results = []
    for eval_steps in (0, 2):
        tm, method, config, rows = prepared(tiny_dir, toy_csv, "lora")
        cfg = TrainConfig(epochs=2, batch_size=8, progress=False, cache="off", eval_steps=eval_steps)
        results.append((train_model(tm, method, config, rows["train"], rows["validation"], cfg),
                        predict_logits(tm, rows["test"])))
    (plain, plain_logits), (curve, curve_logits) = results
    steps_per_epoch = plain.history[0]["step"]
    mid = [h for h in curve.history if h["step"] % steps_per_epoch]  # the entries inside an epoch
    assert mid and [h["step"] for h in mid] == [s for s in range(2, 2 * steps_per_epoch, 2) if s % steps_per_epoch]
    assert all("accuracy" in h for h in curve.history)
    clock = [h["train_seconds"] for h in curve.history]
    assert clock == sorted(clock) and clock[0] > 0
    # validating in between changes nothing of the training itself
    assert torch.equal(plain_logits, curve_logits)
    assert [h for h in curve.history if not h["step"] % steps_per_epoch][-1]["accuracy"] == plain.history[-1]["accuracy"]
