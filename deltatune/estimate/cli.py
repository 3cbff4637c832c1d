"""`deltatune estimate`: memory of one training step per method, from the model's shapes alone.

    total = weights + gradients + optimizer + activations + overhead          (GiB, printed "GB")

The seed model adds every line as if all were alive at once. The detailed model gives what is alive at the
step's peak (`detailed.step_peak`): the gradients and saved activations of that moment, the transients
beside them in the overhead, and names the phase (forward, backward, optimizer step).

`estimate_for_model` returns one `MemoryEstimate` per method (for the CLI, and for comparing with
measured training steps); `hardware_table` sets our numbers beside the seed's LLaMA-Factory table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deltatune.errors import UserError
from deltatune.estimate import (
    CLASSIFIER_ONLY,
    GIB,
    METHODS,
    OPTIMIZERS,
    QUANT_CONSTANT_BITS,
    DeltaSettings,
    MethodPlan,
    Precision,
    TrainableParams,
    classifier_bias,
    count_trainable,
    head_params,
    largest_trainable_tensors,
    layer_delta_params,
    plan_for_method,
    precision_for,
    quantized_matrix_params,
)
from deltatune.estimate.detailed import ActivationReport, RunSettings, StepPeak, activation_report, step_peak
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
TASKS = ("classification", "generation")


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one training step of one method, in GiB."""

    method: str
    trainable_params: int
    weights_gb: float
    gradients_gb: float
    """Seed: every gradient. Detailed: the gradients formed by the step's peak (none at the top of backward:
    zero_grad(set_to_none=True) freed them)."""
    optimizer_gb: float
    activations_gb: float
    """From the model named in `activations_model`; detailed: the saved activations alive at the peak."""
    overhead_gb: float
    """CUDA context (GPU) + the short-lived tensors at the peak (detailed model)."""
    activations_model: str
    seed_activations_gb: float
    detailed_activations_gb: float
    """Everything the detailed model saves for backward (alive together at the top of backward)."""
    peak_phase: str = "all at once"
    """Where the step peaks: forward, backward (loss / layers / embeddings) or optimizer step; the seed
    formula adds every line as if all were alive at once."""

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb + self.overhead_gb

    def to_json(self) -> dict[str, float | int | str]:
        row = asdict(self)
        row["total_gb"] = self.total_gb
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}


def parameters_in_memory(shapes: ModelShapes, generation: bool, num_labels: int, classifier_has_bias: bool = True) -> int:
    """Backbone parameters loaded for the task: with the LM head for generation, a classifier otherwise."""
    body = shapes.embedding_params() + shapes.layers * shapes.layer_params() + shapes.top_params()
    return body + (shapes.lm_head_params() if generation
                   else head_params(shapes, False, num_labels, classifier_has_bias))


def weight_bytes(shapes: ModelShapes, plan: MethodPlan, precision: Precision, generation: bool,
                 num_labels: int) -> float:
    """k-bit frozen matrices · (bits + constants)/8 + other frozen · frozen_bytes + trained + deltas (the
    autocast fp16 copy of trained weights under AMP lives from forward to backward: `detailed_peak`)."""
    trainable = count_trainable(shapes, plan, generation, num_labels)
    bits = precision.quantized_bits
    quantized = quantized_matrix_params(shapes, plan) if bits else 0
    in_memory = parameters_in_memory(shapes, generation, num_labels, classifier_bias(shapes, plan.backprop))
    frozen = in_memory - trainable.backbone - quantized
    total = quantized * (bits + QUANT_CONSTANT_BITS[bits]) / 8 if bits else 0.0
    total += frozen * precision.frozen_bytes + trainable.backbone * precision.trained_bytes
    total += trainable.delta * precision.delta_bytes
    return total


def gradient_bytes(trainable: TrainableParams, precision: Precision) -> float:
    return trainable.backbone * precision.trained_bytes + trainable.delta * precision.delta_bytes


def optimizer_temporary_bytes(optimizer: str, device: str, trainable: TrainableParams,
                              largest: TrainableParams, precision: Precision) -> float:
    """AdamW's update allocates sqrt(v), then sqrt(v)/bias-correction: on the CPU (a loop over tensors) two
    of the largest tensor; on CUDA (foreach) one copy of every parameter of a dtype group at once. SGD
    updates in place and 8-bit Adam runs a fused kernel: nothing."""
    if optimizer != "adamw":
        return 0.0
    if device == "cpu":
        return 2 * max(largest.backbone * precision.trained_bytes, largest.delta * precision.delta_bytes)
    return max(trainable.backbone * precision.trained_bytes, trainable.delta * precision.delta_bytes)


def detailed_peak(shapes: ModelShapes, plan: MethodPlan, report: ActivationReport, precision: Precision,
                  optimizer: str, device: str, generation: bool, num_labels: int) -> StepPeak:
    """The step's peak above weights and optimizer states: when each gradient forms (the head's first,
    each layer's as backward passes it, the embeddings' and soft prompts' last) and what is alive then
    (under AMP the fp16 copies autocast makes of trained weights, saved by their matmuls for backward)."""
    trainable = count_trainable(shapes, plan, generation, num_labels)
    layers = tuple(gradient_bytes(layer_delta_params(shapes, layer), precision) for layer in plan.layers)
    embeddings = shapes.embedding_params() if plan.embeddings else 0
    tied_top = generation and plan.head and shapes.tied_embeddings and plan.embeddings  # the LM head's dW
    prompts = TrainableParams(0, trainable.delta - sum(layer_delta_params(shapes, layer).delta
                                                       for layer in plan.layers))
    bottom = (0 if tied_top else embeddings) * precision.trained_bytes + gradient_bytes(prompts, precision)
    top = gradient_bytes(trainable, precision) - sum(layers) - bottom
    tied_lookup = shapes.vocab * shapes.hidden * precision.trained_bytes if tied_top else 0.0
    largest = largest_trainable_tensors(shapes, plan, generation, num_labels)
    return step_peak(report, backprop=plan.backprop, top_gradient_bytes=top, layer_gradient_bytes=layers,
                     bottom_gradient_bytes=bottom, embedding_backward_bytes=tied_lookup,
                     autocast_copy_bytes=2 * trainable.total if precision.amp_copy else 0.0,
                     optimizer_temporary_bytes=optimizer_temporary_bytes(optimizer, device, trainable, largest,
                                                                         precision))


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
        phase = "all at once"
        if activations == "seed":
            parts = seed_components(shapes, trainable.total, precision, optimizer, batch_size, seq_len,
                                    full=method == "full")
        else:
            states_backbone = optimizer_state_bytes(optimizer, precision.trained_bytes)
            states_delta = optimizer_state_bytes(optimizer, precision.delta_bytes)
            context = SEED_CUDA_CONTEXT_BYTES if device == "cuda" else 0.0
            peak = detailed_peak(shapes, plan, report, precision, optimizer, device, generation, num_labels)
            phase = peak.phase
            parts = {  # features: fitted by scikit-learn, no autograd gradients nor optimizer
                "weights": weight_bytes(shapes, plan, precision, generation, num_labels),
                "gradients": peak.gradients_bytes,
                "optimizer": (trainable.backbone * states_backbone + trainable.delta * states_delta
                              if plan.backprop else 0.0),
                "activations": peak.activations_bytes,
                "overhead": context + peak.transient_bytes,
            }
        estimates.append(MemoryEstimate(
            method=method, trainable_params=trainable.total, weights_gb=parts["weights"] / GIB,
            gradients_gb=parts["gradients"] / GIB, optimizer_gb=parts["optimizer"] / GIB,
            activations_gb=parts["activations"] / GIB, overhead_gb=parts["overhead"] / GIB,
            activations_model=activations, seed_activations_gb=seed_activations / GIB,
            detailed_activations_gb=report.total_bytes / GIB, peak_phase=phase))
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
             gradient_checkpointing: bool = False, num_virtual_tokens: int = 20, num_labels: int = 2,
             hardware_table: bool = False, json_: bool = False, attention: str = "eager", measure: bool = False,
             measure_steps: int = 3, threads: int = 1, task: str | None = None) -> int:
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
        num_labels: classifier outputs (classification tasks).
        hardware_table: print the seed's hardware table (7B-70B) beside our estimates instead.
        json_: print a JSON list, one object per method (or per hardware-table cell).
        attention: attention kernel of the detailed model: eager (saves seq² scores) or sdpa (fused, saves no seq² tensor).
        measure: run real training steps on this machine (CPU, fp32, AdamW, sdpa), one process per method, and print the measured peak beside the detailed CPU estimate (model: a folder or minilm / smollm2).
        measure_steps: training steps per method with --measure.
        threads: torch threads per measuring process.
        task: generation (LM loss over the vocabulary) or classification (a --num-labels classifier; a decoder pools its last token, as `deltatune compare` trains it); default: generation for decoders, classification for encoders.
    """
    if hardware_table:
        rows = hardware_table_rows()  # the flag shadows the function's name here
        print(json.dumps([asdict(row) for row in rows], indent=2) if json_ else format_hardware_table(rows))
        return 0
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
                               num_labels=num_labels, threads=threads, generation=generation)
        kind = "generation" if generation else f"classification ({num_labels} labels)"
        print(json.dumps(measurements_json(rows), indent=2) if json_ else format_measurements(
            rows, f"{model}: {kind}, batch {batch_size}, seq {seq_len}, fp32, AdamW, sdpa, CPU; "
                  f"{measure_steps} steps"))
        return 0
    estimates = estimate_for_model(shapes, methods, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                   optimizer=optimizer, activations=activations,
                                   gradient_checkpointing=gradient_checkpointing,
                                   num_virtual_tokens=num_virtual_tokens, num_labels=num_labels,
                                   attention=attention, generation=generation)
    if json_:
        print(json.dumps([e.to_json() for e in estimates], indent=2))
    else:
        checkpointing = "gradient checkpointing" if gradient_checkpointing else "no checkpointing"
        kind = "generation" if generation else f"classification ({num_labels} labels)"
        print(format_estimates(shapes, estimates, f"{kind}, batch {batch_size}, seq {seq_len}, {dtype}, "
                                                  f"{optimizer}, {attention} attention, {checkpointing}"))
    return 0

