"""One training loop for every method.

AdamW (decoupled weight decay, none on biases and norms) -> linear warm-up then linear decay ->
gradient accumulation -> clipping -> evaluation on validation after each epoch -> the best epoch's
trainable tensors are restored at the end (unless the method sets RESTORE_BEST_EPOCH = False). Seeded, bf16 autocast optional, device chosen at run
time. Frozen bottoms run in eval mode and, when nothing trainable sits below them, are cached.
--gradient-checkpointing: transformers' non-reentrant per-layer checkpointing, on for the loop only;
auto checkpoints the fewest lowest layers whose estimated step fits --max-memory (estimate/budget.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from deltatune import checkpoint, distributed, fsdp, optimizers
from deltatune.backbone import TaskModel
from deltatune.batching import Encoded, collate, eval_batches, train_batches
from deltatune.caching import FrozenPrefixCache, frozen_prefix_depth
from deltatune.checkpoint import Plan, Position
from deltatune.config import TrainConfig
from deltatune.errors import UserError
from deltatune.estimate.budget import checkpointed_layers
from deltatune.evaluate import autocast_for, classification_metrics, evaluate, pooled_features, predict_logits
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
    global_batch: int = 0
    """Examples per optimizer step over every rank: batch size x ranks x accumulation."""
    allreduce_bytes_per_step: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(module: torch.nn.Module, lr: float, weight_decay: float,
                    groups: list[dict] | None = None, name: str = "adamw") -> torch.optim.Optimizer:
    """--optimizer `name` (deltatune/optimizers.py: AdamW, 8-bit AdamW) over `groups` (a method's
    `param_groups`), by default decay on matrices only."""
    groups = groups if groups is not None else decay_groups(module, lr, weight_decay)
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    return optimizers.build(name, groups, lr, device)


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
def gradient_checkpointing(task_model: TaskModel, enabled: bool = True, layers: int | None = None) -> Iterator[None]:
    """Within this block the layers run checkpointed (in train mode: transformers checks `training`);
    `layers`: only the lowest `layers` of them (transformers 5 checks each layer's `gradient_checkpointing`)."""
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
    if layers is not None:
        for layer in list(task_model.layers())[layers:]:
            layer.gradient_checkpointing = False
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
                validation: list[Encoded], config: TrainConfig, plan: Plan | None = None) -> TrainResult:
    """Train the trainable parameters of task_model (already prepared by method.apply); `plan`: where
    checkpoints go and which one to resume from (deltatune/checkpoint.py)."""
    seed_everything(config.seed)
    start = time.perf_counter()
    checkpointing = config.gradient_checkpointing != "off" and method.fit is None
    if checkpointing:
        checkpointing_model(task_model)  # unsupported: fail before filling the cache
    longest = max((len(row.input_ids) for row in train), default=1)  # --gradient-checkpointing auto sizes it
    layers = checkpointed_layers(task_model, method.NAME, method_config, config, longest) if (
        checkpointing and config.gradient_checkpointing == "auto") else None
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
    with gradient_checkpointing(task_model, checkpointing and layers != 0, layers):
        return _gradient_loop(task_model, method, method_config, train, validation, config, cache, start,
                              cache_info, plan or Plan())


def validate(task_model: TaskModel, rows: list[Encoded], config: TrainConfig,
             cache: FrozenPrefixCache | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 for a classifier; loss and perplexity on the answer tokens for an LM. In a
    distributed run each rank scores rows[rank::W] and the results are all-reduced: every rank gets the
    same metrics (and so picks the same best epoch)."""
    amp = autocast_precision(task_model, config.precision)  # none once the fast path set the dtypes
    world = distributed.current()
    mine, pads = even_share(rows, world.rank, world.size) if world.active else (rows, 0)
    start = time.perf_counter()
    if task_model.pooling == "lm":
        from deltatune.generation import evaluate_lm

        metrics = evaluate_lm(task_model, mine, config.eval_batch_size, amp, cache)
        if not world.active:
            return metrics
        nll, tokens = distributed.all_reduce_sum([metrics["loss"] * metrics["answer_tokens"],
                                                  metrics["answer_tokens"]])
        loss = nll / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "answer_tokens": int(tokens),
                "inference_ms_per_example": metrics["inference_ms_per_example"]}
    if not world.active:
        return evaluate(task_model, rows, config.eval_batch_size, amp, cache)
    logits = torch.zeros((len(rows), task_model.num_labels), dtype=torch.float32)  # (N, K), my rows filled
    scored = predict_logits(task_model, mine, config.eval_batch_size, amp, cache)  # (len(mine), K)
    logits[world.rank::world.size] = scored[:len(scored) - pads]  # the padding row's logits dropped
    distributed.all_reduce_(logits)  # every row from the one rank that scored it (+ exact zeros)
    metrics = classification_metrics(logits, [r.label for r in rows], task_model.num_labels)
    metrics["inference_ms_per_example"] = 1000 * (time.perf_counter() - start) / max(1, len(rows))
    return metrics


def even_share(rows: list[Encoded], rank: int, world: int) -> tuple[list[Encoded], int]:
    """rows[rank::world], padded to ceil(N / world) rows with a copy of the first row that scores nothing (no
    labelled token; a classifier's padding logits are dropped), and how many were padded. Every rank then
    runs the same number of evaluation batches: FSDP2's forward all-gathers need every rank in every pass."""
    mine = rows[rank::world]
    pads = -(-len(rows) // world) - len(mine)
    if pads and rows:
        first = rows[0]
        blank = None if first.token_labels is None else [-100] * len(first.token_labels)
        mine = mine + [dataclasses.replace(first, key=f"{first.key}#pad", token_labels=blank)] * pads
    return mine, pads


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


def labelled_count(row: Encoded, causal: bool) -> int:
    """What the loss averages over in this row: 1 example, or its scored answer tokens (a causal LM predicts
    token t+1 at position t, so the first label is never scored)."""
    if row.token_labels is None:
        return 1
    labels = row.token_labels[1:] if causal and row.position_ids is None else row.token_labels
    return sum(t != -100 for t in labels)


def _gradient_loop(task_model, method, method_config, train, validation, config, cache, start, cache_info,
                   plan: Plan):
    module, device, world = task_model.module, task_model.device(), distributed.current()
    lr = config.lr if config.lr is not None else method.default_lr(method_config)
    params = [p for p in module.parameters() if p.requires_grad]  # before a block optimizer (BAdam) freezes some
    groups = method.param_groups(task_model, method_config, lr, config.weight_decay)
    optimizer = (method.make_optimizer(task_model, method_config, groups, lr, config.optimizer)
                 if method.make_optimizer is not None
                 else build_optimizer(module, lr, config.weight_decay, groups, config.optimizer))
    lengths = [len(r.input_ids) for r in train]
    causal = not getattr(task_model.module.config, "is_encoder_decoder", False)
    counts = [labelled_count(r, causal) for r in train]
    global_batch = config.batch_size * world.size  # rows per micro-batch over all ranks
    steps_per_epoch = math.ceil(math.ceil(len(train) / global_batch) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, config.warmup_ratio))
    sharded = fsdp.sharded(module)  # FSDP2 reduces (scatters) the gradients itself
    if not sharded:
        distributed.broadcast_params(params)
    frozen_depth = frozen_prefix_depth(task_model)
    # False: the delta is the state at the end of training (AdaLoRA: earlier epochs predate its final budget)
    keep_best = method.RESTORE_BEST_EPOCH
    pos, best_state = Position(), None
    if plan.resume is not None:
        pos, best_state = checkpoint.restore(plan.resume, plan, task_model, method, method_config, optimizer,
                                             scheduler, world.rank)
    elif plan.out is not None and world.main:
        checkpoint.clear(plan.out)

    def save() -> None:
        if plan.out is None:
            return
        tensors, meta = checkpoint.capture(task_model, method, method_config, optimizer, scheduler,
                                           trainable_state(module), best_state, plan.run)
        if world.main:
            checkpoint.save(plan.out, pos, tensors, meta, config.keep_checkpoints)
        distributed.barrier()

    forward = training_forward(task_model, cache)  # forward_batch, or the compiled model (--compile)
    amp = autocast_precision(task_model, config.precision)
    pad_id = task_model.tokenizer.pad_token_id
    for epoch in range(pos.epoch, config.epochs + 1):
        set_train_mode(task_model, frozen_depth)
        batches = train_batches(lengths, global_batch, seed=config.seed * 1000 + epoch)
        bar = tqdm(range(pos.batch, len(batches)), desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not (config.progress and world.main), unit="batch", initial=pos.batch,
                   total=len(batches))
        epoch_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i in bar:
            first = i - i % config.grad_accum
            window = batches[first:first + config.grad_accum]  # this optimizer step's micro-batches
            scale = 1.0 / max(1, sum(counts[j] for b in window for j in b))  # over every rank and micro-batch
            mine = batches[i][world.rank::world.size]  # this rank's rows of the global micro-batch
            weight = sum(counts[j] for j in mine) * scale
            if sharded and weight == 0:  # FSDP's forward is a collective: run one row, weighted 0
                mine, weight = batches[i][:1], 0.0
            total = None
            if mine and (weight > 0 or sharded):
                batch = collate([train[j] for j in mine], pad_id, device)
                with autocast_for(device, amp):
                    loss = forward(batch).loss  # the mean over my rows' labelled examples or tokens
                total = loss.float() * (weight * world.size if sharded else weight)  # FSDP averages over W
                if weight > 0:
                    pos.epoch_loss += loss.item() * len(mine)
                    pos.seen += len(mine)
            with autocast_for(device, amp):
                extra = method.extra_loss(task_model, method_config)  # a regulariser (AdaLoRA: orthogonality)
            if extra is not None:  # once per optimizer step over all ranks and micro-batches
                extra = extra.float() / (len(window) * world.size)
                total = extra if total is None else total + extra
            last = i % config.grad_accum == len(window) - 1  # the window's last micro-batch
            if sharded:
                fsdp.sync_gradients(module, last)
            if total is not None:
                check_finite(total, method.NAME, pos.step + 1, epoch, optimizer.param_groups[0]["lr"])
                total.backward()
            if last:
                if not sharded:
                    distributed.all_reduce_grads(params)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                pos.step += 1
                # before zero_grad: the gradients are still there (AdaLoRA uses them)
                method.on_train_step(task_model, method_config, pos.step, total_steps)
                optimizer.zero_grad(set_to_none=True)
                pos.batch = i + 1
                due = [n > 0 and pos.step % n == 0 and i + 1 < len(batches)  # inside the epoch: its end does both
                       for n in (config.eval_steps, config.save_steps)]
                if any(due):
                    pos.train_clock += time.perf_counter() - epoch_start  # the clock stops while validating / saving
                    if due[0]:
                        val = validate(task_model, validation, config, cache)
                        pos.history.append({"epoch": epoch, "step": pos.step, **val, "train_seconds": pos.train_clock,
                                            "train_loss": pos.epoch_loss / max(1, pos.seen)})
                        if config.progress and world.main:
                            tqdm.write(f"step {pos.step}: validation {describe(val)}", file=sys.stderr)
                        set_train_mode(task_model, frozen_depth)
                    if due[1]:
                        save()  # after the validation, so a resumed run keeps this point of the curve
                    epoch_start = time.perf_counter()
            bar.set_postfix(refresh=False, loss=f"{pos.epoch_loss / max(1, pos.seen):.4f}")
        pos.train_clock += time.perf_counter() - epoch_start
        loss_sum, seen = distributed.all_reduce_sum([pos.epoch_loss, pos.seen])
        val = validate(task_model, validation, config, cache)
        pos.history.append({"epoch": epoch, "step": pos.step, "train_loss": loss_sum / max(1, seen), **val,
                            "train_seconds": pos.train_clock})  # time in training steps so far, no evaluation
        if config.progress and world.main:
            tqdm.write(f"epoch {epoch}: train loss {loss_sum / max(1, seen):.4f}, validation {describe(val)}",
                       file=sys.stderr)  # stdout carries --json output only
        score = val["accuracy"] if "accuracy" in val else -val["loss"]  # LM tasks: the lowest loss wins
        if pos.best_score is None or score > pos.best_score or not keep_best:
            pos.best_score, pos.best_epoch, pos.best_val = score, epoch, val
            if keep_best:  # sharded: DTensor copies, each rank its own shards
                best_state = fsdp.sharded_copy(module) if sharded else \
                    {k: v.clone() for k, v in trainable_state(module).items()}
        pos.epoch, pos.batch, pos.epoch_loss, pos.seen = epoch + 1, 0, 0.0, 0
        if config.save_steps:
            save()  # at each epoch end
    if best_state is not None:
        if sharded:
            fsdp.sharded_copy(module)  # resharded, as best_state
        module.load_state_dict(best_state, strict=False)
    seconds = time.perf_counter() - start
    return TrainResult(best_epoch=pos.best_epoch, validation=pos.best_val, history=pos.history,
                       train_seconds=seconds, train_examples_per_second=len(train) * config.epochs / seconds,
                       cache=cache_info, global_batch=global_batch * config.grad_accum,
                       allreduce_bytes_per_step=distributed.gradient_bytes(params) if world.active else 0)
