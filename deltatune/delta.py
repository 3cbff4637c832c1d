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
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.io import MANIFEST, atomic_directory, write_json_atomic
from deltatune.methods.base import Method, config_dict
from deltatune.quantize import check_delta

FORMAT = "deltatune.delta"
VERSION = 1
TENSORS, META = "delta.safetensors", "delta.json"


@dataclass
class LoadedDelta:
    task_model: TaskModel
    method: Method
    config: Any
    meta: dict


def save_delta(out: str | Path, task_model: TaskModel, method: Method, config: Any,
               meta: dict[str, Any], carry: tuple[str, ...] = ()) -> Path:
    """Write DELTA/delta.safetensors + delta.json atomically; returns the directory. `carry`: entries of
    the folder being replaced that move into the new one (a run's `checkpoints`), just before the swap."""
    tensors = method.delta_state(task_model, config)
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
            "quantization": task_model.quantization,
        },
        "num_labels": task_model.num_labels,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    with atomic_directory(out, "delta") as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        write_json_atomic(tmp / META, full_meta)
        for name in carry:
            if (Path(out) / name).exists():
                (Path(out) / name).rename(tmp / name)
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


def apply_delta(task_model: TaskModel, meta: dict, tensors: dict[str, torch.Tensor], method: Method,
                config: Any, before_load: Callable[[TaskModel, dict[str, torch.Tensor]], None] | None = None,
                ) -> None:
    """Check the fingerprint, apply the method it was given, load its tensors (the method checks names
    and shapes). The on-disk format knows no registry: the caller resolves `meta["method"]`.

    `before_load(task_model, tensors)` runs between `apply` and loading (serve gives backbone weights
    that a delta overwrites private copies there, so a shared backbone is never written to)."""
    if meta["backbone"]["fingerprint"] != task_model.fingerprint:
        raise UserError(
            f"delta was trained on a different backbone ({meta['backbone']['path']}, fingerprint "
            f"{meta['backbone']['fingerprint']}) than {task_model.model_path} (fingerprint {task_model.fingerprint})")
    check_delta(meta["backbone"], task_model)  # --quantize: the same kind and packed weights, or a warning
    method.apply(task_model, config)
    if before_load is not None:
        before_load(task_model, tensors)
    method.load_delta_state(task_model, config, tensors)


def delta_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name != MANIFEST)
