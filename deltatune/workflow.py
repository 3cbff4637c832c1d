"""data -> tokens -> backbone + delta -> train -> evaluate -> save: the path `train` and `compare` share."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from deltatune import checkpoint, distributed, fsdp
from deltatune.backbone import load_task_model, pick_device
from deltatune.batching import encode
from deltatune.config import TrainConfig
from deltatune.data import GENERATION, TaskData
from deltatune.data.templates import PromptArgs
from deltatune.delta import delta_size_bytes, save_delta
from deltatune.errors import UserError
from deltatune.evaluate import inference_overhead
from deltatune.fast import prepare_for_training
from deltatune.fast import restore as restore_fast_path
from deltatune.generation import encode_lm, is_seq2seq
from deltatune.generation_metrics import GENERATION_SCORES, generation_metrics
from deltatune.io import run_folder
from deltatune.label_head import attach_label_head, objective_pooling, verbalizer_spec
from deltatune.memory import PeakMemory, rss_mb
from deltatune.methods import resolve_method
from deltatune.methods.base import config_dict, count_parameters
from deltatune.packing import ROW_TOKENS as PACK_ROW_TOKENS
from deltatune.packing import pack_rows, packed_batch_size, refuse_packing
from deltatune.quantize import apply_method
from deltatune.train import seed_everything, train_model, validate


@dataclass
class TrainJob:
    """What to train: a method with options on a backbone, for a task."""

    method: str
    task: TaskData
    model: str | None = None
    pooling: str = "hf"
    options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    """Prompt flags: --objective verbalizer for tuned methods (icl/knn get theirs as options)."""
    resume: str | None = None
    """--resume: OUT (its newest complete checkpoint) or OUT/checkpoints/step-N."""


def run_train_job(job: TrainJob, out: str | Path) -> dict[str, Any]:
    """Train, test and save one delta; returns the metrics row written into delta.json ({} on the ranks
    other than 0 of a distributed run: rank 0 alone tests, writes and reports)."""
    config = job.train.validate()
    method, method_config = resolve_method(job.method, job.options)
    if job.task.kind == GENERATION and (method.runs_own_job or method.fit is not None):
        raise UserError(f"{job.task.name} is a generation task: method '{job.method}' only classifies "
                        "(train lora, full, prompt, ... on it)")
    if job.train.max_length is None:  # 128 for classification, longer for generation (printed)
        config = replace(config, max_length=config.length_for(job.task.kind))
        if job.task.kind == GENERATION:
            print(f"generation task: --max-length {config.max_length} (the default)", file=sys.stderr)
    if method.runs_own_job:  # no-tuning strategies (icl, knn): a prompt or an index, no gradient
        return method.run_job(job, method_config, out)
    world, rank_device = distributed.setup(config.device)  # outside torchrun: one process, as before
    try:
        return _run(job, out, config, method, method_config, world, rank_device or pick_device(config.device))
    finally:
        distributed.teardown()


def _run(job: TrainJob, out, config: TrainConfig, method, method_config, world, device) -> dict[str, Any]:
    if not world.main:
        config = replace(config, progress=False)  # one progress bar: rank 0's
    plan = checkpoint.Plan(run=run_identity(job, method_config, config, world.size))
    if job.resume:
        plan.resume = checkpoint.resolve(job.resume)
        checkpoint.check_run(plan.resume, checkpoint.load_meta(plan.resume).get("run", {}), plan.run)
    if config.save_steps:
        plan.out = Path(out)
        if world.main:
            run_folder(out, "delta")  # OUT/.deltatune.json now: a rerun may replace the folder
    seed_everything(config.seed)
    task = job.task
    lm = task.kind == GENERATION  # generation: the model's own LM head, loss on the answer tokens
    if lm and method.fit is not None:
        raise UserError(f"method '{job.method}' fits a classifier on features; it cannot learn a generation task")
    if lm:
        pooling = "lm"
    else:
        pooling = method.pooling_for(job.pooling, _arch_of(job))
    prompted = job.prompt.objective == "verbalizer"  # PET / LM-BFF: the LM head scores label words
    if prompted:
        pooling = objective_pooling(pooling, method)
    runtime_mb = rss_mb()  # python, torch, transformers: before the model
    spec = verbalizer_spec(task, job.prompt.template, job.prompt.verbalizer) if prompted else None

    def build():
        built = load_task_model(job.model, num_labels=len(task.label_names), pooling=pooling, device=device,
                                seed=config.seed, quantize=config.quantize, precision=config.precision)
        built.label_names = list(task.label_names)
        return built, attach_label_head(built, spec) if prompted else None

    task_model, prompt_meta = build()
    apply_method(task_model, method, method_config)  # --quantize: full / BitFit (packed weights) refused
    fast = prepare_for_training(task_model, config)  # bf16 frozen weights, attention, dropout, compile
    trainable, total = count_parameters(task_model.module)
    if config.fsdp:
        fsdp.shard(task_model, world)
    tok = task_model.tokenizer
    rows_of = partial(encode_lm, seq2seq=is_seq2seq(task_model)) if lm else encode
    train_rows = (partial(rows_of, train_on_prompt=True) if config.train_on_prompt and lm else rows_of)(
        tok, task.train, config.max_length, "train")
    val_rows = rows_of(tok, task.validation, config.max_length, "validation")
    test_rows = rows_of(tok, task.test, config.max_length, "test")
    loop_config = config
    if config.packing:  # several examples per row; the loop's batches hold about as many examples
        refuse_packing(method, is_seq2seq(task_model), lm)
        packed = pack_rows(train_rows, config.max_length)
        loop_config = replace(config, batch_size=packed_batch_size(train_rows, packed, config.batch_size),
                              cache="off")  # the frozen-prefix cache runs unpacked rows
        if world.main:
            print(f"packing: {len(train_rows)} examples in {len(packed)} rows of <= {PACK_ROW_TOKENS} tokens, "
                  f"{loop_config.batch_size} rows per batch", file=sys.stderr)
        train_rows = packed
    if world.main:
        about = f"about {config.batch_size} examples in {loop_config.batch_size} packed rows" if config.packing \
            else f"{config.batch_size} rows"
        print(f"global batch {config.batch_size * world.size * config.grad_accum} = {about} per rank "
              f"x {world.size} rank(s) x {config.grad_accum} accumulation step(s)", file=sys.stderr)
    with PeakMemory() as memory:
        result = train_model(task_model, method, method_config, train_rows, val_rows, loop_config, plan)
    if config.fsdp:  # rank 0 tests and saves a plain model with the gathered tensors
        task_model = fsdp.unsharded(task_model, lambda: _applied(build()[0], method, method_config), world)
    distributed.teardown()  # the collectives are over: rank 0 tests and saves alone
    if not world.main:
        return {}
    restore_fast_path(task_model)  # test and save the plain fp32 model, as load_delta rebuilds it
    test = validate(task_model, test_rows, config)
    if not lm:
        test.update(_inference_overhead(job, task_model, test_rows, pooling, device, config, spec))
    else:  # replies decoded and scored: exact match, ROUGE-L, chrF, accuracy on label words
        test.update(generation_metrics(task_model, task.test))
    quality = ("loss", "perplexity", *GENERATION_SCORES) if lm else ("accuracy", "macro_f1")
    metrics = {
        "method": job.method,
        **{k: test[k] for k in quality if k in test},
        f"validation_{quality[0]}": result.validation.get(quality[0]),
        "best_epoch": result.best_epoch,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "peak_memory_mb": memory.peak_mb,
        "training_memory_increase_mb": memory.increase_mb,
        "measured_memory_mb": memory.peak_mb - runtime_mb,
        "cuda_peak_memory_mb": memory.cuda_peak_mb,
        "train_seconds": result.train_seconds,
        "train_examples_per_second": result.train_examples_per_second,
        "inference_ms_per_example": test["inference_ms_per_example"],
        **{k: test[k] for k in ("backbone_ms_per_example", "inference_overhead_pct") if k in test},
        "precision": fast.precision,
        "fast_path": fast.to_dict(),
        "device": str(device),
        "frozen_prefix_cache": result.cache,
        "train_examples": len(train_rows),
        "global_batch": result.global_batch,
        "world_size": world.size,
        "allreduce_bytes_per_step": result.allreduce_bytes_per_step,
        "test_examples": len(test_rows),
    }
    meta = {
        "task": {"name": task.name, "kind": task.kind, "label_names": task.label_names,
                 "description": task.description,
                 "text_pair": any(e.text_pair is not None for e in task.train)},
        "train_config": config.to_dict(),
        "metrics": metrics,
        "history": result.history,
        "head_names": task_model.head_names,
        **({"prompt": prompt_meta} if prompt_meta else {}),
    }
    ours = config.save_steps or job.resume  # this run's checkpoints stay with its delta; an earlier run's go
    save_delta(out, task_model, method, method_config, meta, carry=(checkpoint.FOLDER,) if ours else ())
    metrics["delta_bytes"] = delta_size_bytes(out)
    return metrics


RUN_SETTINGS = ("epochs", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "max_length",
                "seed", "precision", "attention", "dropout", "gradient_checkpointing", "compile", "fsdp",
                "quantize", "optimizer", "train_on_prompt", "packing")
"""Training settings a resumed run must share with its checkpoint (the rest: speed, output, devices)."""


def run_identity(job: TrainJob, method_config, config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint was trained on and how: a resume with anything else here is refused."""
    task = job.task
    examples = [[e.text, e.text_pair, e.label, e.target, *([e.messages] if e.messages else [])]
                for e in (*task.train, *task.validation)]
    data = hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()[:16]
    settings = {k: getattr(config, k) for k in RUN_SETTINGS}
    return {"method": job.method, "method options": config_dict(method_config), "backbone": job.model,
            "task": task.name, "data (sha256 of the train and validation examples)": data,
            "pooling": job.pooling, "settings": settings,
            "global micro-batch (batch size x ranks)": config.batch_size * world_size}


def _applied(task_model, method, method_config):
    method.apply(task_model, method_config)
    return task_model


OVERHEAD_ROWS = 256
"""Test rows timed for the inference overhead against the bare backbone."""


def _inference_overhead(job: TrainJob, task_model, test_rows, pooling: str, device, config: TrainConfig,
                        spec) -> dict[str, float]:
    """The trained model's forward time against a freshly loaded bare backbone with the same kind of head."""
    plain = load_task_model(job.model, num_labels=len(job.task.label_names), pooling=pooling, device=device,
                            seed=config.seed, quantize=config.quantize, precision=config.precision)
    if spec is not None:
        attach_label_head(plain, spec)
    rows = test_rows[:OVERHEAD_ROWS]
    return inference_overhead(task_model, plain, rows, config.eval_batch_size)


def _arch_of(job: TrainJob):
    from transformers import AutoConfig

    from deltatune.backbone import arch_for, resolve_model_path

    return arch_for(AutoConfig.from_pretrained(resolve_model_path(job.model), local_files_only=True))


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
