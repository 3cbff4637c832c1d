"""A delta on disk: the trained tensors and everything needed to put them back on the right backbone.

    DELTA/
      delta.safetensors   only the trained tensors, keyed by parameter name
      delta.json          method + config, labels, task, training config, metrics, and the
                          backbone's fingerprint (a delta is never applied to another model)

Writing goes through a temporary directory that is renamed into place, so a failed or interrupted
save never leaves a half-written delta.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.backbone import TaskModel, load_task_model, resolve_model_path
from deltatune.errors import UserError
from deltatune.io import atomic_directory, write_json_atomic
from deltatune.methods import resolve_method
from deltatune.methods.base import config_dict, trainable_state

FORMAT = "deltatune.delta"
VERSION = 1
TENSORS, META = "delta.safetensors", "delta.json"


@dataclass
class LoadedDelta:
    task_model: TaskModel
    method: ModuleType
    config: Any
    meta: dict


def delta_tensors(task_model: TaskModel, method: ModuleType, config: Any) -> dict[str, torch.Tensor]:
    if hasattr(method, "delta_state"):
        return method.delta_state(task_model, config)
    return trainable_state(task_model.module)


def save_delta(out: str | Path, task_model: TaskModel, method: ModuleType, config: Any,
               meta: dict[str, Any]) -> Path:
    """Write DELTA/delta.safetensors + delta.json atomically; returns the directory."""
    tensors = delta_tensors(task_model, method, config)
    full_meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": method.NAME,
        "method_config": config_dict(config),
        "backbone": {
            "path": task_model.model_path,
            "fingerprint": task_model.fingerprint,
            "family": task_model.arch.family,
            "model_type": task_model.module.config.model_type,
            "pooling": task_model.pooling,
        },
        "num_labels": task_model.num_labels,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        write_json_atomic(tmp / META, full_meta)
    return Path(out)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"delta directory not found: {path}")
    meta_file = path / META
    if not meta_file.exists():
        raise UserError(f"not a deltatune delta (no {META}): {path}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt {meta_file}: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a deltatune delta description")
    return meta


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / TENSORS
    if not file.exists():
        raise UserError(f"delta has no {TENSORS}: {path}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"corrupt {file}: {str(exc).splitlines()[0]}") from exc


def apply_delta(task_model: TaskModel, meta: dict, tensors: dict[str, torch.Tensor],
                before_load: Callable[[TaskModel, dict[str, torch.Tensor]], None] | None = None,
                ) -> tuple[ModuleType, Any]:
    """Check the fingerprint, apply the method, load its tensors (names and shapes must match).

    `before_load(task_model, tensors)` runs between `apply` and loading (serve gives backbone weights
    that a delta overwrites private copies there, so a shared backbone is never written to)."""
    if meta["backbone"]["fingerprint"] != task_model.fingerprint:
        raise UserError(
            f"delta was trained on a different backbone ({meta['backbone']['path']}, fingerprint "
            f"{meta['backbone']['fingerprint']}) than {task_model.model_path} (fingerprint {task_model.fingerprint})")
    method, config = resolve_method(meta["method"], meta.get("method_config", {}))
    method.apply(task_model, config)
    if before_load is not None:
        before_load(task_model, tensors)
    if hasattr(method, "load_delta_state"):
        method.load_delta_state(task_model, config, tensors)
        return method, config
    own = task_model.module.state_dict()
    for name, tensor in tensors.items():
        if name not in own:
            raise UserError(f"delta tensor '{name}' does not exist in the {meta['method']} model")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f"delta tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(own[name].shape)}")
    expected = set(trainable_state(task_model.module))
    missing = expected - set(tensors)
    if missing:
        raise UserError(f"delta is missing {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    task_model.module.load_state_dict(tensors, strict=False)
    return method, config


def load_delta(path: str | Path, model: str | None = None, device: str | torch.device = "cpu") -> LoadedDelta:
    """Load the backbone the delta was trained on (or `model`), verify it, and apply the delta."""
    meta = read_meta(path)
    tensors = read_tensors(path)
    method, _ = resolve_method(meta["method"], meta.get("method_config", {}))
    model_path = model or meta["backbone"]["path"]
    try:
        model_path = resolve_model_path(model_path)
    except UserError as exc:
        raise UserError(f"{exc} (the delta's backbone; pass --model PATH)") from exc
    task_model = load_task_model(model_path, num_labels=meta["num_labels"],
                                 pooling=meta["backbone"]["pooling"], device=device)
    if meta.get("prompt", {}).get("objective") == "verbalizer":  # PET / LM-BFF: LM head at the label words
        from deltatune.notune.label_head import attach_label_head

        attach_label_head(task_model, meta["prompt"])
    method, config = apply_delta(task_model, meta, tensors)
    task_model.module.to(device)
    task_model.module.eval()
    return LoadedDelta(task_model=task_model, method=method, config=config, meta=meta)


def delta_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
