"""Run, save, reload and evaluate a no-tuning strategy (icl, knn) with the same metrics as a tuned method.

    train --method icl|knn ──> method.make_strategy(config, context) ──> strategy.fit(train)  (demos / index)
                          ──> strategy.scores(test) ──> accuracy, macro-F1, ms/example, prompt tokens, shots
                          ──> DELTA/delta.json (+ DELTA/index/ for retrieval)  no tensors: nothing was trained

A strategy provides fit(train, seed), scores(examples) -> (N, K) log-probabilities, `stats`,
save(folder) -> dict, restore(folder, dict), backbone() -> dict and total_params().
`deltatune eval` and `predict` reload it through `loading.load_strategy` (None for a tuned delta).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.config import TrainConfig
from deltatune.data import Example
from deltatune.delta import FORMAT, META, VERSION
from deltatune.errors import UserError
from deltatune.evaluate import classification_metrics
from deltatune.io import atomic_directory, write_json_atomic
from deltatune.memory import PeakMemory
from deltatune.methods.base import config_dict


@dataclass
class StrategyContext:
    """What a method needs to build its strategy (fresh for `train`, `saved` set when reloading a delta)."""

    model: str | None
    device: torch.device
    train: TrainConfig
    task_name: str
    label_names: list[str]
    description: str = ""
    pair: bool = False
    saved: dict[str, Any] | None = None


def timed_scores(strategy, examples: list[Example]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    scores = strategy.scores(examples)
    return scores, time.perf_counter() - start


def strategy_metrics(strategy, examples: list[Example], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1, speed and the strategy's prompt statistics on labelled examples."""
    scores, seconds = timed_scores(strategy, examples)
    metrics: dict[str, Any] = classification_metrics(scores, [e.label for e in examples], num_labels)
    metrics["inference_ms_per_example"] = 1000 * seconds / max(1, len(examples))
    metrics["examples_per_second"] = len(examples) / seconds if seconds > 0 else None
    raw = getattr(strategy, "raw_scores", None)  # icl --calibrate: the accuracy it would have without
    if raw is not None:
        metrics["uncalibrated_accuracy"] = classification_metrics(raw, [e.label for e in examples], num_labels)["accuracy"]
    metrics.update(strategy.stats)
    return metrics


def run_strategy_job(job, method: Any, config: Any, out: str | Path) -> dict[str, Any]:
    """`deltatune train --method icl|knn`: fit, test and save; returns the metrics row (tuned methods' keys)."""
    from deltatune.backbone import pick_device
    from deltatune.train import seed_everything

    train_config = job.train.validate()
    device = pick_device(train_config.device)
    seed_everything(train_config.seed)
    task = job.task
    if task.kind != "classification":
        raise UserError(f"method '{job.method}' classifies; task '{task.name}' is a {task.kind} task")
    pair = any(e.text_pair is not None for e in task.train)
    context = StrategyContext(job.model, device, train_config, task.name, task.label_names, task.description, pair)
    with PeakMemory() as memory:
        strategy = method.make_strategy(config, context)
        start = time.perf_counter()
        strategy.fit(task.train, train_config.seed)
        train_seconds = time.perf_counter() - start
        test = strategy_metrics(strategy, task.test, len(task.label_names))
    total = strategy.total_params()
    fitted = getattr(strategy, "fit_examples", len(task.train))  # training texts embedded (0: random demos)
    metrics = {
        "method": job.method, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
        "validation_accuracy": None, "best_epoch": None,
        "trainable_params": 0, "total_params": total, "trainable_pct": 0.0,
        "peak_memory_mb": memory.peak_mb, "training_memory_increase_mb": memory.increase_mb,
        "cuda_peak_memory_mb": memory.cuda_peak_mb,
        "train_seconds": train_seconds,
        "train_examples_per_second": fitted / train_seconds if fitted and train_seconds > 0 else None,
        "inference_ms_per_example": test["inference_ms_per_example"],
        "examples_per_second": test["examples_per_second"],
        "precision": train_config.precision, "device": str(device),
        "frozen_prefix_cache": {}, "train_examples": len(task.train), "test_examples": len(task.test),
        **{k: v for k, v in strategy.stats.items()},
        **({"uncalibrated_accuracy": test["uncalibrated_accuracy"]} if "uncalibrated_accuracy" in test else {}),
    }
    meta = {
        "format": FORMAT, "version": VERSION, "method": method.NAME, "method_config": config_dict(config),
        "backbone": strategy.backbone(), "num_labels": len(task.label_names),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": {"name": task.name, "kind": task.kind, "label_names": task.label_names,
                 "description": task.description, "text_pair": pair},
        "train_config": train_config.to_dict(), "metrics": metrics, "history": [], "head_names": [],
    }
    with atomic_directory(out, "delta") as tmp:
        meta["strategy"] = strategy.save(tmp)
        write_json_atomic(tmp / META, meta)
    metrics["delta_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return metrics


def restore_strategy(delta: str | Path, meta: dict, method: Any, config: Any, model: str | None = None,
                     device: torch.device | str = "cpu", precision: str | None = None, batch_size: int | None = None):
    """The saved strategy of an icl/knn delta (`method` has make_strategy), its backbone checked."""
    train = TrainConfig(**{k: v for k, v in meta.get("train_config", {}).items()
                           if k in TrainConfig.__dataclass_fields__})
    train.progress = False
    if precision:
        train.precision = precision
    if batch_size:
        train.eval_batch_size = batch_size
    task = meta["task"]
    context = StrategyContext(model or meta["backbone"]["path"], torch.device(device), train, task["name"],
                              task["label_names"], task.get("description", ""), task.get("text_pair", False),
                              saved=meta.get("strategy", {}))
    strategy = method.make_strategy(config, context)
    if strategy.backbone()["fingerprint"] != meta["backbone"]["fingerprint"]:
        raise UserError(f"delta was built on a different model ({meta['backbone']['path']}, fingerprint "
                        f"{meta['backbone']['fingerprint']}) than {strategy.backbone()['path']} "
                        f"(fingerprint {strategy.backbone()['fingerprint']})")
    strategy.restore(Path(delta), meta.get("strategy", {}))
    return strategy


def predict_with_strategy(strategy, texts: list[str], label_names: list[str]) -> list[dict]:
    """One {text, label, probabilities} dict per text, like predict.predict_texts."""
    probs = strategy.scores([Example(text=t) for t in texts]).exp()
    return [{"text": text, "label": label_names[int(p.argmax())],
             "probabilities": {name: float(p[i]) for i, name in enumerate(label_names)}}
            for text, p in zip(texts, probs)]
