"""--optimizer: the update rule for every method's trainable tensors, by name (`train` and `estimate` share it).

    name              state per trainable parameter         library
    ────────────────  ────────────────────────────────────  ──────────────────────────────────────
    adamw             m, v in fp32: 8 bytes                  torch.optim.AdamW
    adamw8bit         m, v in 8 bits, blockwise dynamic     bitsandbytes.optim.AdamW8bit
                      quantisation (2048 values per block,
                      an fp32 absmax each): ~2 bytes
    paged_adamw8bit   the same, allocated in CUDA unified   bitsandbytes.optim.PagedAdamW8bit
                      memory (paged to the host when the
                      GPU runs out); on a CPU: adamw8bit

8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") keeps AdamW's update
    m ← β1 m + (1-β1) g,   v ← β2 v + (1-β2) g²,   θ ← θ - lr (m̂ / (√v̂ + ε) + λ θ)
with m and v stored as 8-bit codes of a dynamic (signed / unsigned) code book per block; tensors under
4096 values keep fp32 state (bitsandbytes' `min_8bit_size`).
"""

from __future__ import annotations

import sys

import torch

from deltatune.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
ALIASES = {"adam8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adam": "adamw", "8bit": "adamw8bit",
           "paged_adamw_8bit": "paged_adamw8bit", "paged_adam8bit": "paged_adamw8bit"}
"""Other spellings, among them the estimator's former `adam8bit`."""


def resolve_optimizer(name: str, extra: tuple[str, ...] = ()) -> str:
    """The canonical name of an --optimizer value (`extra`: names a caller also knows, e.g. sgd)."""
    key = str(name).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in OPTIMIZERS + extra:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS + extra)}, not '{name}'")
    return key


def build(name: str, groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter groups (a method's `param_groups`)."""
    return optimizer_class(name, device)(groups, lr=lr)


def import_bitsandbytes():
    """bitsandbytes, imported once without its notice about the optional `kernels` package (storage_bnb.py)."""
    from deltatune import storage_bnb

    return storage_bnb.bnb


def optimizer_class(name: str, device: torch.device) -> type[torch.optim.Optimizer]:
    """The class --optimizer `name` builds on `device` (a one-line error where it cannot run)."""
    name = resolve_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW
    try:
        bnb_optim = import_bitsandbytes().optim
    except ImportError as exc:
        raise UserError(f"--optimizer {name} needs bitsandbytes >= 0.50, which does not import here ({exc}): "
                        f"pip install 'deltatune[quant]'; runs instead: --optimizer adamw") from exc
    if device.type not in ("cpu", "cuda", "xpu"):
        raise UserError(f"--optimizer {name}: bitsandbytes has no optimizer kernels for device '{device.type}'; "
                        f"runs instead: --optimizer adamw")
    if name == "paged_adamw8bit" and device.type != "cuda":
        print(f"deltatune: note: paged_adamw8bit pages through CUDA unified memory; on {device.type} it runs "
              f"as adamw8bit", file=sys.stderr)
        name = "adamw8bit"
    return bnb_optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb_optim.AdamW8bit
