"""hqq storages: 2- and 3-bit frozen weights (Half-Quadratic Quantisation).

    W (out, in), groups of 64 consecutive values along `in`, each with a scale s and zero z:
        w ≈ (q - z) · s,   q ∈ {0 .. 2^b - 1}
    s and z are fitted per group by HQQ's half-quadratic solver (a sparse l_p<1 loss on W - Ŵ, no
    calibration data), then kept in bf16: 2 + 32/64 = 2.5 bits per weight at 2 bits; 3-bit codes are
    packed ten to an int32 (3.2 bits) + 0.5 = 3.7 bits.

Paper: Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models" (hqq on PyPI,
maintained by Mobius Labs). Chosen over bitsandbytes (no 2/3-bit kind), AQLM / QuIP# (need calibration
data and CUDA kernels) and GPTQ (calibration data; CUDA): hqq quantises in seconds on the CPU, in pure torch.
"""

from __future__ import annotations

import torch
from hqq.core.quantize import Quantizer

from deltatune.storage import QuantizedWeight

GROUP = 64
SCALE_DTYPE = torch.bfloat16


class HQQ2Weight(QuantizedWeight):
    """2-bit codes, a bf16 scale and zero per group of 64."""

    name, nbits = "2bit", 2
    bits = 2 + 32 / GROUP

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # groups run along the flattened (out, in) rows; hqq packs 2-bit groups four at a time: a size that
        # does not divide into that takes groups of 32, 16 or 8
        per = 4 if self.nbits == 2 else 1
        group = next((g for g in (GROUP, 32, 16, 8) if weight.numel() % (g * per) == 0), None)
        if group is None:
            raise ValueError(f"a {tuple(weight.shape)} weight does not split into groups of 8 or more")
        packed, meta = Quantizer.quantize(weight, nbits=self.nbits, group_size=group, axis=1, optimize=True,
                                          bitpack=True, compute_dtype=torch.float32, device=str(weight.device))
        meta["scale"], meta["zero"] = meta["scale"].to(SCALE_DTYPE), meta["zero"].to(SCALE_DTYPE)  # (groups, 1)
        return packed, meta

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = self.source.weight
        meta = {**self.state, "compute_dtype": dtype,
                "scale": self.state["scale"].to(packed.device, dtype), "zero": self.state["zero"].to(packed.device, dtype)}
        return Quantizer.dequantize(packed, meta)  # (out, in)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.source.weight, "scale": self.state["scale"], "zero": self.state["zero"]}


class HQQ3Weight(HQQ2Weight):
    """3-bit codes (ten per int32), the same groups."""

    name, nbits = "3bit", 3
    bits = 32 / 10 + 32 / GROUP
