"""Fused projections: the frozen q, k and v of one layer read the same input, so compute them as one matmul.

    x ──> W_q ──> q                       x ──> [W_q; W_k; W_v] ──> [q | k | v]   one (N, k) × (k, Σd) matmul
    x ──> W_k ──> k           becomes            (views: W_q, W_k, W_v keep their storage and names)
    x ──> W_v ──> v

The modules stay where they are, with the same parameter names and classes (their weights become views into
the fused matrix, so no memory is added), and a method's wrappers around them (LoRA's `base_layer`,
IA3's scaled outputs, a prefix cache) see the same outputs as before. The first member called with
an input computes all three outputs; the other two take theirs if they are called with the same
tensor, else (cross-attention, a changed input) they compute their own slice alone. Only frozen
projections fuse: a trainable weight (full fine-tuning) keeps its own parameter. A fused member computes
through a `FusedSlice` storage (deltatune/storage.py); the group's matmul through a storage of the
members' kind, so fp32 and bf16 fuse alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from deltatune import storage
from deltatune.backbone import TaskModel


class FusedGroup:
    """One matmul for several frozen linear layers that share an input, through a storage of the same kind
    as the members' (fp32, or bf16 on the fast path)."""

    def __init__(self, members: list[nn.Linear]):
        self.sizes = [m.out_features for m in members]
        weight = torch.cat([m.weight.detach() for m in members])  # (Σ out, in)
        biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in members]
        bias = torch.cat(biases) if any(m.bias is not None for m in members) else None  # (Σ out,)
        offsets = [sum(self.sizes[:i]) for i in range(len(members))]
        for m, start, size in zip(members, offsets, self.sizes):  # the members' weights become views
            m.weight.data = weight[start:start + size]
            if m.bias is not None:
                m.bias.data = bias[start:start + size]
        self.storage = type(storage.storage_of(members[0]))(SimpleNamespace(weight=weight, bias=bias), False)
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, sizes[index])
        if x is not self._input or index not in self._pending:  # a new input: compute every member's output
            out = self.storage.linear(x)  # (B, T, Σ out)
            self._input, self._outputs = x, out.split(self.sizes, dim=-1)
            self._pending = set(range(len(self.sizes)))
        self._pending.discard(index)
        result = self._outputs[index]
        if not self._pending:  # every member has its output: hold no reference to activations
            self._input, self._outputs = None, ()
        return result


class FusedSlice(storage.FrozenWeight):
    """A member's storage while fused: its rows of the group's matrix, its output from the group's matmul."""

    def __init__(self, member: nn.Linear, group: FusedGroup, index: int):
        super().__init__(member, False)
        self.group, self.index = group, index
        self.name, self.dtype = group.storage.name, group.storage.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen layer under a method's wrappers (`base_layer`, as peft names it)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def unfuse(members: list[tuple[nn.Linear, storage.FrozenWeight | None]]) -> None:
    """Undo `fuse_qkv`: each member gets its own copy of its weights and its storage back."""
    for m, previous in members:
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()
        storage.detach(m, previous)


def fuse_qkv(task_model: TaskModel) -> list[tuple[nn.Linear, storage.FrozenWeight | None]]:
    """Fuse the frozen q/k/v projections of every layer; returns the members and their storages (for `unfuse`)."""
    arch = task_model.arch
    if arch.query is None or arch.key is None or arch.value is None:
        return []  # already fused (GPT-2's c_attn)
    fused: list[tuple[nn.Linear, storage.FrozenWeight | None]] = []
    for layer in task_model.layers():
        members = [base_linear(layer.get_submodule(path)) for path in (arch.query, arch.key, arch.value)]
        if not all(isinstance(m, nn.Linear) and m in task_model.loaded_modules and not storage.is_quantized(m)
                   for m in members):  # a quantised projection computes through its own storage
            continue
        params = [p for m in members for p in m.parameters(recurse=False)]
        if any(p.requires_grad for p in params) or len({p.dtype for p in params}) != 1 \
                or len({m.in_features for m in members}) != 1 \
                or len({type(storage.storage_of(m)) for m in members}) != 1:
            continue
        group = FusedGroup(members)
        fused += [(m, storage.attach(m, FusedSlice(m, group, index))) for index, m in enumerate(members)]
    return fused
