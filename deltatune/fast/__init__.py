"""The fast training path: what runs between `method.apply` and the training loop.

    method.apply(task_model)                 the method's modules, the final requires_grad flags
        │
    prepare(task_model, train_config)
        ├─ dropout      the backbone's own dropout layers set to --dropout (auto: 0, see README)
        ├─ precision    --precision bf16: frozen weights in a bf16 storage (storage.py), trainable ones fp32
        ├─ fused q/k/v  frozen q, k, v projections of a layer as one matmul (fused.py)
        ├─ SwiGLU       a gated MLP's silu(gate) ⊙ up keeps only gate and up for backward (swiglu.py)
        ├─ RMSNorm      keeps its bf16 input, not an fp32 copy, and reruns in backward (recompute.py)
        ├─ attention    --attention auto: explicit matmul + fp32 softmax on the CPU, over the key span
        │               each block of queries attends (spans.py: the causal triangle and a packed row's
        │               other examples skipped; blockwise, keeping no T x T probabilities, when they
        │               would be large), SDPA on CUDA
        ├─ LM loss      generation: the LM head + cross-entropy over chunks of the labelled positions only
        │               (lm_loss.py); --attention model keeps transformers' own head and loss
        ├─ compile      --compile: torch.compile of the training forward (widths padded to buckets)
        └─ heap         on the CPU each training forward first returns the heap freed by the step
                        before to the OS (heap.py: glibc's malloc_trim)
        │
    train_model(...)                         unchanged: AdamW on the fp32 trainable parameters
        │
    restore(task_model)                      undone: the plain fp32 model with the trained tensors is
                                             what gets tested and saved (and what load_delta rebuilds)

Every method goes through it: the transformations are generic (module types, frozen vs trainable
parameters, modules loaded vs added by a method), parameter names never change, so deltas saved
from a fast-trained model load on the plain fp32 path and export to peft as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.evaluate import forward_batch
from deltatune.fast import attention as attention_impl
from deltatune.fast.forwards import LONG_ROWS
from deltatune.fast.fused import fuse_qkv, unfuse
from deltatune.fast.heap import release_freed
from deltatune.fast.lm_loss import deferrable_head, with_deferred_head
from deltatune.fast.precision import PRECISIONS, resolve_precision, to_bf16_compute
from deltatune.fast.recompute import recompute_rms_norms, restore_norms
from deltatune.fast.swiglu import fuse_swiglu, unfuse_swiglu

DEFAULT_DROPOUT = 0.0
"""What --dropout auto means (measured on rotten-tomatoes, README "Fast path"): no validation loss."""
COMPILE_BUCKET = 32
"""With --compile, batch widths are padded up to a multiple of this, so few shapes are compiled."""


@dataclass
class FastPath:
    """What `prepare` did; recorded in the metrics of a run (`fast_path`)."""

    precision: str
    attention: str
    dropout: float | None
    """The backbone's dropout rate during training (None: the checkpoint's own rates)."""
    compile: bool = False
    lm_loss: str = "model"
    """'chunked' (generation: the head and loss over chunks of the labelled positions) or 'model'."""
    fused_layers: int = 0
    """Layers whose frozen q/k/v projections run as one matmul."""
    swiglu_mlps: int = 0
    """Gated MLPs whose silu(gate) ⊙ up keeps only its inputs for backward (swiglu.py)."""
    recomputed_norms: int = 0
    """RMSNorms that keep only their input for backward and rerun in it (recompute.py)."""
    bf16_modules: int = 0
    bf16_mb: float = 0.0
    untouched: list[str] = field(default_factory=list)
    restored: bool = False
    """True once `restore` has undone the fast path (the model is the plain fp32 one again)."""
    _undo: list[Callable[[], Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("_undo", "restored")}



def parse_dropout(value: str | float | None) -> float | None:
    """--dropout: auto (DEFAULT_DROPOUT), model (the checkpoint's rates: None) or a rate in [0, 1)."""
    if value in (None, "model"):
        return None
    if value == "auto":
        return DEFAULT_DROPOUT
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--dropout must be auto, model or a number in [0, 1), not '{value}'") from None
    if not 0 <= rate < 1:
        raise UserError(f"--dropout must be in [0, 1), not {rate}")
    return rate


def set_dropout(task_model: TaskModel, rate: float) -> list[tuple[nn.Module, str, float]]:
    """Set every dropout of the loaded backbone and head (not a method's own) to `rate`; returns
    (module, attribute, previous rate) of each."""
    changed = []
    for sub in task_model.module.modules():
        if sub not in task_model.loaded_modules:
            continue
        attr = "p" if isinstance(sub, nn.Dropout) else "attention_dropout"  # Llama-style attention modules
        if isinstance(getattr(sub, attr, None), float):
            changed.append((sub, attr, getattr(sub, attr)))
            setattr(sub, attr, rate)
    return changed


def prepare(task_model: TaskModel, precision: str = "auto", attention: str = "auto",
            dropout: str | float | None = "auto", compile: bool = False, fuse: bool = True,
            ) -> FastPath:  # noqa: A002
    """Apply the fast path to a task model whose method is applied; returns what was done."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if attention not in attention_impl.CHOICES:
        raise UserError(f"--attention must be one of {', '.join(attention_impl.CHOICES)}, not '{attention}'")
    if active(task_model) is not None and not active(task_model).restored:
        raise RuntimeError("the fast path is already applied to this model")
    device = task_model.device()
    rate = parse_dropout(dropout)
    resolved = resolve_precision(precision, device)
    info = FastPath(precision=resolved, attention="model", dropout=rate, compile=compile)
    if rate is not None:
        changed = set_dropout(task_model, rate)
        info._undo.append(lambda: [setattr(sub, attr, old) for sub, attr, old in changed])
    if resolved == "bf16":
        report, originals = to_bf16_compute(task_model)
        info.bf16_modules, info.bf16_mb, info.untouched = report.bf16_modules, report.bf16_mb, report.untouched
        info._undo.append(originals.restore)
    if fuse:
        members = fuse_qkv(task_model)
        info.fused_layers = len(members) // 3
        info._undo.append(lambda: unfuse(members))
        mlps = fuse_swiglu(task_model.module)
        info.swiglu_mlps = len(mlps)
        info._undo.append(lambda: unfuse_swiglu(mlps))
    if resolved == "bf16":  # an fp32 stream: the norm's fp32 copy is its input, nothing to save
        norms = recompute_rms_norms(task_model.module, task_model.loaded_modules)
        info.recomputed_norms = len(norms)
        info._undo.append(lambda: restore_norms(norms))
    info.attention, previous = attention_impl.set_attention(task_model.module,
                                                            attention_impl.resolve(attention, device))
    info._undo.append(lambda: attention_impl.reset_attention(task_model.module, previous))
    if task_model.pooling == "lm" and attention != "model" and deferrable_head(task_model.module) is not None:
        info.lm_loss = "chunked"  # the head is deferred per training call (training_forward)
    task_model.module.fast_path = info
    return info


def restore(task_model: TaskModel) -> None:
    """Undo `prepare` after training: fp32 weights (from the temporary file), unfused projections, the
    model's attention and dropout. The trained tensors are untouched (they were fp32 all along), so the
    model is the one a plain fp32 run would have: what gets tested and saved, and what `load_delta`
    rebuilds. Evaluation after this runs in fp32 without autocast."""
    info = active(task_model)
    if info is None or info.restored:
        return
    while info._undo:
        info._undo.pop()()
    info.restored = True


def prepare_for_training(task_model: TaskModel, config) -> FastPath:
    """`prepare` with a TrainConfig's --precision, --attention, --dropout and --compile."""
    return prepare(task_model, config.precision, config.attention, config.dropout, config.compile)


def active(task_model: TaskModel) -> FastPath | None:
    return getattr(task_model.module, "fast_path", None)


def autocast_precision(task_model: TaskModel, precision: str) -> str:
    """The precision to hand to `evaluate.autocast_for`: none (fp32) once the fast path set the dtypes (and
    after `restore`: the plain fp32 model, evaluated as `deltatune evaluate` would)."""
    return "fp32" if active(task_model) is not None else precision


def pad_width(batch: dict, multiple: int, pad_id: int) -> dict:
    """Right-pad a collated batch's (B, T) tensors to a width that is a multiple of `multiple`."""
    width = batch["input_ids"].shape[1]
    extra = -width % multiple
    if extra == 0:
        return batch
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100, "shift_labels": -100,
             "position_ids": 0}  # packed rows: each padding position is a run of its own
    out = dict(batch)
    for key, fill in fills.items():
        value = batch.get(key)
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width:  # not class labels (B,)
            out[key] = torch.nn.functional.pad(value, (0, extra), value=fill)
    return out


def training_forward(task_model: TaskModel, cache=None) -> Callable[[dict], Any]:
    """batch -> model output for the training loop: `forward_batch`, or with --compile (and no frozen-
    prefix cache, whose rows change shape) the compiled model on widths padded to COMPILE_BUCKET."""
    info = active(task_model)
    on = info is not None and not info.restored
    if not on or not info.compile or cache is not None:
        forward = functools.partial(forward_batch, task_model, cache=cache)
    else:
        compiled = torch.compile(task_model.module, dynamic=False)
        pad_id = task_model.tokenizer.pad_token_id

        def forward(batch: dict):
            inputs = pad_width({k: v for k, v in batch.items() if k != "keys"}, COMPILE_BUCKET, pad_id)
            return compiled(**inputs)

    if on and info.lm_loss == "chunked":  # only the loss is needed: no (T, vocab) logits
        forward = with_deferred_head(forward, task_model.module)
    if on and task_model.device().type == "cpu":
        forward = with_released_heap(forward)
    return forward


RELEASE_MIN_WIDTH = LONG_ROWS
"""Rows at least this long release the freed heap before their step (long sequences: where the holes are
hundreds of MB and the trim's ~0.2-0.6 s is a few % of a step); shorter rows skip it."""


def with_released_heap(forward: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """A training forward that first returns the heap the previous step freed to the OS (heap.py) when its
    rows are long: the peak of every step is then that of the first, not the first's plus the holes it left."""

    def released(batch: dict):
        if batch["input_ids"].shape[-1] >= RELEASE_MIN_WIDTH:
            release_freed()
        return forward(batch)

    return released
