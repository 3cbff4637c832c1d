"""bitsandbytes storages: 4-bit NormalFloat / 4-bit float (QLoRA) and int8 frozen weights.

    NF4Weight   W (out, in) -> 4-bit codes, blocks of 64 values with one absmax each; the absmaxes are
                themselves quantised to 8 bits in blocks of 256 ("double quantisation")
                    w ≈ absmax_b · NF4[q],   NF4 = the 16 quantiles of N(0, 1) scaled to [-1, 1]
                4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight
    FP4Weight   the same layout with a 4-bit float code book (e2m1) instead of NF4's quantiles
    Int8Weight  W (out, in) -> int8 per output row with its absmax: w_ij ≈ s_i · q_ij / 127 (LLM.int8's
                storage; the matmul runs in the compute dtype on the dequantised rows, without
                LLM.int8's outlier split, which only matters when activations are quantised too)
                8 + 32/in bits per weight

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"; Dettmers et al. 2022,
"LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale". Kernels: bitsandbytes >= 0.50,
whose CPU backend runs all three (its optional fused CPU 4-bit kernel comes from the `kernels` package,
downloaded from the Hugging Face Hub; without it bitsandbytes uses its own built-in kernels, with the
same results: only inference of batch-1 rows is slower).
"""

from __future__ import annotations

import logging

import torch

from deltatune.storage import QuantizedWeight

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # the absent `kernels` package
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402

BLOCK = 64
"""Values per absmax block (QLoRA's choice)."""


class NF4Weight(QuantizedWeight):
    """4-bit NormalFloat with double quantisation: QLoRA's storage of the frozen backbone."""

    name, bits = "nf4", 4 + 8 / BLOCK + 32 / (BLOCK * 256)
    quant_type = "nf4"

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, bnbf.QuantState]:
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCK, compress_statistics=True,
                                           quant_type=self.quant_type)  # packed: (out·in/2, 1) uint8
        state.dtype = self.dtype  # dequantise straight to the compute dtype
        return packed, state

    def _state(self) -> bnbf.QuantState:
        packed = self.source.weight
        if self.state.absmax.device != packed.device:  # the module was moved: its scales follow
            self.state.to(packed.device)
        return self.state

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return bnbf.dequantize_4bit(self.source.weight, self._state(), blocksize=BLOCK,
                                    quant_type=self.quant_type).to(dtype)  # (out, in)

    def tensors(self) -> dict[str, torch.Tensor]:
        state = self._state()  # codes, their absmaxes (8-bit, double-quantised) and the absmaxes' scales
        return {"packed": self.source.weight, "absmax": state.absmax, "offset": state.offset.reshape(1),
                "nested_absmax": state.state2.absmax, "nested_code": state.state2.code}

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out) in x's dtype. One row (decoding): bitsandbytes' fused 4-bit matrix-
        # vector kernel; more rows: dequantise to the compute dtype and multiply (QuantizedWeight.linear,
        # what bitsandbytes' own matmul_4bit does there too, with less per-call overhead)
        if x.numel() != x.shape[-1] or x.requires_grad:
            return super().linear(x)
        bias = self.source.bias
        out = bnb.matmul_4bit(x.to(self.dtype), self.source.weight.t(), quant_state=self._state(),
                              bias=None if bias is None else bias.to(self.dtype))
        return out.to(x.dtype)


class FP4Weight(NF4Weight):
    """4-bit float codes, NF4's block layout."""

    name, quant_type = "fp4", "fp4"


class Int8Weight(QuantizedWeight):
    """int8 rows with an fp32 absmax each (bitsandbytes' vector-wise quantisation)."""

    name, bits = "int8", 8.0

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, absmax, _ = bnbf.int8_vectorwise_quant(weight.contiguous())  # (out, in) int8, (out,) fp32
        return codes, absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.source.weight  # (out, in) int8
        scale = self.state.to(codes.device, dtype) / 127  # (out,)
        return codes.to(dtype) * scale[:, None]  # (out, in)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.source.weight, "absmax": self.state}
