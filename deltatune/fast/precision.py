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
master" of mixed-precision training needs no extra optimizer code. Modules change class in place
(`BF16Linear` is an `nn.Linear`): parameter names, and so deltas and peft exports, stay as they were.
The fp32 values of the cast weights wait in a temporary file; `Originals.restore()` puts them and the
classes back after training, so what is tested and saved is the plain fp32 model.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from deltatune.backbone import TaskModel
from deltatune.errors import UserError

COMPUTE_DTYPE = torch.bfloat16
PRECISIONS = ("auto", "fp32", "bf16")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware runs bf16 natively, else fp32; fp32 / bf16 as given."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{requested}'")
    if requested == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return requested


# ---- module classes: the same modules, another forward ---------------------------------------------------

def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class BF16Linear(nn.Linear):
    """An nn.Linear that computes in bf16 whatever its input's and parameters' dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out) in bf16
        return F.linear(_cast(x, COMPUTE_DTYPE), _cast(self.weight, COMPUTE_DTYPE), _cast(self.bias, COMPUTE_DTYPE))


class BF16Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) -> (B, T, H) in bf16
        return F.embedding(ids, _cast(self.weight, COMPUTE_DTYPE), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


def _bf16_conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (weight stored (in, out)) in bf16."""
    # x: (B, T, in) -> (B, T, out)
    return torch.addmm(_cast(self.bias, COMPUTE_DTYPE), _cast(x, COMPUTE_DTYPE).reshape(-1, x.shape[-1]),
                       _cast(self.weight, COMPUTE_DTYPE)).view(*x.shape[:-1], self.weight.shape[1])


def _norm_forward(base: type):
    def forward(self, x, *args, **kwargs):
        # fp32 parameters; the norm itself upcasts its statistics (nn.LayerNorm's mixed-dtype kernel,
        # RMSNorm's .to(float32)); the output goes back to the stream's dtype
        return base.forward(self, x, *args, **kwargs).to(x.dtype)
    return forward


def _fp32_forward(base: type):
    def forward(self, x, *args, **kwargs):
        return base.forward(self, x.float() if torch.is_floating_point(x) else x, *args, **kwargs)
    return forward


@functools.cache
def _subclass(base: type, kind: str) -> type:
    """A subclass of `base` whose forward follows `kind` (bf16 / norm / fp32); cached per (base, kind)."""
    if kind == "bf16" and issubclass(base, nn.Linear):
        return BF16Linear if base is nn.Linear else type(f"BF16{base.__name__}", (base,), {"forward": BF16Linear.forward})
    if kind == "bf16" and issubclass(base, nn.Embedding):
        return BF16Embedding if base is nn.Embedding else type(f"BF16{base.__name__}", (base,),
                                                               {"forward": BF16Embedding.forward})
    if kind == "bf16":  # Conv1D
        return type(f"BF16{base.__name__}", (base,), {"forward": _bf16_conv1d_forward})
    forward = _norm_forward(base) if kind == "norm" else _fp32_forward(base)
    return type(f"{kind.upper()}{base.__name__}", (base,), {"forward": forward, "_precision_base": base})


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def is_projection(module: nn.Module) -> bool:
    # by the class or a base: parametrize (the intrinsic method) makes GPT-2's Conv1D a ParametrizedConv1D
    return isinstance(module, (nn.Linear, nn.Embedding)) or any(c.__name__ == "Conv1D" for c in type(module).__mro__)


@dataclass
class PrecisionReport:
    bf16_modules: int = 0
    """Linear / Conv1D / Embedding modules of the backbone computing in bf16."""
    fp32_modules: int = 0
    """Norms and head modules computing in fp32."""
    bf16_mb: float = 0.0
    """Frozen weights now stored in bf16 (MB, after the cast)."""
    untouched: list[str] = field(default_factory=list)
    """Loaded modules with parameters of a type this file does not know: left in fp32 as they were."""


class Originals:
    """The fp32 values of the weights cast to bf16, kept in a temporary file (not in memory) until
    `restore` puts them back: after training the model is exactly the plain fp32 one again."""

    def __init__(self) -> None:
        self.classes: list[tuple[nn.Module, type]] = []
        self.params: list[nn.Parameter] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    def save(self, params: list[nn.Parameter]) -> None:
        self.params = params
        if params:
            self._dir = tempfile.TemporaryDirectory(prefix="deltatune-fp32-")
            save_file({str(i): p.data.detach().cpu().contiguous() for i, p in enumerate(params)},
                      Path(self._dir.name) / "fp32.safetensors")

    def restore(self) -> None:
        for sub, cls in reversed(self.classes):
            sub.__class__ = cls
        if self._dir is not None:
            values = load_file(Path(self._dir.name) / "fp32.safetensors")
            for i, p in enumerate(self.params):
                p.data = values[str(i)].to(p.device)
            self._dir.cleanup()
        self.classes, self.params, self._dir = [], [], None


def to_bf16_compute(task_model: TaskModel) -> tuple[PrecisionReport, Originals]:
    """Apply the table above to a task model after `method.apply` (its `requires_grad` flags are final);
    `Originals.restore()` undoes it."""
    module = task_model.module
    loaded = task_model.loaded_modules
    head_modules = {name.rpartition(".")[0] for name in task_model.head_names}
    report, originals = PrecisionReport(), Originals()
    frozen: dict[int, nn.Parameter] = {}  # by id: a tied weight (embeddings = LM head) is cast once
    for name, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        weighted = bool(own) or parametrize.is_parametrized(sub)  # parametrized: weights are functions
        if not weighted or sub not in loaded:  # no weights, or a method's own module: left alone
            continue
        if name in head_modules:
            kind = "fp32"
        elif is_norm(sub):
            kind = "norm"
        elif is_projection(sub):
            kind = "bf16"
        else:
            report.untouched.append(name)
            continue
        originals.classes.append((sub, type(sub)))
        sub.__class__ = _subclass(type(sub), kind)
        if kind != "bf16":
            report.fp32_modules += 1
            continue
        report.bf16_modules += 1
        for p in own:  # frozen weights: stored in bf16; trainable ones stay fp32 masters
            if not p.requires_grad and p.is_floating_point() and p.dtype != COMPUTE_DTYPE:
                frozen[id(p)] = p
    originals.save(list(frozen.values()))
    for p in frozen.values():
        p.data = p.data.to(COMPUTE_DTYPE)
        report.bf16_mb += p.numel() * 2 / 2**20
    return report, originals
