"""Load a delta (or an icl/knn strategy) from disk onto its backbone: the one place that joins the format (`delta.py`) and the
method registry (`methods/`), so neither imports the other's layer.

    DELTA/delta.json ── method name ──> REGISTRY ──> Method ──> backbone + apply + tensors
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltatune.backbone import load_task_model, resolve_model_path
from deltatune.delta import LoadedDelta, apply_delta, read_meta, read_tensors
from deltatune.errors import UserError
from deltatune.label_head import attach_label_head
from deltatune.methods import REGISTRY, resolve_method
from deltatune.notune.job import restore_strategy


def load_delta(path: str | Path, model: str | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None) -> LoadedDelta:
    """Load the backbone the delta was trained on (or `model`), verify it, and apply the delta. The
    backbone is quantised as the delta records (--quantize KIND or none overrides; deltatune/quantize.py)."""
    meta = read_meta(path)
    recorded = meta["backbone"].get("quantization") or {}
    precision = {"bfloat16": "bf16", "float32": "fp32"}.get(recorded.get("compute_dtype"), "auto")
    quantize = recorded.get("kind") if quantize is None else quantize  # as trained: kind and compute dtype
    tensors = read_tensors(path)
    method, config = resolve_method(meta["method"], meta.get("method_config", {}))
    model_path = model or meta["backbone"]["path"]
    try:
        model_path = resolve_model_path(model_path)
    except UserError as exc:
        raise UserError(f"{exc} (the delta's backbone; pass --model PATH)") from exc
    task_model = load_task_model(model_path, num_labels=meta["num_labels"],
                                 pooling=meta["backbone"]["pooling"], device=device, quantize=quantize,
                                 precision=precision)
    if meta.get("prompt", {}).get("objective") == "verbalizer":  # PET / LM-BFF: LM head at the label words
        attach_label_head(task_model, meta["prompt"])
    apply_delta(task_model, meta, tensors, method, config)
    task_model.module.to(device)
    task_model.module.eval()
    return LoadedDelta(task_model=task_model, method=method, config=config, meta=meta)


def load_strategy(delta: str | Path, meta: dict, model: str | None = None, device: str | torch.device = "cpu",
                  precision: str | None = None, batch_size: int | None = None):
    """The saved strategy of an icl/knn delta, its backbone checked; None for a tuned delta."""
    known = REGISTRY.get(meta.get("method"))
    if known is None or known.make_strategy is None:
        return None
    method, config = resolve_method(meta["method"], meta.get("method_config", {}))
    return restore_strategy(delta, meta, method, config, model, device, precision, batch_size)
