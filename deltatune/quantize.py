"""Quantised backbones: the frozen linear layers of the transformer stored in 8, 5, 4, 3 or 2 bits (QLoRA).

    --quantize   storage (deltatune/storage*.py)          library        bits / weight
    ──────────   ───────────────────────────────────────  ─────────────  ─────────────
    nf4          4-bit NormalFloat, double-quantised      bitsandbytes   4.13   (QLoRA's choice)
    fp4          4-bit float                              bitsandbytes   4.13
    int8         int8 rows + absmax                       bitsandbytes   8
    3bit         HQQ, groups of 64                        hqq            3.7
    2bit         HQQ, groups of 64                        hqq            2.5
    q4_1         llama.cpp's Q4_1: 4-bit codes, fp16      torch          5      (SmolLM2 GGUF's own weights,
                 scale and minimum per 32 (storage_gguf)                        kept exactly)

Only the Linear (and GPT-2 Conv1D) projections inside the transformer layers are quantised: the
embeddings, the LM head, norms and a classifier stay as loaded (the fast path may store them in bf16).
Every trainable tensor a method adds (LoRA, adapters, soft prompts, ...) is fp32; the matmul through a
quantised weight runs in bf16 where the hardware runs bf16 natively, else fp32 (`--precision auto`'s
rule; `--precision fp32` forces fp32). A method that would train a quantised tensor (full, BitFit on
the quantised layers' biases) is refused.

Identity: `TaskModel.fingerprint` stays the fingerprint of the weights as loaded, so every delta of a
backbone names the same model; `TaskModel.quantization` adds the kind and a fingerprint of the packed
weights and their scales. A delta records both; loading checks the kind and the packed fingerprint
(`check_delta`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from deltatune import storage
from deltatune.errors import UserError
from deltatune.runtime import resolve_precision

KINDS = ("nf4", "fp4", "int8", "3bit", "2bit", "q4_1")
ALIASES = {"4bit": "nf4", "qlora": "nf4", "8bit": "int8", "qlora-4bit": "nf4", "qlora-8bit": "int8",
           "qlora-2bit": "2bit", "2-bit": "2bit", "3-bit": "3bit", "q4-1": "q4_1"}
"""Other spellings (the estimator's row names among them) of the same kinds."""
NONE = ("none", "fp32", "bf16", "16bit")
"""Values that ask for the backbone as loaded (no quantisation)."""
LIBRARY = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "bitsandbytes", "3bit": "hqq", "2bit": "hqq",
           "q4_1": "torch"}
DEVICES = {"bitsandbytes": ("cpu", "cuda", "xpu"), "hqq": ("cpu", "cuda", "mps", "xpu"), "torch": ()}
"""Device types each library's kernels cover (bitsandbytes >= 0.50: CPU and CUDA; hqq is pure torch;
(): every device, q4_1 being plain torch ops)."""


def parse(value: str | None, flag: str = "--quantize") -> str | None:
    """A --quantize value -> a kind in KINDS, or None for the backbone as loaded; else a one-line error."""
    if value is None or str(value).lower() in NONE:
        return None
    kind = ALIASES.get(str(value).lower(), str(value).lower())
    if kind not in KINDS:
        raise UserError(f"{flag} must be one of {', '.join(KINDS)} (or none), not '{value}'")
    return kind


def check_runnable(kind: str, device: torch.device) -> None:
    """Raise a one-line error naming the mode, why it cannot run here and what runs instead."""
    library = LIBRARY[kind]
    others: dict[str, list[str]] = {}  # library -> its kinds that run on this device
    for k in KINDS:
        if LIBRARY[k] != library and runs_on(LIBRARY[k], device):
            others.setdefault(LIBRARY[k], []).append(k)
    kinds = ", ".join(f"{' / '.join(ks)} ({lib})" for lib, ks in others.items())
    instead = f"--quantize {kinds} or no --quantize" if others else "no --quantize"
    try:
        storage.kind_class(kind)
    except ImportError as exc:
        hint = "bitsandbytes>=0.50" if library == "bitsandbytes" else "hqq"
        raise UserError(f"--quantize {kind} needs {library}, which does not import here ({exc}): "
                        f"pip install 'deltatune[quant]' (or '{hint}'); runs instead: {instead}") from exc
    if not runs_on(library, device):
        raise UserError(f"--quantize {kind}: {library} has no kernels for device '{device.type}' "
                        f"(it covers {', '.join(DEVICES[library])}); runs instead: {instead}, or --device cpu")


def runs_on(library: str, device: torch.device) -> bool:
    return not DEVICES[library] or device.type in DEVICES[library]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where --precision resolves to bf16 (auto: the hardware runs it natively), else fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32


def quantizable(task_model) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Linear / Conv1D projections inside the transformer layers (encoder and
    decoder), as loaded: not the embeddings, the LM head or a classifier."""
    module, arch = task_model.module, task_model.arch
    stacks = [task_model.backbone.get_submodule(path) for path in (arch.layers, arch.decoder_layers) if path]
    inside = {id(m) for stack in stacks for m in stack.modules()}
    return [(name, m) for name, m in module.named_modules()
            if id(m) in inside and m in task_model.loaded_modules and storage.is_projection(m)
            and not isinstance(m, nn.Embedding)]


def quantize_backbone(task_model, kind: str, precision: str = "auto") -> dict:
    """Store the transformer layers' projections as `kind` in place (module objects and parameter names
    stay); sets and returns `task_model.quantization` (the caller, `backbone.load_task_model`, adds the
    fingerprint of the packed weights)."""
    device = task_model.device()
    check_runnable(kind, device)
    note = requantisation_note(task_model.model_path, kind)
    if note:
        print(note, file=sys.stderr)
    cls, dtype = storage.kind_class(kind), compute_dtype(precision, device)
    stored = loaded = 0
    for name, sub in quantizable(task_model):
        loaded += sub.weight.numel() * 2  # the 16-bit size, the usual reference
        try:
            kept = cls(sub, dtype)
        except ValueError as exc:  # a shape the kind cannot store (q4_1: `in` not a multiple of 32)
            raise UserError(f"--quantize {kind}: layer {name} (weight {tuple(sub.weight.shape)}): {exc}; "
                            f"choose another --quantize kind") from exc
        storage.attach(sub, kept)
        stored += sum(t.numel() * t.element_size() for t in kept.tensors().values())
    for t in [*task_model.module.parameters(), *task_model.module.buffers()]:  # tied tensors once
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()  # off the checkpoint's memory map, so the quantised layers' pages go too
    release_freed_memory(device)
    task_model.quantization = {
        "kind": kind, "library": f"{LIBRARY[kind]} {_version(LIBRARY[kind])}",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantized_mb": round(stored / 2**20, 3), "bf16_mb": round(loaded / 2**20, 3),
    }
    return task_model.quantization


def q4_1_source(model_path: str) -> dict | None:
    """The GGUF tensor types of a model converted from a GGUF whose transformer projections are all Q4_1
    (its fp32 weights are then exactly what --quantize q4_1 stores), else None."""
    from deltatune.gguf_cache import source_types

    types = source_types(model_path)  # None: not a converted GGUF
    return types if types and set(types.get("layer_matrices", {})) == {"Q4_1"} else None


def requantisation_note(model_path: str, kind: str) -> str | None:
    """One line when `kind` would round again a model converted from a GGUF whose layers are Q4_1 already."""
    types = q4_1_source(model_path)
    if kind == "q4_1" or types is None:
        return None
    return (f"deltatune: note: {types['gguf']} stores its transformer projections as Q4_1 already: "
            f"--quantize q4_1 keeps them exactly, --quantize {kind} rounds them again")


def release_freed_memory(device: torch.device) -> None:
    """Hand the freed fp32 weights back to the system: CUDA's cache, or glibc's heap on the CPU (which
    keeps freed blocks resident otherwise, so the process would stay at its fp32 size)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "cpu":
        from deltatune.fast.heap import release_freed

        release_freed()  # not glibc (musl): nothing to do, later allocations reuse the memory


def _version(library: str) -> str:
    from importlib.metadata import version

    return version(library)


def apply_method(task_model, method, config) -> None:
    """`method.apply`, refused with one line when it would train a quantised tensor (full fine-tuning,
    BitFit on the quantised layers' biases, GaLore, BAdam)."""
    try:
        method.apply(task_model, config)
    except RuntimeError as exc:  # requires_grad_ on a packed (integer) weight
        if not task_model.quantization or "floating point" not in str(exc):
            raise
        _refuse(task_model, method.NAME, "its weights")
    for name, sub in quantizable(task_model) if task_model.quantization else ():
        trained = [n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if trained:
            _refuse(task_model, method.NAME, f"{name}.{trained[0]}")


def _refuse(task_model, method: str, what: str) -> None:
    raise UserError(f"method '{method}' trains {what}, which --quantize {task_model.quantization['kind']} "
                    f"stores quantised (frozen): use a method that freezes the backbone (lora, adalora, ia3, "
                    f"adapter, prompt, prefix, ptuning, mam, head) or drop --quantize")


def describe(quantization: dict | None) -> str:
    return f"--quantize {quantization['kind']}" if quantization else "the full-precision backbone"


def check_delta(backbone_meta: dict, task_model, where: str = "delta") -> None:
    """A delta's recorded quantisation against the backbone it is loaded onto: the same kind must have the
    same packed weights; a quantised delta on the full-precision backbone (or the reverse) loads with a
    one-line warning (its tensors were trained against the other weights); two different kinds are refused."""
    trained, loaded = backbone_meta.get("quantization"), task_model.quantization
    if trained and loaded:
        if trained["kind"] != loaded["kind"]:
            raise UserError(f"{where} was trained on a {describe(trained)} backbone, not {describe(loaded)}: "
                            f"load it with --quantize {trained['kind']} (or --quantize none)")
        if trained["fingerprint"] != loaded["fingerprint"]:
            raise UserError(f"{where} was trained on {trained['kind']} weights with fingerprint "
                            f"{trained['fingerprint']} ({trained.get('library')}), these have "
                            f"{loaded['fingerprint']} ({loaded.get('library')}): quantise with the same library version")
    elif trained or loaded:
        if (trained or loaded)["kind"] == "q4_1" and q4_1_source(task_model.model_path) is not None:
            return  # a GGUF's own Q4_1 weights: the full-precision backbone holds exactly the same values
        print(f"deltatune: warning: {where} was trained on {describe(trained)} and is applied to "
              f"{describe(loaded)}: its outputs differ by the quantisation error", file=sys.stderr)
