"""`deltatune estimate`: memory of one training step per method, from the model's shapes alone.

    total = weights + gradients + optimizer + activations + overhead          (GiB, printed "GB")

`estimate_for_model` returns one `MemoryEstimate` per method (for the CLI, and for comparing with
measured training steps); `hardware_table` sets our numbers beside the seed's LLaMA-Factory table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deltatune.errors import UserError
from deltatune.estimate import (
    GIB,
    METHODS,
    OPTIMIZERS,
    QUANT_CONSTANT_BITS,
    DeltaSettings,
    MethodPlan,
    Precision,
    count_trainable,
    head_params,
    plan_for_method,
    precision_for,
    quantized_matrix_params,
)
from deltatune.estimate.detailed import RunSettings, activation_report
from deltatune.estimate.seed import (
    HARDWARE_MODELS,
    HARDWARE_ROWS,
    SEED_CUDA_CONTEXT_BYTES,
    optimizer_state_bytes,
    rule_of_thumb_bytes,
    seed_components,
    seed_hidden_states_bytes,
)
from deltatune.estimate.shapes import ModelShapes, load_shapes

ACTIVATION_MODELS = ("seed", "detailed")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one training step of one method, in GiB."""

    method: str
    trainable_params: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    """From the model named in `activations_model`."""
    overhead_gb: float
    """CUDA context (GPU) + the largest short-lived buffer (detailed model)."""
    activations_model: str
    seed_activations_gb: float
    detailed_activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb + self.overhead_gb

    def to_json(self) -> dict[str, float | int | str]:
        row = asdict(self)
        row["total_gb"] = self.total_gb
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}


def parameters_in_memory(shapes: ModelShapes, generation: bool, num_labels: int) -> int:
    """Backbone parameters loaded for the task: with the LM head for generation, a classifier otherwise."""
    body = shapes.embedding_params() + shapes.layers * shapes.layer_params() + shapes.top_params()
    return body + (shapes.lm_head_params() if generation else head_params(shapes, False, num_labels))


def weight_bytes(shapes: ModelShapes, plan: MethodPlan, precision: Precision, generation: bool,
                 num_labels: int) -> float:
    """k-bit frozen matrices · (bits + constants)/8 + other frozen · frozen_bytes + trained + deltas
    (+ the autocast fp16 copy of trained weights under AMP)."""
    trainable = count_trainable(shapes, plan, generation, num_labels)
    bits = precision.quantized_bits
    quantized = quantized_matrix_params(shapes, plan) if bits else 0
    in_memory = parameters_in_memory(shapes, generation, num_labels)
    if generation and not plan.backprop:                    # features: a classifier beside the LM
        in_memory += head_params(shapes, False, num_labels)
    frozen = in_memory - trainable.backbone - quantized
    total = quantized * (bits + QUANT_CONSTANT_BITS[bits]) / 8 if bits else 0.0
    total += frozen * precision.frozen_bytes + trainable.backbone * precision.trained_bytes
    total += trainable.delta * precision.delta_bytes
    return total + (2 * trainable.total if precision.amp_copy else 0.0)


def estimate_for_model(shapes: ModelShapes | str, methods: Sequence[str], *, batch_size: int = 8,
                       seq_len: int = 128, dtype: str = "fp32", optimizer: str = "adamw",
                       activations: str = "detailed", gradient_checkpointing: bool = False,
                       num_virtual_tokens: int = 20, num_labels: int = 2, attention: str = "eager",
                       device: str = "cuda", generation: bool | None = None,
                       settings: DeltaSettings | None = None) -> list[MemoryEstimate]:
    """One `MemoryEstimate` per method. `shapes` is a ModelShapes or anything `load_shapes` accepts;
    `generation` defaults to True for decoders (LM loss) and False for encoders (classifier)."""
    shapes = load_shapes(shapes) if isinstance(shapes, str) else shapes
    generation = shapes.is_decoder if generation is None else generation
    settings = settings or DeltaSettings(num_virtual_tokens=num_virtual_tokens)
    checks = [(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
              (seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"),
              (generation or num_labels >= 1, f"num_labels must be >= 1, got {num_labels}"),
              (optimizer in OPTIMIZERS, f"unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})"),
              (activations in ACTIVATION_MODELS, f"unknown activations model {activations!r} (seed or detailed)"),
              (device in DEVICES, f"unknown device {device!r} (cuda or cpu)"),
              (len(methods) > 0, "no method given")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    estimates = []
    for method in methods:
        precision = precision_for(dtype, method)
        plan = plan_for_method(method, shapes, generation, settings)
        if precision.quantized_bits and method == "full":
            raise UserError(f"full fine-tuning cannot train {precision.name} weights: use bf16 or a PEFT method")
        trainable = count_trainable(shapes, plan, generation, num_labels)
        run = RunSettings(batch_size, seq_len, precision.activation_bytes, precision.delta_bytes, attention,
                          gradient_checkpointing, device, generation, num_labels)
        report = activation_report(shapes, plan, run)
        seed_activations = seed_hidden_states_bytes(shapes, batch_size, seq_len, precision.activation_bytes)
        if activations == "seed":
            parts = seed_components(shapes, trainable.total, precision, optimizer, batch_size, seq_len,
                                    full=method == "full")
        else:
            states_backbone = optimizer_state_bytes(optimizer, precision.trained_bytes)
            states_delta = optimizer_state_bytes(optimizer, precision.delta_bytes)
            context = SEED_CUDA_CONTEXT_BYTES if device == "cuda" else 0.0
            parts = {
                "weights": weight_bytes(shapes, plan, precision, generation, num_labels),
                "gradients": trainable.backbone * precision.trained_bytes + trainable.delta * precision.delta_bytes,
                "optimizer": trainable.backbone * states_backbone + trainable.delta * states_delta,
                "activations": report.total_bytes,
                "overhead": context + report.temporary_bytes,
            }
        estimates.append(MemoryEstimate(
            method=method, trainable_params=trainable.total, weights_gb=parts["weights"] / GIB,
            gradients_gb=parts["gradients"] / GIB, optimizer_gb=parts["optimizer"] / GIB,
            activations_gb=parts["activations"] / GIB, overhead_gb=parts["overhead"] / GIB,
            activations_model=activations, seed_activations_gb=seed_activations / GIB,
            detailed_activations_gb=report.total_bytes / GIB))
    return estimates


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
    """A table per method; the activation column used in the total is marked with *."""
    used = estimates[0].activations_model if estimates else "detailed"
    seed_head, detailed_head = ("act.seed*", "act.detail") if used == "seed" else ("act.seed", "act.detail*")
    columns = ("method", "trainable", "weights", "gradients", "optimizer", seed_head, detailed_head, "overhead",
               "total")
    lines = [f"{shapes.name}: {shapes.n_params:,} parameters ({shapes.family}); {header}",
             f"{columns[0]:<10}{columns[1]:>15}" + "".join(f"{c:>12}" for c in columns[2:])]
    for e in estimates:
        numbers = (e.weights_gb, e.gradients_gb, e.optimizer_gb, e.seed_activations_gb, e.detailed_activations_gb,
                   e.overhead_gb, e.total_gb)
        lines.append(f"{e.method:<10}{e.trainable_params:>15,}" + "".join(f"{n:>12.2f}" for n in numbers))
    lines.append("GB = GiB (2**30 bytes); total uses the * activation column.")
    return "\n".join(lines)


DEFAULT_METHODS = "full,lora"


def method_names(method: str | Sequence[str] | None) -> list[str]:
    """"full,lora", or a list of such strings (a repeated --method) → ["full", "lora"]: lower case, each once,
    in the order given; None or nothing → the default (full, lora)."""
    parts = method.split(",") if isinstance(method, str) else [part for m in method or () for part in m.split(",")]
    names = list(dict.fromkeys(name.strip().lower() for name in parts if name.strip()))
    return names or DEFAULT_METHODS.split(",")


def parse_methods(method: str | Sequence[str] | None, shapes: ModelShapes, dtype: str) -> list[str]:
    """"full,lora" (or a list of them) → ["full", "lora"]; "all" → every method that applies (no bitfit without
    biases, no full fine-tuning of k-bit weights)."""
    names = method_names(method)
    if "all" in names and len(names) > 1:
        raise UserError("--method all already names every method: give it alone")
    if names == ["all"]:
        quantized = precision_for(dtype, "full").quantized_bits is not None
        return [name for name in METHODS
                if not (name == "bitfit" and shapes.layer_bias_params() == 0) and not (name == "full" and quantized)]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)}, or all)")
    return names


def estimate(*, model: str = "all-minilm-l6-v2", method: list[str] | None = None, batch_size: int = 8, seq_len: int = 128,
             dtype: str = "fp32", optimizer: str = "adamw", activations: str = "detailed",
             gradient_checkpointing: bool = False, num_virtual_tokens: int = 20, num_labels: int = 2,
             hardware_table: bool = False, json_: bool = False, attention: str = "eager", measure: bool = False,
             measure_steps: int = 3, threads: int = 1) -> int:
    """Estimate the GPU memory of one training step per method, from the model's shapes alone.

    Args:
        model: a known name (llama-2-7b, mistral-7b, bert-base-uncased, ...), a folder with config.json, or a config.json path.
        method: methods, comma-separated and/or repeated (--method full --method lora,prompt): full, head, last2, features, lora, adalora, bitfit, adapter, prompt, prefix, ptuning, ia3, mam, qlora, or all (default: full,lora).
        batch_size: sequences per training step.
        seq_len: tokens per sequence (prompt methods add their soft tokens).
        dtype: training dtype: fp32, bf16, fp16, amp (mixed precision), int8, 4bit, 2bit (k-bit frozen backbone).
        optimizer: adamw (2 states), sgd (none) or adam8bit (2 bytes per parameter).
        activations: activation model for the total: detailed (per-layer autograd accounting) or seed (the slide formula).
        gradient_checkpointing: keep only each layer's input and recompute the layer in backward.
        num_virtual_tokens: soft tokens of prompt tuning, p-tuning, prefix tuning and MAM.
        num_labels: classifier outputs for encoder models.
        hardware_table: print the seed's hardware table (7B-70B) beside our estimates instead.
        json_: print a JSON list, one object per method (or per hardware-table cell).
        attention: attention kernel of the detailed model: eager (saves seq² scores) or sdpa (fused, saves no seq² tensor).
        measure: run real training steps on this machine (CPU, fp32, AdamW, sdpa), one process per method, and print the measured peak beside the detailed CPU estimate (model: a folder or minilm / smollm2).
        measure_steps: training steps per method with --measure.
        threads: torch threads per measuring process.
    """
    if hardware_table:
        rows = hardware_table_rows()  # the flag shadows the function's name here
        print(json.dumps([asdict(row) for row in rows], indent=2) if json_ else format_hardware_table(rows))
        return 0
    shapes = load_shapes(model)
    methods = parse_methods(method, shapes, dtype)
    if measure:
        from deltatune.estimate.measure import (
            MEASURABLE,
            format_measurements,
            measure_methods,
            measurements_json,
        )

        if dtype != "fp32" or optimizer != "adamw" or gradient_checkpointing:
            raise UserError("--measure trains as deltatune does on this machine: fp32, adamw, no checkpointing")

        names = [m for m in methods if m in MEASURABLE] if method_names(method) == ["all"] else methods
        rows = measure_methods(model, names, batch_size=batch_size, seq_len=seq_len, steps=measure_steps,
                               num_labels=num_labels, threads=threads)
        print(json.dumps(measurements_json(rows), indent=2) if json_ else format_measurements(
            rows, f"{model}: batch {batch_size}, seq {seq_len}, fp32, AdamW, sdpa, CPU; {measure_steps} steps"))
        return 0
    estimates = estimate_for_model(shapes, methods, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                   optimizer=optimizer, activations=activations,
                                   gradient_checkpointing=gradient_checkpointing,
                                   num_virtual_tokens=num_virtual_tokens, num_labels=num_labels,
                                   attention=attention)
    if json_:
        print(json.dumps([e.to_json() for e in estimates], indent=2))
    else:
        checkpointing = "gradient checkpointing" if gradient_checkpointing else "no checkpointing"
        print(format_estimates(shapes, estimates, f"batch {batch_size}, seq {seq_len}, {dtype}, {optimizer}, "
                                                  f"{attention} attention, {checkpointing}"))
    return 0

