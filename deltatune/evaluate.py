"""Evaluation: logits in input order, accuracy and macro-F1, pooled features, timing."""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from deltatune.backbone import TaskModel
from deltatune.batching import Encoded, collate, eval_batches
from deltatune.caching import FrozenPrefixCache


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA when asked for, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_batch(task_model: TaskModel, batch: dict, cache: FrozenPrefixCache | None = None):
    """Run the model on a collated batch (through the cache's top when its rows are cached)."""
    inputs = {k: v for k, v in batch.items() if k != "keys"}
    if cache is not None and all(k in cache for k in batch["keys"]):
        cache.set_batch(batch)
        with cache.top_only():
            return task_model.module(**inputs)
    return task_model.module(**inputs)


@torch.no_grad()
def predict_logits(task_model: TaskModel, rows: list[Encoded], batch_size: int = 64,
                   precision: str = "fp32", cache: FrozenPrefixCache | None = None,
                   progress: bool = False) -> torch.Tensor:
    """(N, K) float32 logits for rows, in the order of `rows` (batches are length-sorted inside);
    `progress` shows a bar on stderr, as training does."""
    module = task_model.module
    was_training = module.training
    module.eval()
    device = task_model.device()
    pad_id = task_model.tokenizer.pad_token_id
    lengths = [len(r.input_ids) for r in rows]
    out = torch.empty((len(rows), task_model.num_labels), dtype=torch.float32)
    try:
        for idx in tqdm(eval_batches(lengths, batch_size), desc="evaluating", unit="batch", leave=False,
                        disable=not progress):
            batch = collate([rows[i] for i in idx], pad_id, device)
            batch.pop("labels", None)
            with autocast_for(device, precision):
                logits = forward_batch(task_model, batch, cache).logits
            out[idx] = logits.float().cpu()
    finally:
        module.train(was_training)
    return out


def classification_metrics(logits: torch.Tensor, labels: list[int], num_labels: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = logits.argmax(-1).numpy()
    gold = np.asarray(labels)
    return {
        "accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=list(range(num_labels)),
                                   zero_division=0)) if len(gold) else 0.0,
    }


def evaluate(task_model: TaskModel, rows: list[Encoded], batch_size: int = 64, precision: str = "fp32",
             cache: FrozenPrefixCache | None = None, progress: bool = False) -> dict[str, float]:
    """Accuracy, macro-F1 and inference time per example on labelled rows."""
    start = time.perf_counter()
    logits = predict_logits(task_model, rows, batch_size, precision, cache, progress)
    seconds = time.perf_counter() - start
    metrics = classification_metrics(logits, [r.label for r in rows], task_model.num_labels)
    metrics["inference_ms_per_example"] = 1000 * seconds / max(1, len(rows))
    return metrics


@torch.no_grad()
def pooled_features(task_model: TaskModel, rows: list[Encoded], batch_size: int = 64,
                    precision: str = "fp32", cache: FrozenPrefixCache | None = None) -> np.ndarray:
    """(N, H) inputs of the classifier (the pooled representation), in the order of `rows`."""
    captured: list[torch.Tensor] = []
    hook = task_model.module.classifier.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].float().cpu()))
    try:
        module = task_model.module
        module.eval()
        device = task_model.device()
        out = None
        for idx in eval_batches([len(r.input_ids) for r in rows], batch_size):
            batch = collate([rows[i] for i in idx], task_model.tokenizer.pad_token_id, device)
            batch.pop("labels", None)
            with autocast_for(device, precision):
                forward_batch(task_model, batch, cache)
            feats = captured.pop()
            if out is None:
                out = np.zeros((len(rows), feats.shape[-1]), dtype=np.float32)
            out[idx] = feats.numpy()
    finally:
        hook.remove()
    return out


@torch.no_grad()
def inference_overhead(task_model: TaskModel, plain: TaskModel, rows: list[Encoded], batch_size: int = 64,
                       rounds: int = 3) -> dict[str, float]:
    """Forward time of the adapted model against the bare backbone (same head kind) on the same rows.

    Timed by this process's CPU time on the CPU (other processes on the machine barely move it; on CUDA
    the wall clock after a synchronize), batch by batch:
    each batch runs through both models in turn, after one warm-up pass each, for `rounds` rounds; the
    median round counts. The seed's inference-overhead column: a delta that only changes weights costs
    nothing extra once merged (deltatune keeps it beside them, so LoRA pays its small side matmuls),
    adapters add FFN work, soft prompts and prefixes add positions."""
    batches = [[rows[i] for i in idx] for idx in eval_batches([len(r.input_ids) for r in rows], batch_size)]
    models = {"delta": task_model, "plain": plain}
    device = task_model.device()

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()

    for model in models.values():  # warm-up: kernels and allocations for these shapes
        predict_logits(model, rows, batch_size)
    totals: dict[str, list[float]] = {"delta": [], "plain": []}
    for _ in range(rounds):
        spent = dict.fromkeys(models, 0.0)
        for batch in batches:
            for name, model in models.items():
                start = clock()
                predict_logits(model, batch, batch_size)
                spent[name] += clock() - start
        for name, seconds in spent.items():
            totals[name].append(seconds)
    delta, bare = (float(np.median(totals[k])) for k in ("delta", "plain"))
    return {"inference_ms_per_example": 1000 * delta / max(1, len(rows)),
            "backbone_ms_per_example": 1000 * bare / max(1, len(rows)),
            "inference_overhead_pct": 100.0 * (delta / bare - 1.0)}
