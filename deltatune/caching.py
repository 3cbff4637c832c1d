"""Frozen-prefix caching: compute the frozen bottom of the network once, train only the top.

    epoch 1:   x ─> [embeddings + layers 0..k-1]  (frozen, eval mode, no grad) ─> h_k ─> cache
    every epoch:   cache ─> h_k ─> [layers k..L-1 + head]  (the trainable top)

This is exact, not an approximation: deltatune always runs a frozen bottom in eval mode (no
dropout), with or without the cache, so the top sees the same h_k either way. It applies when
nothing trainable sits in the embeddings or layers 0..k-1 (features, head, head --unfreeze-last N).
Per-example hidden states (T_i, H) are kept in memory up to a bound, then spilled to safetensors
files in a temporary directory and read back memory-mapped.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltatune.backbone import TaskModel


def frozen_prefix_depth(task_model: TaskModel) -> int:
    """How many bottom layers are frozen with nothing trainable below them (0: none can be cached)."""
    embeddings = task_model.backbone.get_submodule(task_model.arch.embeddings)
    if getattr(task_model.module, "no_prefix_cache", False):
        return 0
    if any(p.requires_grad for p in embeddings.parameters()):
        return 0
    depth = 0
    for layer in task_model.layers():
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth


class CachedHiddenStates(nn.Module):
    """Stands in for the embeddings module: returns the cached h_k of the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.current: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.current


class FrozenPrefixCache:
    def __init__(self, task_model: TaskModel, depth: int, max_memory_mb: float = 1024,
                 spill_dir: str | None = None):
        self.task_model = task_model
        self.depth = depth
        self.max_memory_bytes = max_memory_mb * 2**20
        self.memory: dict[str, torch.Tensor] = {}
        self.memory_bytes = 0
        self.spill_dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.on_disk: dict[str, str] = {}  # key -> file
        self._pending: dict[str, torch.Tensor] = {}
        self._readers: dict[str, object] = {}
        self.stand_in = CachedHiddenStates()
        self.spilled_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.memory or key in self.on_disk or key in self._pending

    @torch.no_grad()
    def add(self, batch: dict) -> None:
        """Run the frozen bottom on a batch and store each row's states, trimmed to its length."""
        hidden = self._bottom_output(batch)  # (B, T, H)
        lengths = batch["attention_mask"].sum(1).tolist()
        for key, row, length in zip(batch["keys"], hidden, lengths):
            self._store(key, row[:length].to("cpu").clone())

    def _store(self, key: str, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.memory_bytes + size <= self.max_memory_bytes:
            self.memory[key] = states
            self.memory_bytes += size
            return
        self._pending[key] = states
        if sum(t.numel() * t.element_size() for t in self._pending.values()) > 64 * 2**20:
            self.flush()

    def flush(self) -> None:
        """Write pending spilled states to one safetensors file (temp name, then rename)."""
        if not self._pending:
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="deltatune-cache-", dir=self.spill_dir)
        path = Path(self._tmp.name) / f"chunk{len(set(self.on_disk.values())):05d}.safetensors"
        save_file(self._pending, str(path) + ".tmp")
        Path(str(path) + ".tmp").rename(path)
        for key, states in self._pending.items():
            self.on_disk[key] = str(path)
            self.spilled_bytes += states.numel() * states.element_size()
        self._pending = {}

    def get(self, key: str) -> torch.Tensor:
        if key in self.memory:
            return self.memory[key]
        if key in self._pending:
            return self._pending[key]
        path = self.on_disk[key]
        if path not in self._readers:
            self._readers[path] = safe_open(path, framework="pt")
        return self._readers[path].get_tensor(key)

    def set_batch(self, batch: dict) -> None:
        """Pad the batch's cached states to its width and hand them to the stand-in module."""
        width = batch["input_ids"].shape[1]
        rows = [self.get(k) for k in batch["keys"]]
        out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))  # (B, T, H)
        for i, row in enumerate(rows):
            out[i, :row.shape[0]] = row
        self.stand_in.current = out.to(batch["input_ids"].device)

    def _bottom_output(self, batch: dict) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        layers = self.task_model.layers()

        def keep(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        hook = layers[self.depth - 1].register_forward_hook(keep)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "keys")}
        try:
            self.task_model.backbone(**inputs)
        except _StopForward:
            pass
        finally:
            hook.remove()
        return captured[0]

    @contextlib.contextmanager
    def top_only(self) -> Iterator[None]:
        """Within this block the model runs cached h_k through layers k..L-1 and the head."""
        backbone, arch = self.task_model.backbone, self.task_model.arch
        layers_parent, _, layers_attr = arch.layers.rpartition(".")
        parent = backbone.get_submodule(layers_parent) if layers_parent else backbone
        emb_parent_name, _, emb_attr = arch.embeddings.rpartition(".")
        emb_parent = backbone.get_submodule(emb_parent_name) if emb_parent_name else backbone
        all_layers, embeddings = getattr(parent, layers_attr), getattr(emb_parent, emb_attr)
        setattr(parent, layers_attr, nn.ModuleList(list(all_layers)[self.depth:]))
        setattr(emb_parent, emb_attr, self.stand_in)
        try:
            yield
        finally:
            setattr(parent, layers_attr, all_layers)
            setattr(emb_parent, emb_attr, embeddings)
            self.stand_in.current = None


class _StopForward(Exception):
    """Raised by the capture hook: nothing above layer k needs to run when filling the cache."""
