"""Mixed precision without autocast: frozen weights stored in bf16, trainable parameters kept in fp32.

    module (loaded with the backbone)    parameters                         computes in     returns
    ───────────────────────────────────  ─────────────────────────────────  ──────────────  ─────────────
    Linear / Conv1D / Embedding, frozen  stored bf16 (half the memory)      bf16            bf16
    Linear / Conv1D / Embedding, trains  fp32 master, cast to bf16 per call bf16            bf16
    norms (LayerNorm, RMSNorm, ...)      fp32                               fp32 statistics input's dtype
    the task head                        fp32                               fp32            fp32 (loss in fp32)
    added by a method (LoRA, adapters,   untouched: fp32; such modules cast their input to their own dtype
    soft prompts, prefixes, ...)         and their output back to the stream's

A weight that a method turned into a function (`torch.nn.utils.parametrize`: the `intrinsic` method's
W0 + P·θ_d) is computed in fp32 as the method wrote it and cast to bf16 for the matmul, like any
trainable weight; there is nothing frozen to store in bf16 there.

The optimizer and its state only ever see fp32 parameters: a trainable backbone weight (full
fine-tuning, BitFit biases) keeps its fp32 value as the parameter itself and each forward uses a bf16
copy (`w.to(bf16)`, which autograd turns back into an fp32 gradient), so the "bf16 working copy + fp32
master" of mixed-precision training needs no extra optimizer code. No module changes class: the
projections compute through a `BF16Weight` storage (deltatune/storage.py, the interface every frozen-
weight kind meets), norms and the head through forward hooks; parameter names, and so deltas and peft
exports, stay as they were. The fp32 values of the cast weights wait in a temporary file;
`Originals.restore()` puts them back and detaches the storages and hooks after training, so what is
tested and saved is the plain fp32 model. A projection of a quantised backbone (--quantize,
deltatune/quantize.py) is frozen storage already, computing in bf16 or fp32 and returning the stream's
dtype: it is left as it is (and stays quantised after `restore`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from deltatune import storage
from deltatune.backbone import TaskModel
from deltatune.runtime import PRECISIONS, bf16_is_fast, resolve_precision  # noqa: F401 - re-exported
from deltatune.storage import is_projection

__all__ = ["COMPUTE_DTYPE", "PRECISIONS", "is_projection", "resolve_precision", "to_bf16_compute"]

COMPUTE_DTYPE = storage.BF16Weight.dtype


# ---- the dtype policy: storages for projections, hooks for norms and the head --------------------------

def _back_to_input_dtype(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    # a norm: fp32 parameters, the norm upcasts its own statistics (nn.LayerNorm's mixed-dtype kernel,
    # RMSNorm's .to(float32)); its output goes back to the stream's dtype
    x = args[0] if args else next(iter(kwargs.values()))
    return output.to(x.dtype)


def _input_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # the head computes in fp32: its (floating) input is cast up
    if args and torch.is_floating_point(args[0]) and args[0].dtype != torch.float32:
        return (args[0].float(), *args[1:]), kwargs
    return None


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@dataclass
class PrecisionReport:
    bf16_modules: int = 0
    """Linear / Conv1D / Embedding modules of the backbone computing in bf16."""
    fp32_modules: int = 0
    """Norms and head modules computing in fp32."""
    bf16_mb: float = 0.0
    """Frozen weights now stored in bf16 (MB, after the cast)."""
    quantized_modules: int = 0
    """Projections of a quantised backbone (--quantize): left in their storage, never re-cast."""
    untouched: list[str] = field(default_factory=list)
    """Loaded modules with parameters of a type this file does not know: left in fp32 as they were."""


class Originals:
    """What `to_bf16_compute` changed, to undo: the storages attached, the hooks, and the fp32 values of
    the weights cast to bf16, kept in a temporary file (not in memory) until `restore` puts them back:
    after training the model is exactly the plain fp32 one again."""

    def __init__(self) -> None:
        self.attached: list[nn.Module] = []
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.params: list[nn.Parameter] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    def save(self, params: list[nn.Parameter]) -> None:
        self.params = params
        if params:
            self._dir = tempfile.TemporaryDirectory(prefix="deltatune-fp32-")
            save_file({str(i): p.data.detach().cpu().contiguous() for i, p in enumerate(params)},
                      Path(self._dir.name) / "fp32.safetensors")

    def restore(self) -> None:
        for sub in reversed(self.attached):
            storage.detach(sub)
        for handle in self.hooks:
            handle.remove()
        if self._dir is not None:
            values = load_file(Path(self._dir.name) / "fp32.safetensors")
            for i, p in enumerate(self.params):
                p.data = values[str(i)].to(p.device)
            self._dir.cleanup()
        self.attached, self.hooks, self.params, self._dir = [], [], [], None


def to_bf16_compute(task_model: TaskModel) -> tuple[PrecisionReport, Originals]:
    """Apply the table above to a task model after `method.apply` (its `requires_grad` flags are final):
    loaded projections compute through a `BF16Weight` storage, norms and the head keep fp32 behind
    hooks. `Originals.restore()` undoes it."""
    module = task_model.module
    loaded = task_model.loaded_modules
    head_modules = {name.rpartition(".")[0] for name in task_model.head_names}
    report, originals = PrecisionReport(), Originals()
    stores: dict[int, tuple[nn.Parameter, storage.FrozenWeight]] = {}  # by id: a tied weight is cast once
    for name, sub in module.named_modules():
        weighted = bool(list(sub.parameters(recurse=False))) or parametrize.is_parametrized(sub)
        if not weighted or sub not in loaded:  # no weights, or a method's own module: left alone
            continue
        if name in head_modules:  # fp32 compute: the input is cast up
            originals.hooks.append(sub.register_forward_pre_hook(_input_to_fp32, with_kwargs=True))
            report.fp32_modules += 1
        elif is_norm(sub):  # fp32 parameters, the output back in the stream's dtype
            originals.hooks.append(sub.register_forward_hook(_back_to_input_dtype, with_kwargs=True))
            report.fp32_modules += 1
        elif storage.is_quantized(sub):  # --quantize: frozen storage already, computing in its own dtype
            report.quantized_modules += 1
        elif is_projection(sub):
            kept = storage.BF16Weight(sub)
            storage.attach(sub, kept)
            originals.attached.append(sub)
            report.bf16_modules += 1
            stores.update({id(p): (p, kept) for p in kept.to_store()})
        else:
            report.untouched.append(name)
    originals.save([p for p, _ in stores.values()])
    for p, kept in stores.values():
        kept.store(p)
        report.bf16_mb += p.numel() * p.element_size() / 2**20
    own_memory(task_model, set(stores))
    return report, originals


def own_memory(task_model: TaskModel, skip: set[int]) -> None:
    """Give the loaded tensors left in their dtype (norms, the head, trainable masters) memory of their own.
    A checkpoint loaded from safetensors is memory-mapped and every page was read by the casts above, so
    while one tensor still points into the file the whole mapping stays resident: SmolLM2's 61 norm
    vectors (2 KB each) kept its 513 MB fp32 file in the process's memory next to the bf16 copies."""
    seen = set(skip)
    for sub in task_model.loaded_modules:
        if parametrize.is_parametrized(sub) or storage.is_quantized(sub):  # a method's function of its
            continue  # weight, a quantised projection's own storage: left as they are
        for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if id(t) not in seen and t.device.type == "cpu":
                seen.add(id(t))
                t.data = t.data.clone()
