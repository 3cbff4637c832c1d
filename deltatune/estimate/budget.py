"""--gradient-checkpointing auto: checkpoint the fewest layers whose estimated training step fits a budget.

    estimate(k) = the detailed model's step peak with the k lowest layers checkpointed   (total.py)
    k* = min { k in 0..L : estimate(k) <= --max-memory }        (L, with a note, when even that does not fit)

The estimate is asked for the run as it will train: the batch size, the longest training row, the
method's own Config, the compute dtype and attention the fast path chose (deltatune's explicit kernel,
blockwise at long sequences; SDPA; eager) and the chunked LM loss. Checkpointing the lowest layers first:
their saved tensors are the ones held longest (backward frees them last), and a checkpointed layer
keeps only its input. Without --max-memory the budget is what the process could still take: the memory
available now (CUDA: free device memory) plus the weights already loaded.
"""

from __future__ import annotations

import sys
from typing import Any

from deltatune.errors import UserError
from deltatune.estimate import GIB, METHODS
from deltatune.estimate.shapes import shapes_from_config
from deltatune.estimate.total import MemoryEstimate, estimate_for_model

ATTENTION_OF_FAST_PATH = {"explicit": "deltatune", "sdpa": "sdpa", "deltatune_sdpa": "sdpa", "eager": "eager"}
"""FastPath.attention -> the estimate's attention model (anything else: sdpa, transformers' default)."""


def available_mb(device) -> float:
    """Memory this process could still allocate: free CUDA memory, or the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise OSError("MemAvailable")


def run_estimator(task_model, method_name: str, method_config: Any, config, seq_len: int | None = None) -> Any:
    """estimate(k) for this run (`seq_len`: its longest row; default --max-length), a function of the number
    of checkpointed lowest layers, and the number of layers."""
    from deltatune.fast import active
    from deltatune.fast.attention import pretrained

    model = pretrained(task_model.module)
    shapes = shapes_from_config(model.config.to_dict(), model.config.name_or_path or model.config.model_type)
    info = active(task_model)
    on = info is not None and not info.restored
    device = task_model.device()
    if seq_len is None:
        seq_len = config.length_for("generation" if task_model.pooling == "lm" else "classification")
    settings = dict(batch_size=config.batch_size, seq_len=seq_len, optimizer="adamw",
                    dtype="bf16" if on and info.precision == "bf16" else "fp32",
                    attention=ATTENTION_OF_FAST_PATH.get(info.attention if on else "", "sdpa"),
                    device="cuda" if device.type == "cuda" else "cpu", generation=task_model.pooling == "lm",
                    num_labels=max(1, task_model.num_labels or 1), lm_loss=info.lm_loss if on else "model",
                    configs={method_name: method_config})

    def estimate(layers: int) -> MemoryEstimate:
        [result] = estimate_for_model(shapes, [method_name], gradient_checkpointing=layers, **settings)
        return result

    return estimate, shapes.layers


def fewest_layers(estimate_mb, layers: int, budget_mb: float) -> tuple[int, float]:
    """(k*, estimate(k*) MiB): the smallest k in 0..layers whose estimate fits, by bisection (the estimate
    does not grow with k); `layers` when none fits."""
    low, high = 0, layers
    while low < high:
        mid = (low + high) // 2
        if estimate_mb(mid) <= budget_mb:
            high = mid
        else:
            low = mid + 1
    return low, estimate_mb(low)


def checkpointed_layers(task_model, method_name: str, method_config: Any, config, seq_len: int | None = None) -> int:
    """How many of the lowest layers `--gradient-checkpointing auto` checkpoints for this run (`seq_len`: the
    longest training row, default --max-length)."""
    layers = len(task_model.layers())
    if method_name not in METHODS:
        print(f"note: --gradient-checkpointing auto: the estimator does not model {method_name}: "
              "checkpointing every layer", file=sys.stderr)
        return layers
    try:
        estimate, modelled = run_estimator(task_model, method_name, method_config, config, seq_len)
    except UserError as error:  # a model family or option the estimator does not know
        print(f"note: --gradient-checkpointing auto: {error}: checkpointing every layer", file=sys.stderr)
        return layers
    budget = config.max_memory
    if budget is None:
        budget = available_mb(task_model.device()) + estimate(0).weights_gb * GIB / 2**20
    count, needed = fewest_layers(lambda k: estimate(k).total_gb * 1024, modelled, budget)
    if needed > budget:
        print(f"note: --gradient-checkpointing auto: even with every layer checkpointed the step needs about "
              f"{needed:,.0f} MB, over the {budget:,.0f} MB budget", file=sys.stderr)
    else:
        print(f"--gradient-checkpointing auto: {count} of {layers} layers checkpointed (estimated step "
              f"{needed:,.0f} MB, budget {budget:,.0f} MB)", file=sys.stderr)
    return min(count, layers)
