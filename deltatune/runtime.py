"""Process-wide runtime settings a command applies before it loads anything (below every other layer)."""

from __future__ import annotations

import torch

from deltatune.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def set_threads(threads: int | None) -> None:
    """--threads: torch's intra-op threads for this process (None or 0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


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
