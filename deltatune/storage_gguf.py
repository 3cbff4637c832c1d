"""llama.cpp's Q4_1 storage (GGUF), in pure torch: 4-bit codes with an fp16 scale and minimum per 32 weights.

    W (out, in), in % 32 == 0  ->  blocks of 32 consecutive `in` values of a row
        m = min(block),  d = (max(block) - m) / 15          both stored as fp16
        q = clamp(round((w - m) / d), 0, 15)                4-bit codes, two per byte
        w ≈ d · q + m                                       |error| <= d/2 inside [min, max]
    4 + (16 + 16)/32 = 5 bits per weight

The packaged SmolLM2 GGUF stores its transformer projections as Q4_1; deltatune converts it to fp32 once
(gguf_cache.py), each weight then being d·q + m in fp32 exactly. Quantising such weights again with Q4_1
gives back the same d, m and q: a block's minimum is its code-0 value (m), its maximum its code-15 value
(15·d + m: fp16 d times 15 and fp16 m add exactly in fp32), so (max - min)/15 is d again and every code
divides out exactly. `--quantize q4_1` on SmolLM2 therefore holds the GGUF's own quantised weights, and
dequantises them bitwise equal to the fp32 checkpoint (tests/test_quantize_q41.py), where nf4 rounds them
a second time. Transformers' GGUF loader permutes q/k rows (llama.cpp's rotary layout); blocks run along
`in`, so a row permutation keeps them.

Layout: codes of the flattened (out·in) weight, element k in the low nibble of byte k and element n/2 + k
in the high nibble (n = out·in), so unpacking is one cat of two contiguous halves. ggml pairs k and k + 16
inside each block instead: unpacking that is a cat of 16-byte pieces, which made the whole dequantize
1.4-2x slower in torch here, and nothing reads these bytes but this file. Codes become weights in fp32
(d·q + m exactly, as llama.cpp and the `gguf` package compute them), rounded once to the compute dtype.

Reference: ggml's `quantize_row_q4_1_ref` / `dequantize_row_q4_1` (github.com/ggml-org/ggml, ggml-quants.c).
"""

from __future__ import annotations

import torch

from deltatune.storage import QuantizedWeight

BLOCK = 32
"""Weights per (d, m) pair: ggml's QK4_1."""


def quantize_q4_1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed codes (out·in/2,) uint8, d (blocks, 1) fp16, m (blocks, 1) fp16."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"q4_1 stores blocks of {BLOCK} along each row, and the input dimension "
                         f"{weight.shape[-1]} is not a multiple of {BLOCK}")
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (blocks, 32): a row holds in/32 of them
    low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)  # (blocks, 1)
    m, d = low.half(), ((high - low) / 15).half()
    # codes from the stored (fp16) scales: the rounding fits what dequantize multiplies by
    scale = d.float()
    codes = ((blocks - m.float()) / scale.masked_fill(scale == 0, 1)).round_().clamp_(0, 15)  # (blocks, 32)
    codes = codes.masked_fill_(scale == 0, 0).to(torch.uint8).reshape(-1)  # (n,)
    half = codes.numel() // 2
    packed = codes[:half] | (codes[half:] << 4)  # (n/2,): element k low, element n/2 + k high
    return packed, d, m


def dequantize_q4_1(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed (n/2,) uint8, d / m (blocks, 1) fp16 -> (blocks, 32) weights in `dtype`."""
    codes = torch.cat((packed & 15, packed >> 4))  # (n,) uint8, in the weight's order
    w = codes.float().view(-1, BLOCK).mul_(d.float()).add_(m.float())  # (blocks, 32) fp32: d·q + m, exact
    return w if dtype == torch.float32 else w.to(dtype)


class Q41Weight(QuantizedWeight):
    """Q4_1 codes with an fp16 scale (d) and minimum (m) per block of 32 along each row."""

    name, bits = "q4_1", 4 + 32 / BLOCK

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        packed, d, m = quantize_q4_1(weight)
        return packed, {"d": d, "m": m}

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.source.weight.device
        if self.state["d"].device != device:  # the module was moved: its scales follow
            self.state = {k: v.to(device) for k, v in self.state.items()}
        return self.state["d"], self.state["m"]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_q4_1(self.source.weight, *self._scales(), dtype).view(self.shape)  # (out, in)

    def tensors(self) -> dict[str, torch.Tensor]:
        d, m = self._scales()
        return {"packed": self.source.weight, "d": d, "m": m}
