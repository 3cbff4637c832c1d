"""`deltatune estimate --measure`: a few real training steps per method on this machine, the measured peak
set beside the `detailed` estimate.

    child process per method:  import torch/transformers, warm up, load the tokenizer ──> RSS0 (the runtime)
                               reset the peak ──> load model, apply method, AdamW, `steps` steps
                               measured = peak RSS (VmHWM) − RSS0            estimate(device="cpu")

The task is the estimate's: generation trains a decoder's LM loss (AutoModelForCausalLM), classification
a classifier with `num_labels` outputs (transformers' sequence-classification head: BERT's pooled [CLS],
a decoder's last token, as `deltatune compare` trains it; `features` pools into deltatune's own linear
head, as `features.pooling_for` picks it).

Two training paths: `sdpa` (the default) trains the plain transformers model in fp32 with its SDPA
attention and loss over the full logits; `deltatune` (`estimate --measure --attention deltatune`) trains
through deltatune's fast path as `train` does (bf16 frozen weights where the CPU runs bf16, its explicit
attention, blockwise past BLOCKWISE_MIN, the chunked LM loss, dropout 0), estimated with
attention="deltatune" and lm_loss="chunked"; its peak is reset once the fast path has converted the
weights (the fp32 load before the conversion is not a training step's memory).

Each method runs in a fresh process, so what one leaves behind is not charged to the next. The
estimate is asked for exactly what runs: the same batch, sequence, attention kernel, labels and the
method's own Config (adapter bottleneck, soft tokens, prefix MLP, ...), which both sides read. The peak is
the kernel's high-water mark of resident memory (reset through /proc/self/clear_refs), not a sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deltatune import backbone
from deltatune.backbone import load_task_model, load_tokenizer, resolve_model_path
from deltatune.batching import encode
from deltatune.data import GENERATION
from deltatune.errors import UserError
from deltatune.estimate import METHODS, PROJECTED, plan_for_method
from deltatune.estimate.shapes import load_shapes
from deltatune.estimate.total import estimate_for_model
from deltatune.memory import PeakMemory
from deltatune.methods import resolve_method
from deltatune.methods.base import count_parameters
from deltatune.train import build_optimizer

TOLERANCE = 0.15
"""The issue's bar: the detailed estimate within 15% of the measured peak."""
MODEL_FOR_SHAPES = {"all-minilm-l6-v2": "minilm", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}
PATHS = ("sdpa", "deltatune")
"""What `--measure` trains: transformers' model with SDPA in fp32, or deltatune's own training path."""
MEASURABLE = ("full", "head", "last2", "features", "lora", "adalora", "bitfit", "adapter", "prompt", "prefix",
              "ptuning", "ia3", "mam", "galore", "badam", "rrlora", "dora", "vera", "loha", "lokr")
"""The estimator's methods that run here (qlora needs bitsandbytes on CUDA)."""
CHILD_ENV = {"TRANSFORMERS_VERBOSITY": "error", "MALLOC_MMAP_THRESHOLD_": "131072"}
"""A fixed mmap threshold: every buffer over 128 KiB goes back to the system when freed, so RSS follows
the live tensors instead of what glibc keeps in its heap."""


@dataclass
class Measurement:
    method: str
    batch_size: int
    seq_len: int
    runtime_mb: float
    """RSS of the process before the model is loaded (python, torch, transformers)."""
    peak_mb: float
    """High-water mark of RSS from the model load to the last step."""
    seconds_per_step: float
    trainable_params: int
    precision: str = "fp32"
    """The compute precision the child trained in (the fast path's bf16 where the CPU runs it)."""
    estimated_mb: float = 0.0
    error: str | None = None

    @property
    def measured_mb(self) -> float:
        return self.peak_mb - self.runtime_mb

    @property
    def relative_error(self) -> float:
        return self.estimated_mb / self.measured_mb - 1.0 if self.measured_mb > 0 else float("nan")


# ---- the child: one method, a few steps ---------------------------------------------------------------

def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _train(spec: dict, batch_size: int, seq_len: int, steps: int, prepared=None) -> tuple[int, float, str]:
    """Load, apply (deltatune path: the fast path, then `prepared()`), train `steps` steps on random tokens:
    (trainable parameters, seconds per step, precision)."""
    import torch

    from deltatune import fast
    from deltatune.config import TrainConfig

    method, config = resolve_method(spec["method"], spec["options"])
    pooling = "lm" if spec["generation"] else "hf"
    if method.fit is not None:  # features: an explicit pooling, as `features.pooling_for` picks it
        pooling = "last" if spec["decoder"] else "cls"
    task_model = load_task_model(spec["model"], num_labels=spec["num_labels"], pooling=pooling,
                                 quantize=spec.get("quantize"))
    task_model.label_names = [f"label {i}" for i in range(spec["num_labels"])]
    if task_model.quantization:  # --quantize: refused like train refuses it (full, bitfit)
        from deltatune.quantize import apply_method

        apply_method(task_model, method, config)
    else:
        method.apply(task_model, config)
    precision, forward = "fp32", lambda batch: task_model.module(**batch)
    if spec.get("path") == "deltatune" and method.fit is None:
        precision = fast.prepare_for_training(task_model, TrainConfig()).precision
        step_forward = fast.training_forward(task_model)
        forward = lambda batch: step_forward({**batch, "keys": None})  # noqa: E731
        if prepared is not None:
            prepared()
    ids = torch.randint(10, task_model.module.config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": ids.clone() if spec["generation"] else torch.randint(0, spec["num_labels"], (batch_size,))}
    module = task_model.module
    module.train()
    start = time.perf_counter()
    if method.fit is not None:  # features: pooled states under no_grad, then a classifier
        with torch.no_grad():
            for _ in range(steps):
                module(**batch)
    else:
        groups = method.param_groups(task_model, config, 1e-4, 0.01)  # GaLore / BAdam: their own optimizer
        optimizer = (method.make_optimizer(task_model, config, groups, 1e-4, "adamw")
                     if method.make_optimizer is not None else build_optimizer(module, 1e-4, 0.01, groups))
        for _ in range(steps):
            forward(batch).loss.float().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return count_parameters(module)[0], (time.perf_counter() - start) / steps, precision


def run_child(spec: dict) -> dict:
    """A warm-up run (1 x 8 tokens) brings in everything loading and training import (and the tokenizer),
    then the measured run from a clean baseline; returns the Measurement fields (runs in a fresh process)."""
    import functools
    import gc

    import torch

    # The tokenizer is host memory no estimate covers (a GPU never holds it; 9 MB for MiniLM, 22 MB for
    # SmolLM2): the warm-up loads it before the baseline and the measured load reuses it.
    backbone.load_tokenizer = functools.cache(backbone.load_tokenizer)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    _train(spec, 1, 8, 1)
    gc.collect()
    runtime = _rss_mb()
    exact = _reset_peak()
    with PeakMemory() as sampled:
        trainable, seconds, precision = _train(spec, spec["batch_size"], spec["seq_len"], spec["steps"],
                                               prepared=_reset_peak)
    peak = _rss_mb("VmHWM") if exact else sampled.peak_mb
    return {"method": spec["label"], "batch_size": spec["batch_size"], "seq_len": spec["seq_len"],
            "runtime_mb": runtime, "peak_mb": peak, "seconds_per_step": seconds, "trainable_params": trainable,
            "precision": spec.get("quantize") or precision}


def measure_in_child(model: str, method: str, *, batch_size: int, seq_len: int, steps: int = 3,
                     generation: bool = False, decoder: bool = False, num_labels: int = 2, threads: int = 1,
                     options: dict | None = None, label: str | None = None, path: str = "sdpa",
                     quantize: str | None = None) -> Measurement:
    """Run `run_child` in a fresh Python process and read its Measurement."""
    spec = {"model": model, "method": method, "options": dict(options or {}), "label": label or method,
            "path": path, "quantize": quantize,
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "generation": generation,
            "decoder": decoder, "num_labels": num_labels, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "deltatune.estimate.measure", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return Measurement(label or method, batch_size, seq_len, 0.0, 0.0, 0.0, 0,
                           error=lines[-1] if lines else f"exit {proc.returncode}")
    return Measurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


# ---- estimate vs measured -----------------------------------------------------------------------------

def measure_methods(model: str, methods: list[str], *, batch_size: int, seq_len: int, steps: int = 3,
                    num_labels: int = 2, threads: int = 1, generation: bool | None = None,
                    training: str = "sdpa", quantize: Sequence[str | None] = (None,)) -> list[Measurement]:
    """Measure each method and attach its detailed CPU estimate (MiB) for the same run; `training`: PATHS.
    `quantize`: backbones to measure each method on (None: as loaded; nf4, int8, ...: `train --quantize`'s,
    always on deltatune's own path, as `train` runs them, estimated with that k-bit dtype)."""
    path = resolve_model_path(MODEL_FOR_SHAPES.get(model.lower(), model))
    shapes = load_shapes(path)
    generation = shapes.is_decoder if generation is None else generation
    if generation and not shapes.is_decoder:
        raise UserError(f"{shapes.name} is an encoder: it trains a classifier, not generation")
    if training not in PATHS:
        raise UserError(f"--measure trains the {' or the '.join(PATHS)} path, not '{training}'")
    if training == "deltatune":  # the fast path trains with dropout 0 (--dropout auto)
        shapes = dataclasses.replace(shapes, hidden_dropout=0.0, attention_dropout=0.0)
    unknown = [m for m in methods if m not in MEASURABLE]
    if unknown:
        raise UserError(f"--measure cannot run {unknown[0]!r} here (measurable: {', '.join(MEASURABLE)})")
    for method in methods:  # refuse what cannot train (head, features on a generation task) before any run
        plan_for_method(method, shapes, generation)
    rows = []
    for method in methods:
        for kind in quantize:
            label = f"{method} {kind}" if kind else method
            print(f"measuring {label} ({steps} steps, batch {batch_size}, seq {seq_len})...", file=sys.stderr)
            run_path = "deltatune" if kind else training
            row = measure_in_child(path, method, batch_size=batch_size, seq_len=seq_len, steps=steps,
                                   generation=generation, decoder=shapes.is_decoder, num_labels=num_labels,
                                   threads=threads, path=run_path, quantize=kind, label=label)
            fast_path = run_path == "deltatune" and method != "features"
            run_shapes = dataclasses.replace(shapes, hidden_dropout=0.0, attention_dropout=0.0) \
                if run_path == "deltatune" else shapes
            [estimate] = estimate_for_model(run_shapes, [method], batch_size=batch_size, seq_len=seq_len,
                                            attention="deltatune" if fast_path else "sdpa", device="cpu",  # sdpa:
                                            # what transformers picks for BERT and Llama
                                            generation=generation, num_labels=num_labels, dtype=row.precision,
                                            lm_loss="chunked" if fast_path and generation else "model")
            row.estimated_mb = estimate.total_gb * 1024
            rows.append(row)
    return rows


def add_memory_estimates(rows: list[dict], model: str | None, task, training, options: dict[str, dict]) -> None:
    """`estimated_memory_mb` of each `compare` row: the detailed estimate of its run (its device, precision,
    attention, dropout and delta sizes) at the longest training batch; methods the estimator does not model
    (icl, knn, intrinsic, s4) get none."""
    path = resolve_model_path(model)
    try:
        shapes = load_shapes(path)
    except UserError:  # an architecture the estimator does not read (T5)
        return
    generation = task.kind == GENERATION
    seq_len = training.length_for(task.kind)
    if not generation:
        lengths = [len(r.input_ids) for r in encode(load_tokenizer(path), task.train, seq_len)]
        seq_len = max(lengths, default=seq_len)
    dropout = {"auto": 0.0, "model": None}.get(str(training.dropout), None)
    if dropout is None and str(training.dropout) != "model":
        dropout = float(training.dropout)
    if dropout is not None:
        shapes = dataclasses.replace(shapes, hidden_dropout=dropout, attention_dropout=dropout)
    for row in rows:
        method = row.get("method")
        if method not in METHODS or method in PROJECTED:
            continue
        device = "cuda" if str(row.get("device", "cpu")).startswith("cuda") else "cpu"
        attention = "sdpa" if training.attention == "sdpa" or (device == "cuda" and training.attention == "auto") \
            else "eager"
        try:
            [estimate] = estimate_for_model(
                shapes, [method], batch_size=training.batch_size, seq_len=seq_len, attention=attention,
                device=device, dtype="bf16" if row.get("precision") == "bf16" else "fp32", generation=generation,
                num_labels=len(task.label_names) if not generation else 2,
                options={method: options.get(method) or {}})
        except UserError:  # a method the estimator refuses for this task (head, features on generation)
            continue
        row["estimated_memory_mb"] = estimate.total_gb * 1024


def format_measurements(rows: list[Measurement], header: str) -> str:
    lines = [header, f"{'method':<10}{'trainable':>13}{'estimated MB':>14}{'measured MB':>13}{'error':>9}"
                     f"{'within 15%':>12}{'s/step':>9}"]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<10}  failed: {r.error}")
            continue
        ok = "yes" if abs(r.relative_error) <= TOLERANCE else "NO"
        lines.append(f"{r.method:<10}{r.trainable_params:>13,}{r.estimated_mb:>14.0f}{r.measured_mb:>13.0f}"
                     f"{100 * r.relative_error:>+8.1f}%{ok:>12}{r.seconds_per_step:>9.2f}")
    done = [r for r in rows if not r.error]
    within = sum(abs(r.relative_error) <= TOLERANCE for r in done)
    lines.append(f"{within}/{len(done)} methods within 15%. measured = peak RSS (VmHWM) from the model load to the "
                 "last step, minus the process's RSS before loading (runtime and tokenizer); MB = MiB.")
    return "\n".join(lines)


def measurements_json(rows: list[Measurement]) -> list[dict]:
    return [{**asdict(r), "measured_mb": r.measured_mb, "relative_error": r.relative_error} for r in rows]


if __name__ == "__main__":
    print(json.dumps(run_child(json.loads(sys.argv[1]))))
