"""`deltatune estimate`: memory of one training step per method, from the model's shapes alone.

    total = weights + gradients + optimizer + activations + overhead          (GiB, printed "GB")

The numbers come from `total.estimate_for_model` (one `MemoryEstimate` per method, each method's delta sizes
from its own Config); this file parses the flags, prints the table, sets our numbers beside the seed's
LLaMA-Factory table (`hardware_table`), and hands `--measure` to `measure`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deltatune.errors import UserError
from deltatune.estimate import CLASSIFIER_ONLY, GIB, METHODS, PROJECTED, plan_for_method, precision_for
from deltatune.estimate.measure import MEASURABLE, format_measurements, measure_methods, measurements_json
from deltatune.estimate.seed import HARDWARE_MODELS, HARDWARE_ROWS, rule_of_thumb_bytes
from deltatune.estimate.shapes import ModelShapes, load_shapes
from deltatune.estimate.total import MemoryEstimate, estimate_for_model

__all__ = ["estimate", "estimate_for_model", "format_estimates", "hardware_table"]

TASKS = ("classification", "generation")


@dataclass(frozen=True)
class HardwareRow:
    """One cell of the seed's hardware table with our two estimates beside it (GiB)."""

    method: str
    bits: str
    model: str
    seed_gb: float
    rule_of_thumb_gb: float
    detailed_gb: float


def hardware_table(batch_size: int = 1, seq_len: int = 1024, attention: str = "sdpa",
                   gradient_checkpointing: bool = True) -> list[HardwareRow]:
    """LLaMA-Factory's table (seed 004) for 7B/13B/30B/70B: seed number, the per-parameter rule of thumb
    that explains it, and the detailed estimate for one step of generation training at these settings."""
    rows = []
    for label, bits, method, dtype, seed_numbers in HARDWARE_ROWS:
        for model, seed_gb in zip(HARDWARE_MODELS, seed_numbers, strict=True):
            shapes = load_shapes(model)
            [estimate] = estimate_for_model(shapes, [method], batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                            attention=attention, gradient_checkpointing=gradient_checkpointing)
            rows.append(HardwareRow(label, bits, model, float(seed_gb),
                                    rule_of_thumb_bytes(label, bits, shapes) / GIB, estimate.total_gb))
    return rows


hardware_table_rows = hardware_table


def format_hardware_table(rows: list[HardwareRow]) -> str:
    """Method × model grid of "seed / rule / detailed" in GB."""
    sizes = {"llama-2-7b": "7B", "llama-2-13b": "13B", "llama-30b": "30B", "llama-2-70b": "70B"}
    lines = [f"{'Method':<18}{'Bits':>5}  " + "".join(f"{sizes[m] + ': seed/rule/ours':>24}" for m in HARDWARE_MODELS)]
    for label, bits, *_ in HARDWARE_ROWS:
        cells = [row for row in rows if row.method == label and row.bits == bits]
        lines.append(f"{label:<18}{bits:>5}  " + "".join(
            f"{f'{c.seed_gb:.0f} / {c.rule_of_thumb_gb:.0f} / {c.detailed_gb:.0f}':>24}" for c in cells))
    lines.append("GB = GiB. seed: LLaMA-Factory via seed 004; rule: bytes/param × N (docs/memory.md); "
                 "ours: detailed model, batch 1, seq 1024, sdpa, gradient checkpointing, AdamW.")
    return "\n".join(lines)


def format_estimates(shapes: ModelShapes, estimates: list[MemoryEstimate], header: str) -> str:
    """A table per method: the parts of the total as alive at the step's peak, then both activation models'
    sizes for reference (seed formula, all that the detailed model saves) and where the peak is."""
    used = estimates[0].activations_model if estimates else "detailed"
    columns = ("method", "trainable", "weights", "gradients", "optimizer", "activations", "overhead", "total",
               "act.seed", "act.saved")
    lines = [f"{shapes.name}: {shapes.n_params:,} parameters ({shapes.family}); {header}",
             f"{columns[0]:<10}{columns[1]:>15}" + "".join(f"{c:>12}" for c in columns[2:]) + "  peak at"]
    for e in estimates:
        numbers = (e.weights_gb, e.gradients_gb, e.optimizer_gb, e.activations_gb, e.overhead_gb, e.total_gb,
                   e.seed_activations_gb, e.detailed_activations_gb)
        lines.append(f"{e.method:<10}{e.trainable_params:>15,}" + "".join(f"{n:>12.2f}" for n in numbers)
                     + f"  {e.peak_phase}")
    lines.append(f"GB = GiB (2**30 bytes). total = weights + gradients + optimizer + activations + overhead "
                 f"({used} activation model), each as alive at the step's peak; act.seed = the seed formula, "
                 "act.saved = all the detailed model saves for backward.")
    if any(e.method in PROJECTED for e in estimates):
        lines.append("qlora is a projection of the seed's table (LoRA as lora.Config sizes it, on a 4-bit backbone): "
                     "no deltatune method implements it yet.")
    return "\n".join(lines)


DEFAULT_METHODS = "full,lora"


def method_names(method: str | Sequence[str] | None) -> list[str]:
    """"full,lora", or a list of such strings (a repeated --method) → ["full", "lora"]: lower case, each once,
    in the order given; None or nothing → the default (full, lora)."""
    parts = method.split(",") if isinstance(method, str) else [part for m in method or () for part in m.split(",")]
    names = list(dict.fromkeys(name.strip().lower() for name in parts if name.strip()))
    return names or DEFAULT_METHODS.split(",")


def parse_methods(method: str | Sequence[str] | None, shapes: ModelShapes, dtype: str,
                  generation: bool = False) -> list[str]:
    """"full,lora" (or a list of them) → ["full", "lora"]; "all" → every method that applies (no bitfit without
    biases, no full fine-tuning of k-bit weights, no classifier-only method on a generation task)."""
    names = method_names(method)
    if "all" in names and len(names) > 1:
        raise UserError("--method all already names every method: give it alone")
    if names == ["all"]:
        quantized = precision_for(dtype, "full").quantized_bits is not None
        return [name for name in METHODS
                if not (name == "bitfit" and shapes.layer_bias_params() == 0) and not (name == "full" and quantized)
                and not (generation and name in CLASSIFIER_ONLY)]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)}, or all)")
    return names


def quantize_kinds(value: str | None) -> list[str | None]:
    """--quantize "nf4,int8" -> ["nf4", "int8"] (train's names; none -> None: the backbone as loaded)."""
    from deltatune.quantize import parse

    parts = [part.strip() for part in (value or "none").split(",") if part.strip()]
    return list(dict.fromkeys(parse(part) for part in parts)) or [None]


def task_is_generation(task: str | None, shapes: ModelShapes) -> bool:
    """--task: generation (LM loss; decoders only) or classification (a classifier with --num-labels outputs:
    last-token pooling for a decoder, as `deltatune compare` trains it); None: generation for decoders."""
    if task is None:
        return shapes.is_decoder
    key = task.strip().lower()
    if key not in TASKS:
        raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if key == "generation" and not shapes.is_decoder:
        raise UserError(f"{shapes.name} is an encoder: it trains a classifier, not generation")
    return key == "generation"


def estimate(*, model: str = "all-minilm-l6-v2", method: list[str] | None = None, batch_size: int = 8, seq_len: int = 128,
             dtype: str = "fp32", optimizer: str = "adamw", activations: str = "detailed",
             gradient_checkpointing: bool = False, num_virtual_tokens: int | None = None, num_labels: int = 2,
             hardware_table: bool = False, json_: bool = False, attention: str = "eager", measure: bool = False,
             measure_steps: int = 3, threads: int = 1, task: str | None = None, quantize: str | None = None) -> int:
    """Estimate the GPU memory of one training step per method, from the model's shapes alone.

    Args:
        model: a known name (llama-2-7b, mistral-7b, bert-base-uncased, ...), a folder with config.json, or a config.json path.
        method: methods, comma-separated and/or repeated (--method full --method lora,prompt): full, head, last2, features, lora, rrlora, dora, vera, loha, lokr, adalora, bitfit, adapter, prompt, prefix, ptuning, ia3, mam, galore, badam, qlora (a projection: LoRA on a 4-bit backbone, no method yet), or all (default: full,lora). Each method's sizes are its Config's defaults.
        batch_size: sequences per training step.
        seq_len: tokens per sequence (prompt methods add their soft tokens).
        dtype: training dtype: fp32, bf16, fp16, amp (mixed precision), int8, 4bit, 2bit (k-bit frozen backbone).
        optimizer: adamw (2 states), sgd (none), adamw8bit or paged_adamw8bit (2 bytes per parameter; adam8bit is an alias), as train's --optimizer.
        activations: activation model for the total: detailed (per-layer autograd accounting) or seed (the slide formula).
        gradient_checkpointing: keep only each layer's input and recompute the layer in backward.
        num_virtual_tokens: soft tokens of prompt tuning, p-tuning, prefix tuning and MAM (default: each method's own).
        num_labels: classifier outputs (classification tasks).
        hardware_table: print the seed's hardware table (7B-70B) beside our estimates instead.
        json_: print a JSON list, one object per method (or per hardware-table cell).
        attention: attention kernel of the detailed model: eager (saves seq² scores), sdpa (fused, saves no seq² tensor), or deltatune (its explicit kernel, blockwise past 512² scores, with the chunked LM loss).
        measure: run real training steps on this machine (CPU, AdamW), one process per method, and print the measured peak beside the detailed CPU estimate (model: a folder or minilm / smollm2): transformers' model in fp32 with SDPA, or with --attention deltatune deltatune's own training path (its precision, attention and chunked LM loss).
        measure_steps: training steps per method with --measure.
        threads: torch threads per measuring process.
        task: generation (LM loss over the vocabulary) or classification (a --num-labels classifier; a decoder pools its last token, as `deltatune compare` trains it); default: generation for decoders, classification for encoders.
        quantize: k-bit backbones as train's --quantize names them (nf4, fp4, int8, 3bit, 2bit, q4_1; none: as loaded), comma-separated: with --measure, each method is measured and estimated on each (on deltatune's own path, as train runs them); without, one kind is the same as --dtype KIND.
    """
    if hardware_table:
        rows = hardware_table_rows()  # the flag shadows the function's name here
        print(json.dumps([asdict(row) for row in rows], indent=2) if json_ else format_hardware_table(rows))
        return 0
    kinds = quantize_kinds(quantize)
    if not measure and kinds != [None]:
        if len(kinds) > 1 or dtype != "fp32":
            raise UserError("--quantize without --measure names one k-bit dtype (as --dtype does): give one kind")
        dtype = kinds[0]
    shapes = load_shapes(model)
    generation = task_is_generation(task, shapes)
    methods = parse_methods(method, shapes, dtype, generation)
    for name in methods:  # refuse what cannot train on this task (head, features on generation) before any run
        plan_for_method(name, shapes, generation)
    skipped = [m for m in CLASSIFIER_ONLY if generation and m not in methods and method_names(method) == ["all"]]
    if skipped:
        print(f"note: {' and '.join(skipped)} train only a classifier: not on a generation task "
              "(--task classification estimates them)", file=sys.stderr)
    if measure:
        if dtype != "fp32" or optimizer != "adamw" or gradient_checkpointing:
            raise UserError("--measure trains with adamw, no checkpointing, in fp32 (sdpa) or the fast path's "
                            "precision (--attention deltatune): leave --dtype, --optimizer as they are "
                            "(k-bit backbones: --quantize nf4,int8)")
        path = "deltatune" if attention == "deltatune" else "sdpa"

        names = [m for m in methods if m in MEASURABLE] if method_names(method) == ["all"] else methods
        rows = measure_methods(model, names, batch_size=batch_size, seq_len=seq_len, steps=measure_steps,
                               num_labels=num_labels, threads=threads, generation=generation, training=path,
                               quantize=kinds)
        kind = "generation" if generation else f"classification ({num_labels} labels)"
        print(json.dumps(measurements_json(rows), indent=2) if json_ else format_measurements(
            rows, f"{model}: {kind}, batch {batch_size}, seq {seq_len}, "
                  f"{'deltatune path' if path == 'deltatune' else 'fp32, sdpa'}, AdamW, CPU; "
                  f"{measure_steps} steps"))
        return 0
    estimates = estimate_for_model(shapes, methods, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                   optimizer=optimizer, activations=activations,
                                   gradient_checkpointing=gradient_checkpointing,
                                   num_virtual_tokens=num_virtual_tokens, num_labels=num_labels,
                                   attention=attention, generation=generation,
                                   lm_loss="chunked" if attention == "deltatune" and generation else "model")
    if json_:
        print(json.dumps([e.to_json() for e in estimates], indent=2))
    else:
        checkpointing = "gradient checkpointing" if gradient_checkpointing else "no checkpointing"
        kind = "generation" if generation else f"classification ({num_labels} labels)"
        print(format_estimates(shapes, estimates, f"{kind}, batch {batch_size}, seq {seq_len}, {dtype}, "
                                                  f"{optimizer}, {attention} attention, {checkpointing}"))
    return 0

