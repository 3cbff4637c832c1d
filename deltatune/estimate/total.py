"""One training step's memory per method: the parts of the total, each as alive at the step's peak.

    total = weights + gradients + optimizer + activations + overhead          (GiB, printed "GB")

The seed model adds every line as if all were alive at once. The detailed model gives what is alive at the
step's peak (`peak.step_peak`): the gradients and saved activations of that moment, the transients
beside them in the overhead, and names the phase (forward, backward, optimizer step).

`estimate_for_model` returns one `MemoryEstimate` per method, for the `estimate` command (`cli`) and for
comparing with measured training steps (`measure`). Each method's delta sizes come from its own Config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from deltatune.errors import UserError
from deltatune.estimate import (
    GIB,
    OPTIMIZERS,
    QUANT_CONSTANT_BITS,
    MethodPlan,
    Precision,
    TrainableParams,
    classifier_bias,
    count_trainable,
    head_params,
    largest_trainable_tensors,
    layer_delta_params,
    optimizer_state_params,
    plan_for_method,
    precision_for,
    quantized_matrix_params,
)
from deltatune.estimate.detailed import ActivationReport, RunSettings, activation_report
from deltatune.estimate.peak import StepPeak, step_peak
from deltatune.estimate.seed import (
    SEED_CUDA_CONTEXT_BYTES,
    optimizer_state_bytes,
    seed_components,
    seed_hidden_states_bytes,
)
from deltatune.estimate.shapes import ModelShapes, load_shapes
from deltatune.estimate.sizes import method_config
from deltatune.optimizers import resolve_optimizer

ACTIVATION_MODELS = ("seed", "detailed")
DEVICES = ("cuda", "cpu")


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


def configured(method: str, num_virtual_tokens: int | None, options: dict[str, dict[str, Any]] | None,
               configs: dict[str, Any] | None = None) -> Any:
    """The method's Config: `configs[method]` as given (a run's own), else its defaults, then `options[method]`,
    then `num_virtual_tokens` where it has them."""
    if configs and method in configs:
        return configs[method]
    config = method_config(method, (options or {}).get(method))
    if config is not None and num_virtual_tokens is not None and hasattr(config, "num_virtual_tokens"):
        return replace(config, num_virtual_tokens=num_virtual_tokens)
    return config


def estimate_for_model(shapes: ModelShapes | str, methods: Sequence[str], *, batch_size: int = 8,
                       seq_len: int = 128, dtype: str = "fp32", optimizer: str = "adamw",
                       activations: str = "detailed", gradient_checkpointing: bool | int = False,
                       num_virtual_tokens: int | None = None, num_labels: int = 2, attention: str = "eager",
                       device: str = "cuda", generation: bool | None = None,
                       options: dict[str, dict[str, Any]] | None = None, lm_loss: str = "model",
                       labelled_fraction: float = 1.0, configs: dict[str, Any] | None = None,
                       ) -> list[MemoryEstimate]:
    """One `MemoryEstimate` per method. `shapes` is a ModelShapes or anything `load_shapes` accepts;
    `generation` defaults to True for decoders (LM loss) and False for encoders (classifier);
    `gradient_checkpointing`: every layer (True) or the k lowest (an int); `attention="deltatune"` and
    `lm_loss="chunked"` model deltatune's own training path (estimate/fastpath.py)."""
    shapes = load_shapes(shapes) if isinstance(shapes, str) else shapes
    generation = shapes.is_decoder if generation is None else generation
    optimizer = resolve_optimizer(optimizer, extra=("sgd",))  # train's names; adam8bit is adamw8bit
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
        config = configured(method, num_virtual_tokens, options, configs)
        plan = plan_for_method(method, shapes, generation, config)
        if precision.quantized_bits and method == "full":
            raise UserError(f"full fine-tuning cannot train {precision.name} weights: use bf16 or a PEFT method")
        trainable = count_trainable(shapes, plan, generation, num_labels)
        run = RunSettings(batch_size, seq_len, precision.activation_bytes, precision.delta_bytes, attention,
                          gradient_checkpointing, device, generation, num_labels, lm_loss, labelled_fraction)
        report = activation_report(shapes, plan, run)
        seed_activations = seed_hidden_states_bytes(shapes, batch_size, seq_len, precision.activation_bytes)
        phase = "all at once"
        if activations == "seed":
            parts = seed_components(shapes, trainable.total, precision, optimizer, batch_size, seq_len,
                                    full=method == "full")
        else:
            stated = optimizer_state_params(shapes, plan, trainable, config)  # GaLore: rank-r states
            states_backbone = optimizer_state_bytes(optimizer, precision.trained_bytes)
            states_delta = optimizer_state_bytes(optimizer, precision.delta_bytes)
            context = SEED_CUDA_CONTEXT_BYTES if device == "cuda" else 0.0
            peak = detailed_peak(shapes, plan, report, precision, optimizer, device, generation, num_labels)
            phase = peak.phase
            parts = {  # features: fitted by scikit-learn, no autograd gradients nor optimizer
                "weights": weight_bytes(shapes, plan, precision, generation, num_labels),
                "gradients": peak.gradients_bytes,
                "optimizer": (stated.backbone * states_backbone + stated.delta * states_delta
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
