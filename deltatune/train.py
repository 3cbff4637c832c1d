"""One training loop for every method.

AdamW (decoupled weight decay, none on biases and norms) -> linear warm-up then linear decay ->
gradient accumulation -> clipping -> evaluation on validation after each epoch -> the best epoch's
trainable tensors are restored at the end (unless the method sets RESTORE_BEST_EPOCH = False). Seeded, bf16 autocast optional, device chosen at run
time. Frozen bottoms run in eval mode and, when nothing trainable sits below them, are cached.
--gradient-checkpointing: transformers' non-reentrant per-layer checkpointing, on for the loop only.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deltatune.backbone import TaskModel
from deltatune.batching import Encoded, collate, eval_batches, train_batches
from deltatune.caching import FrozenPrefixCache, frozen_prefix_depth
from deltatune.config import TrainConfig
from deltatune.errors import UserError
from deltatune.evaluate import autocast_for, evaluate, pooled_features
from deltatune.fast import autocast_precision, training_forward
from deltatune.fast.attention import pretrained
from deltatune.methods.base import Method, decay_groups, trainable_state


@dataclass
class TrainResult:
    best_epoch: int
    validation: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_examples_per_second: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(module: torch.nn.Module, lr: float, weight_decay: float,
                    groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over `groups` (a method's `param_groups`), by default decay on matrices only."""
    return torch.optim.AdamW(groups if groups is not None else decay_groups(module, lr, weight_decay), lr=lr)


def warmup_linear(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def set_train_mode(task_model: TaskModel, frozen_depth: int) -> None:
    """Train mode for the trainable part; the frozen bottom stays in eval mode (no dropout)."""
    task_model.module.train()
    if frozen_depth > 0:
        task_model.backbone.get_submodule(task_model.arch.embeddings).eval()
        for layer in list(task_model.layers())[:frozen_depth]:
            layer.eval()


NON_REENTRANT = {"use_reentrant": False}
"""Checkpointing kwargs: prefix tuning needs non-reentrant checkpointing (it refuses the other), and with it
the layers' inputs need not require grad (a frozen embedding layer, a head-only method)."""


def checkpointing_model(task_model: TaskModel):
    """The transformers model that checkpoints the task model's layers, or a one-line UserError."""
    model = pretrained(task_model.module)  # the task model itself, or PooledClassifier's backbone
    if model is None or not getattr(model, "supports_gradient_checkpointing", False):
        name = type(model if model is not None else task_model.module).__name__
        raise UserError(f"--gradient-checkpointing: {name} does not support gradient checkpointing")
    return model


@contextlib.contextmanager
def gradient_checkpointing(task_model: TaskModel, enabled: bool = True) -> Iterator[None]:
    """Within this block the layers run checkpointed (in train mode: transformers checks `training`)."""
    if not enabled:
        yield
        return
    model = checkpointing_model(task_model)
    had_hooks = bool(getattr(model, "_require_grads_hooks", None))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    if not had_hooks:  # transformers made the embeddings' output require grad: reentrant checkpointing's
        model.disable_input_require_grads()  # need; it would backpropagate through frozen bottom layers
    try:
        yield
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def make_cache(task_model: TaskModel, config: TrainConfig, splits: list[list[Encoded]]):
    """Fill a frozen-prefix cache for the given splits, or None when it does not apply."""
    depth = frozen_prefix_depth(task_model)
    if depth == 0 or config.cache == "off":
        return None
    max_mb = 0 if config.cache == "disk" else (float("inf") if config.cache == "memory" else config.cache_max_mb)
    cache = FrozenPrefixCache(task_model, depth, max_memory_mb=max_mb)
    device = task_model.device()
    task_model.module.eval()
    rows = [r for split in splits for r in split]
    # rows of similar length together: each batch pads to its longest row (random order pads to ~the max)
    for idx in tqdm(eval_batches([len(r.input_ids) for r in rows], config.eval_batch_size),
                    desc="caching frozen layers", disable=not config.progress, leave=False):
        batch = collate([rows[i] for i in idx], task_model.tokenizer.pad_token_id, device)
        with autocast_for(device, autocast_precision(task_model, config.precision)):
            cache.add(batch)
    cache.flush()
    return cache


def train_model(task_model: TaskModel, method: Method, method_config: Any, train: list[Encoded],
                validation: list[Encoded], config: TrainConfig) -> TrainResult:
    """Train the trainable parameters of task_model (already prepared by method.apply)."""
    seed_everything(config.seed)
    start = time.perf_counter()
    checkpointing = config.gradient_checkpointing and method.fit is None
    if checkpointing:
        checkpointing_model(task_model)  # unsupported: fail before filling the cache
    cache = make_cache(task_model, config, [train, validation])
    cache_info = {"depth": cache.depth, "spilled_mb": cache.spilled_bytes / 2**20} if cache else {}
    if method.fit is not None:  # non-gradient methods (features): fit on pooled representations
        amp = autocast_precision(task_model, config.precision)
        train_x = pooled_features(task_model, train, config.eval_batch_size, amp, cache)
        val_x = pooled_features(task_model, validation, config.eval_batch_size, amp, cache)
        fitted = method.fit(task_model, method_config, (train_x, np.array([r.label for r in train])),
                            (val_x, np.array([r.label for r in validation])))
        val = evaluate(task_model, validation, config.eval_batch_size, amp, cache)
        seconds = time.perf_counter() - start
        return TrainResult(best_epoch=1, validation=val, history=[{"epoch": 1, **val, **fitted}],
                           train_seconds=seconds, train_examples_per_second=len(train) / seconds,
                           cache=cache_info)
    with gradient_checkpointing(task_model, checkpointing):
        return _gradient_loop(task_model, method, method_config, train, validation, config, cache, start,
                              cache_info)


def validate(task_model: TaskModel, rows: list[Encoded], config: TrainConfig,
             cache: FrozenPrefixCache | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 for a classifier; loss and perplexity on the answer tokens for an LM."""
    amp = autocast_precision(task_model, config.precision)  # none once the fast path set the dtypes
    if task_model.pooling == "lm":
        from deltatune.generation import evaluate_lm

        return evaluate_lm(task_model, rows, config.eval_batch_size, amp, cache)
    return evaluate(task_model, rows, config.eval_batch_size, amp, cache)


def describe(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"


def check_finite(loss: torch.Tensor, method: str, step: int, epoch: int, lr: float) -> None:
    """Stop training at a nan/inf loss (before its backward): a delta trained on it would be garbage."""
    value = loss.item()
    if not math.isfinite(value):
        raise UserError(f"training {method} stopped: the loss is {value} at optimizer step {step} (epoch {epoch}, "
                        f"learning rate {lr:.3g}); no delta was written. Lower the learning rate (--lr)")


def _gradient_loop(task_model, method, method_config, train, validation, config, cache, start, cache_info):
    module, device = task_model.module, task_model.device()
    lr = config.lr if config.lr is not None else method.default_lr(method_config)
    optimizer = build_optimizer(module, lr, config.weight_decay,
                                method.param_groups(task_model, method_config, lr, config.weight_decay))
    lengths = [len(r.input_ids) for r in train]
    steps_per_epoch = math.ceil(math.ceil(len(train) / config.batch_size) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, config.warmup_ratio))
    params = [p for p in module.parameters() if p.requires_grad]
    frozen_depth = frozen_prefix_depth(task_model)
    # False: the delta is the state at the end of training (AdaLoRA: earlier epochs predate its final budget)
    keep_best = method.RESTORE_BEST_EPOCH
    history: list[dict[str, float]] = []
    best_state, best_score, best_epoch, best_val = None, float("-inf"), 0, {}
    step, train_clock = 0, 0.0
    forward = training_forward(task_model, cache)  # forward_batch, or the compiled model (--compile)
    amp = autocast_precision(task_model, config.precision)
    for epoch in range(1, config.epochs + 1):
        set_train_mode(task_model, frozen_depth)
        batches = train_batches(lengths, config.batch_size, seed=config.seed * 1000 + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress,
                   leave=False, unit="batch")
        epoch_loss, seen, epoch_start = 0.0, 0, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i, idx in enumerate(bar):
            batch = collate([train[j] for j in idx], task_model.tokenizer.pad_token_id, device)
            with autocast_for(device, amp):
                loss = forward(batch).loss
                extra = method.extra_loss(task_model, method_config)  # a regulariser (AdaLoRA: orthogonality)
                total = loss if extra is None else loss + extra
            check_finite(total, method.NAME, step + 1, epoch, optimizer.param_groups[0]["lr"])
            (total.float() / config.grad_accum).backward()
            epoch_loss += loss.item() * len(idx)
            seen += len(idx)
            if (i + 1) % config.grad_accum == 0 or i + 1 == len(batches):
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                # before zero_grad: the gradients are still there (AdaLoRA uses them)
                method.on_train_step(task_model, method_config, step, total_steps)
                optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(refresh=False, loss=f"{epoch_loss / seen:.4f}",
                            ex_s=f"{seen / (time.perf_counter() - epoch_start):.1f}")
        train_clock += time.perf_counter() - epoch_start
        val = validate(task_model, validation, config, cache)
        history.append({"epoch": epoch, "train_loss": epoch_loss / max(1, seen), **val,
                        "train_seconds": train_clock})  # time in training steps so far, evaluation excluded
        if config.progress:
            tqdm.write(f"epoch {epoch}: train loss {epoch_loss / max(1, seen):.4f}, validation {describe(val)}",
                       file=sys.stderr)  # stdout carries --json output only
        score = val["accuracy"] if "accuracy" in val else -val["loss"]  # LM tasks: the lowest loss wins
        if score > best_score or not keep_best:
            best_score, best_epoch, best_val = score, epoch, val
            if keep_best:
                best_state = {k: v.clone() for k, v in trainable_state(module).items()}
    if best_state is not None:
        module.load_state_dict(best_state, strict=False)
    seconds = time.perf_counter() - start
    return TrainResult(best_epoch=best_epoch, validation=best_val, history=history, train_seconds=seconds,
                       train_examples_per_second=len(train) * config.epochs / seconds, cache=cache_info)
