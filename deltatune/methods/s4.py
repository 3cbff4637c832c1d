"""S4: a design from the PEFT design spaces of Chen et al. (ICLR 2023, "Parameter-Efficient Fine-Tuning
Design Spaces", arXiv:2301.01821), composed from `adapter`, `prefix`, `bitfit` and `lora`.

    layers 0 .. L-1 ──grouping──> G1 | G2 | G3 | G4          (bottom to top, consecutive layers)
    every group: tuned or frozen, and a subset of {A adapter, P prefix, B BitFit, L LoRA}
    sizes per layer ──allocation──> adapter bottleneck m_g, LoRA rank r_g scaled by a_g

    grouping (layers per group)      increasing 1:2:3:4   uniform 1:1:1:1   decreasing 4:3:2:1
                                     spindle 1:2:2:1      bottleneck 2:1:1:2
    allocation (parameters per layer) increasing 1:2:3:4   uniform 1:1:1:1   decreasing 4:3:2:1

    default = the paper's final S4 design: spindle, uniform, all groups tuned,
              G1: A+L   G2: A+P   G3: A+P+B   G4: P+B+L

Nothing is re-implemented: each group calls the methods' own `apply` restricted to its layers (their
`layers` option). With a budget (a fraction of the backbone's parameters, the head not counted), one
scale t multiplies every base size, m_g = max(1, round(t · m · a_g)), and the largest t that fits is
found by bisection. Prefix tuning has one length for all its layers (one attention mask serves every
layer), scaled by t but not by a_g; BitFit's size is fixed. The delta is every trained tensor (the
prefix trains directly, without Li & Liang's MLP), so it saves, loads and serves like any delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods import adapter, bitfit, lora, prefix
from deltatune.methods.base import (
    count_parameters,
    layer_of,
    linear_dims,
    resolve_targets,
    train_head,
)
from deltatune.methods.prefix import kv_shape
from deltatune.options import option

NAME = "s4"
DEFAULT_LR = 2e-3
GROUPS = 4
GROUPINGS = {"increasing": (1, 2, 3, 4), "uniform": (1, 1, 1, 1), "decreasing": (4, 3, 2, 1),
             "spindle": (1, 2, 2, 1), "bottleneck": (2, 1, 1, 2)}
ALLOCATIONS = {"increasing": (1, 2, 3, 4), "uniform": (1, 1, 1, 1), "decreasing": (4, 3, 2, 1)}
STRATEGIES = {"A": "adapter", "P": "prefix", "B": "bitfit", "L": "lora"}
FROZEN = "none"
PAPER_GROUPS = ("adapter+lora", "adapter+prefix", "adapter+prefix+bitfit", "prefix+bitfit+lora")


@dataclass
class Config:
    grouping: str = option("spindle", choices=tuple(GROUPINGS))
    """How many layers each group G1..G4 gets: increasing, uniform, decreasing, spindle or bottleneck."""
    allocation: str = option("uniform", choices=tuple(ALLOCATIONS))
    """Adapter/LoRA sizes per layer across groups: increasing, uniform or decreasing."""
    groups: tuple[str, ...] = PAPER_GROUPS
    """G1..G4 (bottom to top): methods joined by '+' (adapter, prefix, bitfit, lora, or A/P/B/L), or 'none'."""
    budget: float | None = option(None, gt=0, le=1)
    """Trainable parameters (the head aside) as a fraction of the backbone's, e.g. 0.005; None: base sizes."""
    adapter_bottleneck: int = option(16, ge=1)
    """Base adapter bottleneck m (serial Houlsby adapters after attention and FFN)."""
    lora_rank: int = option(8, ge=1)
    """Base LoRA rank r (alpha = 2r: the update scale stays 2 at every size)."""
    prefix_tokens: int = option(10, ge=1)
    """Base prefix length n (the same in every group that uses prefix)."""
    lora_targets: tuple[str, ...] = ("query", "value")
    """Roles LoRA adapts in its groups."""


@dataclass
class Plan:
    """What a Config means on one model: layers and sizes per group, and the parameters they add."""

    layers: list[list[int]]
    """Layer indices of G1..G4."""
    methods: list[tuple[str, ...]]
    """Methods of each group (empty: frozen)."""
    adapter: list[int] = field(default_factory=list)
    """Adapter bottleneck per group."""
    lora: list[int] = field(default_factory=list)
    """LoRA rank per group."""
    prefix_tokens: int = 0
    params: int = 0
    """Trainable parameters the plan adds, the head aside."""
    budget_params: int | None = None

    def describe(self) -> str:
        parts = []
        for g, (layers, methods) in enumerate(zip(self.layers, self.methods, strict=True)):
            sizes = [f"m={self.adapter[g]}" if "adapter" in methods else "", f"r={self.lora[g]}" if "lora" in methods
                     else "", f"n={self.prefix_tokens}" if "prefix" in methods else ""]
            what = "+".join(m[0].upper() for m in methods) or "frozen"
            detail = ",".join(s for s in sizes if s)
            span = f"{layers[0]}-{layers[-1]}" if layers else "-"
            parts.append(f"G{g + 1}[{span}] {what}" + (f"({detail})" if detail else ""))
        return "  ".join(parts)


def group_sizes(layers: int, grouping: str) -> list[int]:
    """Layers per group: the pattern's proportions by largest remainder; no group is empty when L >= 4."""
    if grouping not in GROUPINGS:
        raise UserError(f"s4: unknown grouping '{grouping}': choose {', '.join(GROUPINGS)}")
    weights = GROUPINGS[grouping]
    shares = [layers * w / sum(weights) for w in weights]
    sizes = [math.floor(s) for s in shares]
    by_remainder = sorted(range(GROUPS), key=lambda g: (sizes[g] - shares[g], -weights[g], g))  # ties: heavier
    for g in by_remainder[:layers - sum(sizes)]:
        sizes[g] += 1
    while layers >= GROUPS and min(sizes) == 0:  # small models: the largest (then lightest) group gives one
        donor = max(range(GROUPS), key=lambda g: (sizes[g], -weights[g], -g))
        sizes[donor] -= 1
        sizes[sizes.index(0)] += 1
    return sizes


def group_layers(layers: int, grouping: str) -> list[list[int]]:
    """Consecutive layer indices of G1..G4."""
    out, start = [], 0
    for size in group_sizes(layers, grouping):
        out.append(list(range(start, start + size)))
        start += size
    return out


def allocation_weights(allocation: str, layers: list[list[int]]) -> list[float]:
    """a_g per group, normalised so that the mean over the model's layers is 1."""
    if allocation not in ALLOCATIONS:
        raise UserError(f"s4: unknown allocation '{allocation}': choose {', '.join(ALLOCATIONS)}")
    weights = ALLOCATIONS[allocation]
    mean = sum(w * len(group) for w, group in zip(weights, layers, strict=True)) / max(1, sum(map(len, layers)))
    return [w / mean for w in weights]


def parse_groups(groups: tuple[str, ...] | list[str]) -> list[tuple[str, ...]]:
    """['adapter+lora', 'A+P', 'none', ...] -> [('adapter', 'lora'), ('adapter', 'prefix'), (), ...]."""
    if len(groups) != GROUPS:
        raise UserError(f"s4: groups needs {GROUPS} entries (G1..G4, 'none' for a frozen group), got {len(groups)}")
    parsed = []
    for entry in groups:
        names = [] if entry.strip().lower() in (FROZEN, "") else entry.split("+")
        methods = set()
        for name in (n.strip() for n in names):
            method = STRATEGIES.get(name.upper(), name.lower())
            if method not in STRATEGIES.values():
                raise UserError(f"s4: unknown strategy '{name}' in '{entry}': use adapter, prefix, bitfit, lora "
                                "(or A, P, B, L) joined by '+', or 'none'")
            methods.add(method)
        parsed.append(tuple(m for m in STRATEGIES.values() if m in methods))
    if not any(parsed):
        raise UserError("s4: every group is frozen: nothing would train")
    return parsed


def _layer_costs(task_model: TaskModel, config: Config) -> dict[str, list[int]]:
    """Per layer: parameters per unit of size (adapter: per m, plus a constant; LoRA: per r) and BitFit."""
    hidden = task_model.module.config.hidden_size
    count = len(task_model.layers())
    lora_per_rank = [0] * count
    for name in resolve_targets(task_model, config.lora_targets):
        index = layer_of(task_model, name)
        if index is not None:
            lora_per_rank[index] += sum(linear_dims(task_model.module.get_submodule(name)))
    bias = [0] * count
    for name in bitfit.bias_names(task_model):
        index = layer_of(task_model, name, task_model.backbone)
        if index is not None:
            bias[index] += task_model.backbone.get_parameter(name).numel()
    return {"adapter_per_m": [2 * (2 * hidden + 1)] * count, "adapter_fixed": [2 * hidden] * count,
            "lora_per_r": lora_per_rank, "bitfit": bias}


def _count(plan: Plan, costs: dict[str, list[int]], prefix_per_token: int) -> int:
    total = 0
    for g, (layers, methods) in enumerate(zip(plan.layers, plan.methods, strict=True)):
        for i in layers:
            if "adapter" in methods:
                total += costs["adapter_per_m"][i] * plan.adapter[g] + costs["adapter_fixed"][i]
            if "lora" in methods:
                total += costs["lora_per_r"][i] * plan.lora[g]
            if "bitfit" in methods:
                total += costs["bitfit"][i]
            if "prefix" in methods:
                total += prefix_per_token * plan.prefix_tokens
    return total


def plan_for(task_model: TaskModel, config: Config) -> Plan:
    """Layers and sizes per group; with a budget, the largest scale t whose plan fits it."""
    layers = group_layers(len(task_model.layers()), config.grouping)
    methods = parse_groups(config.groups)
    weights = allocation_weights(config.allocation, layers)
    if "bitfit" in {m for ms in methods for m in ms} and not bitfit.bias_names(task_model):
        raise UserError(f"s4: the {task_model.arch.family} backbone has no biases for BitFit: drop B from the groups")
    costs = _layer_costs(task_model, config)
    prefix_per_token = 2 * kv_shape(task_model.backbone.config).kv_dim

    def scaled(t: float) -> Plan:
        return Plan(layers, methods, adapter=[max(1, round(t * config.adapter_bottleneck * a)) for a in weights],
                    lora=[max(1, round(t * config.lora_rank * a)) for a in weights],
                    prefix_tokens=max(1, round(t * config.prefix_tokens)))

    if config.budget is None:
        plan = scaled(1.0)
        plan.params = _count(plan, costs, prefix_per_token)
        return plan
    backbone_params = count_parameters(task_model.backbone)[1]
    limit = int(config.budget * backbone_params)
    low, high = 0.0, 1.0
    if _count(scaled(low), costs, prefix_per_token) > limit:
        raise UserError(f"s4: budget {100 * config.budget:.3g}% ({limit:,} parameters) is below this design's "
                        f"smallest size ({_count(scaled(low), costs, prefix_per_token):,})")
    while _count(scaled(high), costs, prefix_per_token) <= limit and high < 1e6:
        high *= 2
    for _ in range(40):  # bisection on t: the count only grows with t
        middle = (low + high) / 2
        low, high = (middle, high) if _count(scaled(middle), costs, prefix_per_token) <= limit else (low, middle)
    plan = scaled(low)
    plan.params, plan.budget_params = _count(plan, costs, prefix_per_token), limit
    return plan


def apply(task_model: TaskModel, config: Config) -> None:
    plan = plan_for(task_model, config)
    uses = {m: sorted(i for g, layers in enumerate(plan.layers) if m in plan.methods[g] for i in layers)
            for m in STRATEGIES.values()}
    if plan.params == 0:
        raise UserError(f"s4: on this {len(task_model.layers())}-layer model the design tunes no layer")
    if uses["prefix"]:  # first: its start is the frozen model's keys/values of real words
        prefix.apply(task_model, prefix.Config(num_virtual_tokens=plan.prefix_tokens, projection=False,
                                               layers=tuple(uses["prefix"])))
    if uses["bitfit"]:  # before LoRA and adapters wrap the layers that own the biases
        bitfit.apply(task_model, bitfit.Config(layers=tuple(uses["bitfit"])))
    for g, layers in enumerate(plan.layers):
        if "lora" in plan.methods[g] and layers:
            lora.apply(task_model, lora.Config(r=plan.lora[g], alpha=2.0 * plan.lora[g],
                                               target_modules=tuple(config.lora_targets), layers=tuple(layers)))
        if "adapter" in plan.methods[g] and layers:
            adapter.apply(task_model, adapter.Config(bottleneck=plan.adapter[g], layers=tuple(layers)))
    train_head(task_model)
