"""Training configuration: one dataclass, a docstring under each field; CLI flags override it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import UserError
from deltatune.options import option
from deltatune.options import validate as validate_options

CHECKPOINTING = ("off", "on", "auto")
"""--gradient-checkpointing: none, every layer, or the fewest layers that fit --max-memory."""

CLASSIFICATION_MAX_LENGTH = 128
GENERATION_MAX_LENGTH = 1024
"""A chat row (system prompt, several turns) rarely fits 128 tokens; SmolLM2's template alone takes ~30."""


@dataclass
class TrainConfig:
    epochs: int = option(3, ge=1)
    """Passes over the training split."""
    batch_size: int = option(32, ge=1)
    """Examples per optimizer step (before gradient accumulation)."""
    grad_accum: int = option(1, ge=1)
    """Micro-batches whose gradients are summed before one optimizer step."""
    lr: float | None = option(None, gt=0)
    """Peak learning rate; None uses the method's DEFAULT_LR."""
    weight_decay: float = option(0.01, ge=0)
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    warmup_ratio: float = option(0.06, ge=0, le=1)
    """Fraction of steps with a linear warm-up from 0 to lr; then linear decay to 0."""
    max_grad_norm: float = option(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    max_length: int | None = option(None, ge=1)
    """Tokens per example after truncation (default: 128 for classification, 1024 for generation); batches
    pad only to their longest row. Generation rows lose prompt tokens from the left; a longer answer is refused."""
    train_on_prompt: bool = False
    """Generation: learn the prompt tokens too (default: the loss covers the assistant turns only)."""
    packing: bool = False
    """Generation on decoders: pack several examples into each sequence of up to 256 tokens (a longer one
    alone), each attending to itself only (block-diagonal causal mask, positions restarting per example)."""
    seed: int = option(0, ge=0, lt=2**32)
    """Seeds Python, NumPy and torch: the same seed gives the same delta."""
    precision: str = option("auto", choices=("auto", "fp32", "bf16"))
    """auto (bf16 where the hardware runs it natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; else
    fp32), fp32, or bf16: frozen weights stored in bf16, trainable parameters and optimizer state in fp32,
    norms, softmax sums and the loss in fp32 (`deltatune/fast`)."""
    quantize: str | None = None
    """Store the frozen backbone's transformer projections quantised (QLoRA): nf4 (4-bit NormalFloat,
    double-quantised), fp4, int8 (bitsandbytes), 3bit or 2bit (hqq), q4_1 (llama.cpp's Q4_1, pure torch:
    SmolLM2's GGUF weights kept exactly); compute in bf16 or fp32 as
    --precision resolves. Trainable tensors stay fp32; methods that train backbone weights are refused."""
    optimizer: str = "adamw"
    """adamw (torch, fp32 state), adamw8bit (bitsandbytes: both moments in 8 bits, blockwise), or
    paged_adamw8bit (the same with its state in CUDA unified memory, paged to the host under pressure)."""
    attention: str = "auto"
    """Attention for training: auto (explicit matmul + softmax on the CPU, SDPA on CUDA), explicit, sdpa,
    eager, or model (as loaded)."""
    dropout: str = "auto"
    """The backbone's own dropout (hidden and attention) while training: auto (0: no accuracy loss measured,
    about 1.4x faster on the CPU), model (the checkpoint's rates), or a rate like 0.1."""
    gradient_checkpointing: str = option("off", choices=CHECKPOINTING)
    """off, on (the bare flag) or auto: keep only each layer's input in the forward and recompute the layer
    in backward (transformers' non-reentrant checkpointing), less activation memory for about one more
    forward per step. auto checkpoints the fewest layers whose estimated step fits --max-memory
    (deltatune/estimate/budget.py)."""
    max_memory: float | None = option(None, gt=0)
    """Memory budget in MB of one training step as the estimator counts it (weights, gradients, optimizer
    states, activations) for --gradient-checkpointing auto; unset: the memory available now."""
    compile: bool = False
    """torch.compile the training forward (a one-off compile of about a minute; widths padded to buckets)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    eval_batch_size: int = option(64, ge=1)
    """Batch size for validation and test."""
    eval_steps: int = option(0, ge=0)
    """Also validate every N optimizer steps inside an epoch (0: at each epoch's end only). Each result
    joins delta.json's history with its step and training seconds so far (a loss curve); the best-epoch
    choice still uses the epoch ends."""
    cache: str = option("auto", choices=("auto", "memory", "disk", "off"))
    """Frozen-prefix cache: auto (memory, spilling to disk past cache_max_mb), memory, disk, off."""
    cache_max_mb: float = option(1024, ge=0)
    """Memory bound of the frozen-prefix cache before it spills to disk."""
    progress: bool = True
    """Show a progress bar with loss and throughput."""
    save_steps: int = option(0, ge=0)
    """Write a checkpoint to OUT/checkpoints/step-N every N optimizer steps and at each epoch end, for
    `--resume` (0: none)."""
    keep_checkpoints: int = option(2, ge=1)
    """Keep the newest K complete checkpoints."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 (`fully_shard`), for full
    fine-tuning of backbones too large to replicate per process."""

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):  # a config file's true/false, the former bool field
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"

    def validate(self) -> TrainConfig:
        """Every field within its declared range (named as its flag), then the checks a range cannot say."""
        validate_options(self, name=lambda field: "--" + field.replace("_", "-"))
        from deltatune.fast import attention, parse_dropout

        if self.attention not in attention.CHOICES:
            raise UserError(f"--attention must be one of {', '.join(attention.CHOICES)}, not '{self.attention}'")
        parse_dropout(self.dropout)
        from deltatune import quantize
        from deltatune.optimizers import resolve_optimizer

        self.quantize = quantize.parse(self.quantize)
        self.optimizer = resolve_optimizer(self.optimizer)
        return self

    def length_for(self, kind: str) -> int:
        """--max-length, or the default of a task kind ("classification" | "generation")."""
        if self.max_length is not None:
            return self.max_length
        return GENERATION_MAX_LENGTH if kind == "generation" else CLASSIFICATION_MAX_LENGTH

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | None) -> dict[str, Any]:
    """Flag defaults from a YAML/TOML/JSON file (keys are flag names with - or _)."""
    if not path:
        return {}
    file = Path(path)
    if not file.exists():
        raise UserError(f"config file not found: {path}")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_defaults(values: dict[str, Any], parser: argparse.ArgumentParser, path: str,
                    command: str) -> dict[str, Any]:
    """A config file's keys as defaults of a command's parser: a key is a flag name (`lr`, `batch-size`,
    `set`); a repeatable flag takes a list, one value, or a mapping (`set: {r: 16}` means --set r=16)."""
    actions = {action.dest: action for action in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        dest = next((d for d in actions if key in (d, d.rstrip("_")) or d.endswith("." + key)), None)
        if dest is None:
            raise UserError(f"config file {path}: unknown option '{key}' for {command}")
        if isinstance(actions[dest], argparse._AppendAction):
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
            value = [str(v) for v in (items if isinstance(items, list) else [items])]
        defaults[dest] = value
    return defaults
