"""The interface every adaptation method meets, and the shared helpers that freeze and count.

A method is one module in `deltatune/methods/` that provides:

    NAME: str                      the registry name
    Config: type                   a dataclass; its fields (each documented) are the method's options
    DEFAULT_LR: float              learning rate used when the user gives none
    apply(task_model, config)      add the method's modules in place and mark only its parameters
                                   (and the task head) trainable; the backbone is never changed

and optionally:

    fit(task_model, config, train, validation, train_config)   non-gradient training (features)
    on_train_step(task_model, config, step, total_steps)      called after each optimizer step (AdaLoRA)
    delta_state(task_model, config) -> dict[str, Tensor]      what to save; default: trainable tensors
    pooling_for(requested, arch) -> str                         the pooling the method needs
    default_lr(config) -> float                                 DEFAULT_LR that depends on the options

Deltas are saved as the trainable tensors under their parameter names, so `apply` + loading those
tensors reproduces the trained model exactly.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError


class AdaptationMethod(Protocol):
    NAME: str
    Config: type
    DEFAULT_LR: float

    def apply(self, task_model: TaskModel, config: Any) -> None: ...


def default_lr(method: Any, config: Any) -> float:
    """The learning rate a method trains with when the user gives none."""
    return method.default_lr(config) if hasattr(method, "default_lr") else method.DEFAULT_LR


def mark_trainable(module: nn.Module, names: Iterable[str]) -> None:
    """Make exactly the named parameters trainable; raise if a name does not exist."""
    params = dict(module.named_parameters())
    for name in names:
        if name not in params:
            raise KeyError(f"no parameter named {name}")
        params[name].requires_grad_(True)


def train_head(task_model: TaskModel) -> None:
    """The task head (classifier, and weights newly initialised at load) trains with every method."""
    mark_trainable(task_model.module, task_model.head_names)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name, detached, contiguous, on the CPU."""
    return {name: p.detach().to("cpu").contiguous() for name, p in module.named_parameters()
            if p.requires_grad}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child_name = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or GPT-2's Conv1D (whose weight is (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise UserError(f"cannot adapt a {type(module).__name__}: only Linear/Conv1D projections are supported")


class AdaptedLayer(nn.Module):
    """A frozen linear (or Conv1D) `base_layer` with a method's named adapters beside it (peft's layout).

    `weight` and `bias` are the base layer's, so code that reads layer.weight (e.g. dtype checks) keeps
    working; `active_adapter` None runs the base layer alone."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.active_adapter: str | None = name

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


ROLE_NAMES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def layer_selection(task_model: TaskModel, layers: Iterable[int | str] | None) -> set[int] | None:
    """A method's `layers` option (transformer layer indices from 0), checked; None means every layer."""
    if layers is None:
        return None
    count = len(task_model.layers())
    try:
        chosen = {int(i) for i in layers}
    except ValueError as exc:
        raise UserError(f"layers must be integers (0..{count - 1}), got {list(layers)}") from exc
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise UserError(f"layer {bad[0]} does not exist: the model has {count} layers (0..{count - 1})")
    return chosen


def layer_of(task_model: TaskModel, name: str, root: nn.Module | None = None) -> int | None:
    """The transformer layer a module or parameter `name` (relative to `root`, default the task model's
    module) lies in, or None when it lies outside the layers (embeddings, head)."""
    root = task_model.module if root is None else root
    path = next(n for n, m in root.named_modules() if m is task_model.layers())
    head, dot, rest = name.partition(f"{path}." if path else "")
    if head or not dot:
        return None
    index = rest.split(".", 1)[0]
    return int(index) if index.isdigit() else None


def resolve_targets(task_model: TaskModel, targets: Iterable[str]) -> list[str]:
    """Full module names (from the task model root) for target roles or module-name suffixes.

    Roles (query, key, value, attn_out, ffn_in, ffn_out) are looked up in the architecture's spec,
    so `query,value` means q_proj/v_proj on Llama; other strings match module-name suffixes.
    """
    arch = task_model.arch
    module = task_model.module
    base_prefix = next(n for n, m in module.named_modules() if m is task_model.backbone)
    base_prefix = f"{base_prefix}." if base_prefix else ""
    n_layers = len(task_model.layers())
    found: list[str] = []
    for target in targets:
        if target in ROLE_NAMES:
            rel = {"ffn_in": arch.ffn_in}.get(target) or (getattr(arch, target),)
            if target in ("query", "key", "value") and getattr(arch, target) is None:
                rel = (arch.qkv,)  # fused projection: q/k/v share one module
            for i in range(n_layers):
                found += [f"{base_prefix}{arch.layers}.{i}.{r}" for r in rel]
        else:
            matches = [n for n, _ in module.named_modules() if n == target or n.endswith("." + target)]
            if not matches:
                raise UserError(f"target module '{target}' not found in {arch.family} model")
            found += matches
    return list(dict.fromkeys(found))


def build_config(config_cls: type, overrides: dict[str, Any]) -> Any:
    """A method config from string or typed overrides, with a clear error for an unknown option."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown option '{key}' for this method: options are {', '.join(fields)}")
        values[key] = _coerce(raw, hints[key], key)
    return config_cls(**values)


def _coerce(raw: Any, hint: Any, key: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (list, tuple) or (args and typing.get_origin(args[0]) in (list, tuple)):
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    target = args[0] if args and origin is not None else hint
    try:
        if target is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        if target in (int, float):
            return target(raw)
    except ValueError as exc:
        raise UserError(f"option '{key}' expects {target.__name__}, got '{raw}'") from exc
    return raw


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a method config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
