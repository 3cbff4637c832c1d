"""Bottleneck adapters: serial (Houlsby et al. 2019, arXiv:1902.00751; FFN-only as Pfeiffer et al.
2021, arXiv:2005.00247) and parallel with a scale (He et al. 2022, arXiv:2110.04366).

    serial: after a sublayer, before its residual       parallel: beside a sublayer, fed its input

        y = Sublayer(x)                                      x ───────────────┐
        ├───────────────┐                                    │                │
        │     Down (d→m) ─ f ─ Up (m→d)                   Sublayer     Down (d→m) ─ f ─ Up (m→d)
        └──── + ◄───────┘                                    └───── + ◄─ s · ─┘
              │                                                     │
        y + s·Up f(Down y)  ──> residual add            Sublayer(x) + s·Up f(Down x)  ──> residual add

Up is zero-initialised, so an adapter is the identity at initialisation. Where the adapters go comes
from the ArchSpec: serial ones follow `attn_end` / `ffn_end` (BERT: dense -> dropout -> adapter ->
LayerNorm(x + residual); Llama / GPT-2: the attention / MLP output, before the residual add).
Parallel ones wrap `attention` / `ffn`, which receive the sublayer input; in post-norm layers they
wrap `attn_residual` / `ffn_residual`, called as (output, x), and add s·a(x) to the residual input,
which is the same: LayerNorm(out + (x + s·a(x))) = LayerNorm((out + s·a(x)) + x).

Adapters are kept by name in ModuleDicts (`adapter_down["default"]`) beside the frozen sublayer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import layer_selection, replace_module, train_head
from deltatune.methods.rows import Rows
from deltatune.options import option

NAME = "adapter"
DEFAULT_LR = 1e-3
ADAPTER = "default"
PLACEMENTS = {"attn_ffn": ("attn", "ffn"), "ffn": ("ffn",)}
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
PARALLEL_SCALE = 4.0


@dataclass
class Config:
    placement: str = option("attn_ffn", choices=tuple(PLACEMENTS))
    """'attn_ffn' (Houlsby: after attention and after the FFN) or 'ffn' (Pfeiffer: after the FFN only)."""
    bottleneck: int | None = option(None, ge=1)
    """Adapter hidden size m; when unset, hidden_size // reduction_factor."""
    reduction_factor: int = option(16, ge=1)
    """hidden_size / m when `bottleneck` is unset."""
    parallel: bool = False
    """Parallel adapters (He et al.): fed the sublayer input, added to the sublayer output."""
    scale: float | None = option(None, gt=0)
    """Multiplier s of the adapter output; unset: 1 for serial, 4 for parallel (He et al.)."""
    activation: str = option("relu", choices=tuple(ACTIVATIONS))
    """Nonlinearity f: relu, gelu, silu (swish) or tanh."""
    train_layernorm: bool = False
    """Also train the backbone's LayerNorm parameters (Houlsby et al. do)."""
    layers: tuple[int, ...] | None = option(None, ge=0)
    """Put adapters only in these transformer layers (indices from 0); None: every layer."""


def bottleneck_update(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
                      up_weight: torch.Tensor, up_bias: torch.Tensor,
                      activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Up(f(Down x)), the whole adapter.

    One adapter: weights (m, d) / (d, m), biases (m,) / (d,). One adapter per row of a batch (a
    server routing tasks): weights (B, m, d) / (B, d, m), biases (B, 1, m) / (B, 1, d).
    """
    # x: (B, T, d)
    hidden = activation(x @ down_weight.transpose(-1, -2) + down_bias)  # (B, T, m)
    return hidden @ up_weight.transpose(-1, -2) + up_bias  # (B, T, d)


class AdapterLayer(nn.Module):
    """A frozen sublayer (or its last module) with named bottleneck adapters beside it.

    mode 'serial':   out = base(...);        returns out + s·a(out)
    mode 'parallel': x = the first input;    returns base(x, ...) + s·a(x)  (first element of a tuple)
    mode 'residual': base(out, x) adds the residual x itself (post-norm); it is given x + s·a(x)
    """

    def __init__(self, base_layer: nn.Module, mode: str, dim: int, bottleneck: int, scale: float,
                 activation: str, device: torch.device, name: str = ADAPTER):
        super().__init__()
        self.base_layer = base_layer
        self.mode = mode
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.active_adapter: str | None = name
        self.add_adapter(name, dim, bottleneck, scale, activation, device)

    def add_adapter(self, name: str, dim: int, bottleneck: int, scale: float, activation: str,
                    device: torch.device) -> None:
        down = nn.Linear(dim, bottleneck, device=device)  # default (Kaiming-uniform) init
        up = nn.Linear(bottleneck, dim, device=device)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # Up = 0 so the adapter adds nothing at initialisation
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.scaling[name] = scale
        self.activation[name] = activation

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s·Up(f(Down x)) of the active adapter, in x's dtype."""
        name = self.active_adapter
        down, up = self.adapter_down[name], self.adapter_up[name]
        update = bottleneck_update(x.to(down.weight.dtype), down.weight, down.bias, up.weight, up.bias,
                                   ACTIVATIONS[self.activation[name]])
        return (update * self.scaling[name]).to(x.dtype)

    def forward(self, *args, **kwargs):
        if self.active_adapter is None:
            return self.base_layer(*args, **kwargs)
        return wire(self.mode, self.base_layer, lambda y, x: y + self.update(x), *args, **kwargs)

    # ---- per row (RowSite): a batch whose rows carry different tasks' adapters, or none ---------------

    ROW_FILL = (0.0,) * 5
    """Zero weights add nothing: f(0) = 0 for every activation, and Up = 0."""

    def row_key(self) -> str:
        return f"adapter:{self.mode}:{self.activation[self.active_adapter]}"

    def row_payload(self) -> tuple[torch.Tensor, ...]:
        name = self.active_adapter
        down, up = self.adapter_down[name], self.adapter_up[name]
        return (down.weight.detach(), down.bias.detach(), up.weight.detach(), up.bias.detach(),
                down.weight.new_tensor(self.scaling[name]))  # (m, d), (m,), (d, m), (d,), ()

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, *args, **kwargs):
        """The sublayer wired as `mode` says, each row with its own adapter (zero-padded bottlenecks)."""
        _, mode, activation = key.split(":")
        down_w, down_b, up_w, up_b, scale = rows.tensors  # one adapter, or per hit row (H, m, d), (H, m), ...

        def plus(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # y + s_b·Up_b f(Down_b x) on the hit rows
            update = bottleneck_update(rows.take(x).to(down_w.dtype), down_w, down_b.unsqueeze(-2), up_w,
                                       up_b.unsqueeze(-2), ACTIVATIONS[activation])  # (H, T, d)
            return rows.add(y, (update * scale.view(-1, 1, 1)).to(y.dtype))

        return wire(mode, inner, plus, *args, **kwargs)


def wire(mode: str, base: nn.Module, plus: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *args, **kwargs):
    """Call the sublayer `base` with the adapter wired in as `mode` says; plus(y, x) = y + s·a(x)."""
    if mode == "serial":
        out = base(*args, **kwargs)  # (B, T, d)
        return plus(out, out)
    if mode == "residual":  # BertSelfOutput / BertOutput: (hidden_states, input_tensor)
        out, x = [*args, *(kwargs.pop(k) for k in ("hidden_states", "input_tensor") if k in kwargs)]
        return base(out, plus(x, x), **kwargs)
    x = args[0] if args else kwargs["hidden_states"]  # (B, T, d): the sublayer input
    out = base(*args, **kwargs)
    if isinstance(out, tuple):  # attention blocks return (output, weights)
        return (plus(out[0], x), *out[1:])
    return plus(out, x)

def adapter_places(task_model: TaskModel, config: Config) -> list[tuple[str, str]]:
    """(full module name, mode) of every module that gets an adapter, layer by layer."""
    arch = task_model.arch
    if config.placement not in PLACEMENTS:
        raise UserError(f"adapter: unknown placement '{config.placement}': choose {' or '.join(PLACEMENTS)}")
    layers_name = next(n for n, m in task_model.module.named_modules() if m is task_model.layers())
    places: list[tuple[str, str]] = []
    for sublayer in PLACEMENTS[config.placement]:
        end, residual, block = ((arch.attn_end, arch.attn_residual, arch.attention) if sublayer == "attn"
                                else (arch.ffn_end, arch.ffn_residual, arch.ffn))
        if not config.parallel:
            rel, mode = end, "serial"
        else:
            rel, mode = (residual, "residual") if residual else (block, "parallel")
        if rel is None:
            raise UserError(f"adapter: the {arch.family} architecture does not say where adapters go")
        chosen = layer_selection(task_model, config.layers)
        places += [(f"{layers_name}.{i}.{rel}", mode) for i in range(len(task_model.layers()))
                   if chosen is None or i in chosen]
    return places


def apply(task_model: TaskModel, config: Config) -> None:
    if config.activation not in ACTIVATIONS:
        raise UserError(f"adapter: unknown activation '{config.activation}': choose {', '.join(ACTIVATIONS)}")
    hidden = task_model.module.config.hidden_size
    size = config.bottleneck or hidden // max(1, config.reduction_factor)
    if size < 1:
        raise UserError(f"adapter: bottleneck size must be at least 1 (hidden size {hidden})")
    scale = config.scale if config.scale is not None else (PARALLEL_SCALE if config.parallel else 1.0)
    module, device = task_model.module, task_model.device()
    for name, mode in adapter_places(task_model, config):
        layer = AdapterLayer(module.get_submodule(name), mode, hidden, size, scale, config.activation, device)
        replace_module(module, name, layer)
        layer.adapter_down.requires_grad_(True)
        layer.adapter_up.requires_grad_(True)
    if config.train_layernorm:
        for sub in task_model.backbone.modules():
            if "norm" in type(sub).__name__.lower():
                sub.requires_grad_(True)
    train_head(task_model)
