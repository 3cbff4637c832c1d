"""The one contract every adaptation method meets (`Method`), and the shared helpers that freeze and count.

A method is one module in `deltatune/methods/` (one file: its math, its training forward, its
per-row serving forward, its estimate, its peft mapping). `Method.of(module)` reads the module once
and fills every hook the module does not define with its default, so the rest of deltatune calls
hooks without probing (`hasattr`) and this class is the one place that lists them:

    required    NAME, Config (dataclass; a docstring and a valid range under each field), DEFAULT_LR,
                apply(task_model, config)
    training    default_lr(config)                 the learning rate when the user gives none
                pooling_for(requested, arch)       the pooling the method needs
                param_groups(task_model, config, lr, weight_decay)     AdamW groups (LoRA+: B at a larger lr)
                make_optimizer(task_model, config, groups, lr, name)   an optimizer of the method's own over
                                                   those groups (GaLore's projected Adam, BAdam's block
                                                   switching), or None: --optimizer NAME as given
                extra_loss(task_model, config)     a regulariser added to the loss, or None (AdaLoRA)
                on_train_step(task_model, config, step, total_steps)   after each optimizer step
                RESTORE_BEST_EPOCH                 False: keep the end state (a schedule made earlier
                                                   states invalid)
                checkpoint_state / load_checkpoint_state   method state beyond its tensors (a budget,
                                                   EMAs) saved in and restored from a training checkpoint
                fit(task_model, config, train, validation)  non-gradient training (features), else None
    saving      delta_state(task_model, config)    what to save; default: the trainable tensors
                load_delta_state(task_model, config, tensors)   default: checked load by name and shape
                PEFT_TYPE, to_peft, from_peft      peft export / import, or None
                reads_peft(adapter_config)         True for the peft adapters from_peft reads; default: those
                                                   whose peft_type is PEFT_TYPE (LoRA and DoRA share "LORA"
                                                   and tell by use_dora)
                merge(task_model, config)          fold the delta into the backbone's own weights in place and
                                                   take the method's modules out, leaving the plain transformers
                                                   model (`export --format merged`), or None: cannot be merged
    estimate    estimate_site(config, k, d)        a `SiteEstimate`: what the method adds to one adapted (k → d)
                                                   matrix in a training step (`deltatune estimate`), or None: the
                                                   estimator models the method itself (estimate/__init__.py)
    no tuning   run_job(job, config, out), make_strategy(config, context)   icl / knn, or None
    serving     ROW_INPUT                          None, "soft_tokens" or "prefix": the per-row input
                                                   the serve engine builds for this method's rows
                ROW_HOOKS, ROW_TOP_MODULES         the task-model attributes (hook objects, prompt
                                                   encoder) that ROW_INPUT explains
                (per-row layer math lives on the site classes: `RowSite` in methods/rows.py)

Deltas are saved as the trainable tensors under their parameter names, so `apply` + loading those
tensors reproduces the trained model exactly.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from deltatune.backbone import ArchSpec, TaskModel
from deltatune.errors import UserError
from deltatune.options import describe, validate


def decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices, none on biases, norms and vectors."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def load_checked(task_model: TaskModel, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    """The default `load_delta_state`: every trainable tensor present, names and shapes as the model's."""
    own = task_model.module.state_dict()
    for name, tensor in tensors.items():
        if name not in own:
            raise UserError(f"delta tensor '{name}' does not exist in the model this method builds")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f"delta tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(own[name].shape)}")
    missing = set(trainable_state(task_model.module)) - set(tensors)
    if missing:
        raise UserError(f"delta is missing {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    task_model.module.load_state_dict(tensors, strict=False)


@dataclass(frozen=True)
class SiteEstimate:
    """One adapted matrix W0 (d × k) of a side-update method (h = W0 x + update(x)) in a training step, in
    elements, as the memory estimator counts it; the update runs as x → z (T × rank) → (T × d), keeping x
    and z for backward, as LoRA does."""

    params: float
    """Trainable elements."""
    largest: float
    """Elements of the largest trainable tensor (AdamW's CPU temporaries are sized by it)."""
    rank: float
    """Width of the intermediate z = A x kept for B's gradient (per token)."""
    per_token: float = 0.0
    """Further elements kept per token (DoRA: the d-wide W0 x + s·BAx that the magnitude's gradient needs)."""
    formed: tuple[float, float] = (0.0, 0.0)
    """Elements of factors formed from the parameters each step and kept for backward: (the A-side one, kept
    only when x needs a gradient; the B-side one) (VeRA: Λ_d A, Λ_b B; LoHa: the Khatri-Rao products)."""


def _no_op(*args: Any) -> None:
    return None


def _no_state(task_model: TaskModel, config: Any) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class Method:
    """A method module with every hook filled in (see the module docstring for what each one does)."""

    module: ModuleType
    NAME: str
    Config: type
    DEFAULT_LR: float
    apply: Callable[[TaskModel, Any], None]
    default_lr: Callable[[Any], float]
    pooling_for: Callable[[str, ArchSpec], str]
    param_groups: Callable[[TaskModel, Any, float, float], list[dict[str, Any]]]
    extra_loss: Callable[[TaskModel, Any], torch.Tensor | None]
    on_train_step: Callable[[TaskModel, Any, int, int], None]
    RESTORE_BEST_EPOCH: bool
    checkpoint_state: Callable[[TaskModel, Any], dict[str, torch.Tensor]]
    load_checkpoint_state: Callable[[TaskModel, Any, dict[str, torch.Tensor]], None]
    delta_state: Callable[[TaskModel, Any], dict[str, torch.Tensor]]
    load_delta_state: Callable[[TaskModel, Any, dict[str, torch.Tensor]], None]
    fit: Callable[..., dict[str, float]] | None = None
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = None
    PEFT_TYPE: str | None = None
    to_peft: Callable[[Any, dict], tuple[dict, dict]] | None = None
    from_peft: Callable[[dict, dict], tuple[Any, dict]] | None = None
    reads_peft: Callable[[dict], bool] = lambda adapter_config: False  # `of` fills it from PEFT_TYPE
    run_job: Callable[..., dict] | None = None
    make_strategy: Callable[..., Any] | None = None
    merge: Callable[[TaskModel, Any], None] | None = None
    estimate_site: Callable[[Any, int, int], SiteEstimate] | None = None
    ROW_INPUT: str | None = None
    ROW_HOOKS: tuple[str, ...] = ()
    ROW_TOP_MODULES: tuple[str, ...] = ()

    REQUIRED: typing.ClassVar[tuple[str, ...]] = ("NAME", "Config", "DEFAULT_LR", "apply")

    @classmethod
    def of(cls, module: ModuleType) -> Method:
        """The contract of a method module: its own hooks, the defaults for the rest."""
        found = vars(module)
        missing = [name for name in cls.REQUIRED if name not in found]
        if missing:
            raise TypeError(f"method module {module.__name__} lacks {', '.join(missing)}")
        lr = found["DEFAULT_LR"]
        peft_type = found.get("PEFT_TYPE") if found.get("from_peft") is not None else None
        defaults: dict[str, Any] = {
            "default_lr": lambda config: lr,
            "pooling_for": lambda requested, arch: requested,
            "param_groups": lambda task_model, config, lr, wd: decay_groups(task_model.module, lr, wd),
            "extra_loss": _no_op,
            "on_train_step": _no_op,
            "RESTORE_BEST_EPOCH": True,
            "checkpoint_state": _no_state,
            "load_checkpoint_state": _no_op,
            "delta_state": lambda task_model, config: trainable_state(task_model.module),
            "load_delta_state": load_checked,
            "reads_peft": lambda adapter_config: peft_type is not None
            and adapter_config.get("peft_type") == peft_type,
        }
        hooks = {f.name for f in dataclasses.fields(cls)} - {"module"}
        values = {name: found[name] if name in found else defaults.get(name, cls.__dataclass_fields__[name].default)
                  for name in hooks}
        return cls(module=module, **values)

    @property
    def trains_by_gradient(self) -> bool:
        """False for methods that fit without gradients (features) or run their own job (icl, knn)."""
        return self.fit is None and self.run_job is None

    @property
    def runs_own_job(self) -> bool:
        """icl / knn: a prompt or an index, built and saved by the method's own pipeline."""
        return self.run_job is not None

    def __getattr__(self, name: str) -> Any:
        """Constants of the method file beyond the contract (ADAPTER, PEFT prefixes) stay reachable."""
        if not name.isupper():  # hooks are fields: a lowercase name not found here is not a hook
            raise AttributeError(f"method {self.NAME!r} has no attribute {name!r}")
        return getattr(self.module, name)


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
    """(trainable, total) parameter counts; shared tensors are counted once, a quantised weight as the
    (out, in) weight it stores (its packed tensor holds two or more codes per element)."""
    from deltatune import storage

    logical = {id(m.weight): math.prod(storage.storage_of(m).shape) for m in module.modules() if storage.is_quantized(m)}
    seen: set[int] = set()
    trainable = total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical.get(id(p), p.numel())
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
    if type(module).__name__ == "Conv1D":  # nx, nf: its weight may be stored packed (--quantize)
        return module.nx, module.nf
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

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) view (GPT-2's Conv1D stores (in, out)): in-place edits merge."""
        weight = self.base_layer.weight.data
        return weight if isinstance(self.base_layer, nn.Linear) else weight.t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


def unwrap_layers(task_model: TaskModel, layer_type: type, fold: Callable[[AdaptedLayer], None]) -> None:
    """`merge`'s common part: `fold` each `layer_type` layer's delta into its base layer, then put the base
    layer back in its place."""
    module = task_model.module
    for name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, layer_type)]:
        with torch.no_grad():
            fold(layer)
        replace_module(module, name, layer.base_layer)


def already_merged(task_model: TaskModel, config: Any) -> None:
    """`merge` of a method that trains the backbone's own tensors (full, BitFit, head): nothing to fold."""


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
            listed = ", ".join(f"{name} {describe(f)}".strip() for name, f in fields.items())
            raise UserError(f"unknown option '{key}' for this method: options are {listed}")
        values[key] = _coerce(raw, hints[key], key)
    config = config_cls(**values)
    validate(config)  # every field within its declared range (deltatune/options.py)
    return config


def _coerce(raw: Any, hint: Any, key: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (list, tuple) or (args and typing.get_origin(args[0]) in (list, tuple)):
        item = (typing.get_args(hint if origin in (list, tuple) else args[0]) or (str,))[0]  # `layers=0,1`: ints
        return tuple(_coerce(s.strip(), item, key) for s in raw.split(",") if s.strip())
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
