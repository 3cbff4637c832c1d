"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
arXiv:2205.05638). Learned vectors rescale the keys, the values and the FFN's inner activations:

    k' = l_k ⊙ W_k x        v' = l_v ⊙ W_v x        FFN(x) = W_2 (l_ff ⊙ γ(W_1 x))

      x ──> W_k ──> ⊙ l_k ──┐
      x ──> W_v ──> ⊙ l_v ──┴──> attention          x ──> γ(W_1 x) ──> ⊙ l_ff ──> W_2 (down projection)

Every vector starts at ones, so the model is unchanged at initialisation. The layout is peft's: a
key/value vector scales its projection's output and is stored as (out, 1); the FFN vector scales the
input of the down projection (`feedforward_modules`) and is stored as (1, in); both live in
`<module>.ia3_l["default"]` beside the frozen `base_layer`, so peft export / import is a rename.
GQA needs nothing special (k/v projections have num_kv_heads * head_dim outputs). GPT-2's fused
c_attn: only the k and v thirds of its output are scaled (a (2d, 1) vector); the peft export pads the
q third with ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import ARCHITECTURES, TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import (
    ROLE_NAMES,
    AdaptedLayer,
    linear_dims,
    replace_module,
    resolve_targets,
    train_head,
    unwrap_layers,
)
from deltatune.methods.rows import Rows

NAME = "ia3"
DEFAULT_LR = 1e-2  # vectors around 1 take large steps (rotten-tomatoes, 1k, 2 epochs: 0.742 vs 0.704 at 3e-3)
ADAPTER = "default"
PEFT_TYPE = "IA3"
QKV = ("query", "key", "value")
FUSED_QKV = tuple(sorted({spec.qkv for spec in ARCHITECTURES.values() if spec.qkv}))
PEFT_PREFIX = "base_model.model."


@dataclass
class Config:
    target_modules: tuple[str, ...] = ("key", "value", "ffn_out")
    """Roles (query, key, value, attn_out, ffn_in, ffn_out) or module-name suffixes that get a vector."""
    feedforward_modules: tuple[str, ...] = ("ffn_out",)
    """Of the targets, those whose input is scaled (l_ff ⊙ γ(W_1 x) before W_2); the others scale outputs."""


def rescale(h: torch.Tensor, vector: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """h with its features [start, stop) multiplied by vector: (n,), or one per row (B, 1, n)
    (the training forward and the per-row forward both scale through here)."""
    # h: (B, T, F), vector: (stop - start,)
    scaled = (h[..., start:stop].to(vector.dtype) * vector).to(h.dtype)
    if start == 0 and stop == h.shape[-1]:
        return scaled
    return torch.cat([h[..., :start], scaled, h[..., stop:]], dim=-1)  # (B, T, F)


class IA3Linear(AdaptedLayer):
    """A frozen linear (or Conv1D) layer whose output features [start, stop), or whose input, are rescaled."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, span: tuple[int, int] | None = None,
                 name: str = ADAPTER):
        super().__init__(base_layer, name)
        self.is_feedforward = feedforward
        self.span = span or (0, self.out_features)
        """The output features that are scaled (a fused q/k/v projection: the k and v thirds)."""
        self.ia3_l = nn.ParameterDict()
        self.add_adapter(name)

    def add_adapter(self, name: str) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.span[1] - self.span[0], 1)
        # ones: the layer is unchanged at initialisation
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=self.base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        name = self.active_adapter
        if name is None:
            return self.base_layer(x)
        vector = self.ia3_l[name].flatten()
        if self.is_feedforward:
            return self.base_layer(rescale(x, vector, 0, self.in_features))
        return rescale(self.base_layer(x), vector, *self.span)

    # ---- per row (RowSite): a batch whose rows carry different tasks' vectors, or none -----------------

    ROW_FILL = (1.0,)
    """Ones: a row without IA3 here is not rescaled."""

    def row_key(self) -> str:
        return "ia3:in" if self.is_feedforward else "ia3:out"

    def row_payload(self) -> tuple[torch.Tensor]:
        vector = self.ia3_l[self.active_adapter].detach().flatten()
        if self.is_feedforward:
            return (vector,)  # (in,)
        full = vector.new_ones(self.out_features)  # (out,): ones outside the scaled span
        full[self.span[0]:self.span[1]] = vector
        return (full,)

    @staticmethod
    def row_forward(key: str, inner: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        """inner(l_b ⊙ x) ('ia3:in') or l_b ⊙ inner(x) ('ia3:out'). Every row is multiplied, by ones where
        its task has no IA3 here: one multiply costs less than gathering and scattering the hit rows."""

        def scaled(h: torch.Tensor) -> torch.Tensor:  # h: (B, T, n)
            vector = rows.per_row(0, 1.0, h.shape[0])  # (n,) one task's, or (B, n)
            return rescale(h, vector.unsqueeze(-2), 0, h.shape[-1])

        return inner(scaled(x)) if key == "ia3:in" else scaled(inner(x))


def fused_thirds(config: Config, module_name: str) -> list[int] | None:
    """For a fused q/k/v projection, which thirds of its output are scaled (q=0, k=1, v=2); else None.

    The thirds of the q/k/v roles among the targets; all three when the module is named directly.
    """
    if not any(module_name.endswith("." + path) for path in FUSED_QKV):
        return None
    named = any(t not in ROLE_NAMES and (module_name == t or module_name.endswith("." + t))
                for t in config.target_modules)
    thirds = [0, 1, 2] if named else [i for i, role in enumerate(QKV) if role in config.target_modules]
    if not thirds or thirds != list(range(thirds[0], thirds[-1] + 1)):
        raise UserError(f"ia3: the scaled parts of the fused projection {module_name} must be adjacent "
                        "(query,key / key,value / all three)")
    return thirds


def apply(task_model: TaskModel, config: Config) -> None:
    module = task_model.module
    targets = resolve_targets(task_model, config.target_modules)
    feedforward = set(resolve_targets(task_model, config.feedforward_modules))
    if not feedforward <= set(targets):
        raise UserError("ia3: feedforward_modules must be among target_modules")
    for name in targets:
        base = module.get_submodule(name)
        span = None
        thirds = None if name in feedforward else fused_thirds(config, name)
        if thirds is not None:
            third = linear_dims(base)[1] // 3
            span = (thirds[0] * third, (thirds[-1] + 1) * third)
        layer = IA3Linear(base, feedforward=name in feedforward, span=span)
        replace_module(module, name, layer)
        layer.ia3_l.requires_grad_(True)
    train_head(task_model)


def merge(task_model: TaskModel, config: Config) -> None:
    """W0 ← W0 diag(l) for a scaled input; rows [start, stop) of W0 and b0 times l for a scaled output."""

    def fold(layer: IA3Linear) -> None:
        vector, w = layer.ia3_l[ADAPTER].flatten(), layer.weight_out_in()  # (n,), (out, in)
        if layer.is_feedforward:
            w.mul_(vector.to(w.dtype))  # every column j times l_j
            return
        start, stop = layer.span
        w[start:stop].mul_(vector.to(w.dtype)[:, None])
        if layer.bias is not None:
            layer.bias.data[start:stop].mul_(vector.to(layer.bias.dtype))

    unwrap_layers(task_model, IA3Linear, fold)


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors): `X.ia3_l.default` -> `X.ia3_l`; fused q/k/v padded with ones."""
    suffix = f".ia3_l.{ADAPTER}"
    targets, feedforward, out = [], [], {}
    for key, vector in tensors.items():
        if not key.endswith(suffix):  # the task head
            out[key] = vector
            continue
        name = key[: -len(suffix)]
        targets.append(name)
        if _is_feedforward(vector):
            feedforward.append(name)
        elif (thirds := fused_thirds(config, name)) is not None and len(thirds) < 3:
            ones = vector.new_ones(vector.shape[0] // len(thirds), 1)  # (d, 1): an unscaled third
            vector = torch.cat([ones] * thirds[0] + [vector] + [ones] * (2 - thirds[-1]))  # (3d, 1)
        out[name + ".ia3_l"] = vector
    conv1d = any(n.endswith("." + path) for n in targets for path in FUSED_QKV)  # GPT-2 stores (in, out)
    fields = {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
              "fan_in_fan_out": conv1d}
    return fields, out


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(method options, deltatune tensors) from a peft IA3 adapter: `X.ia3_l` -> `X.ia3_l.default`.

    Modules are targeted by their full names (a fused q/k/v projection then scales all three thirds,
    as peft does); which ones scale their input is read from the vector shapes peft saved.
    """
    if adapter_config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise UserError(f"not an IA3 adapter: peft_type is {adapter_config.get('peft_type')}")
    targets, feedforward, out = [], [], {}
    for key, vector in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        if not key.endswith(".ia3_l"):
            out[key] = vector
            continue
        name = key[: -len(".ia3_l")]
        targets.append(name)
        if _is_feedforward(vector):
            feedforward.append(name)
        out[f"{key}.{ADAPTER}"] = vector
    if not targets:
        raise UserError("the peft adapter holds no IA3 vectors (no '*.ia3_l' tensors)")
    return {"target_modules": tuple(targets), "feedforward_modules": tuple(feedforward)}, out


def _is_feedforward(vector: torch.Tensor) -> bool:
    """peft stores input-scaling vectors as (1, in) and output-scaling ones as (out, 1)."""
    return vector.ndim == 2 and vector.shape[0] == 1 and vector.shape[1] > 1
