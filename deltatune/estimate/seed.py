"""The seed slides' memory formula (seed 004, "GPU Memory Estimated"), reproduced exactly.

For Llama 2-7B, 16-bit float, seq 4096, batch 1 the slides print:

    CUDA              ~1 GB
    Model weights     size(float) · N_parameter                    13.03 GB
    Gradients         size(float) · N_trainable                    13.03 GB   (0.4 MB for 0.2M trainable)
    Hidden states     size(float) · L · (20·H·seq + 3·seq²)        3.16 GB    (batch size 1)
    Optimizer states  2 · size(float) · N_trainable                26.06 GB   (0.8 MB)
    Estimate                                                        56.28 GB   (17.19 GB for 0.2M trainable)

How the numbers arise:

* N_parameter is the headline 7B = 7·10⁹, not the exact 6,738,415,616, and "Gb" is GiB:
  2 · 7e9 / 2³⁰ = 13.0385 GiB, printed truncated as 13.03; the optimizer line is 2 · 13.03 = 26.06.
* Hidden states use H = number of attention heads (32) and L = 32 layers:
  2 bytes · 32 · (20·32·4096 + 3·4096²) = 3,388,997,632 B = 3.156 GiB → 3.16. The full-FT slide writes
  "20 seq" without H, which would give 3.00 GiB (3.23 decimal GB); only "20 H seq" matches the printed 3.16.
* The total is the sum of the printed lines with the ~1 GB CUDA context:
  1 + 13.03 + 13.03 + 3.16 + 26.06 = 56.28, and 1 + 13.03 + 3.16 + (0.4 + 0.8) MB = 17.19.
  Here the lines are kept unrounded, so we print 56.31 and 17.20 (within 0.05 GB).

0.2M trainable parameters is e.g. prompt tuning with 50 soft tokens on Llama-2-7B: 50 · 4096 = 204,800.

The formula is a rough per-token count and ignores the method, the attention kernel and checkpointing.
Next to it the slide "Formula for Hidden States Estimate" gives the careful count of elements,

    (3·h·seq + L·(4·h·seq + 3·heads·seq² + 8·h·seq + 2·h·seq + 4·h·seq) + V·seq) · bs
       emb, pos, pre-logit   K,V,Q,O  score,probs,dropout  FFN hidden,act  FFN out,dropout  residual,LN  logits
    = 3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + V·seq·bs

(the slide prints its seq² term without "heads" but the legend counts one score matrix per head).
For Llama-2-7B at seq 4096 that is 6.1·10¹⁰ elements, 114 GiB in 16-bit: 36 times the 3.16 above,
which is why the `detailed` model (per-layer autograd accounting) is the default.
"""

from __future__ import annotations

from deltatune.estimate import GIB, Precision
from deltatune.estimate.shapes import ModelShapes

SEED_CUDA_CONTEXT_BYTES = 1.0 * GIB
"""The "~1Gb" CUDA line of the slides: context, kernels and cuBLAS workspace of one process."""

OPTIMIZER_STATES = {"adamw": 2.0, "sgd": 0.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0}
"""Optimizer states per trainable parameter: Adam's m and v; plain SGD (no momentum) none."""


def optimizer_state_bytes(optimizer: str, param_bytes: float) -> float:
    """Bytes of optimizer state per trainable parameter.

    AdamW keeps m and v in the parameter's dtype: 2 · size(param). 8-bit Adam (bitsandbytes) keeps them in
    1 byte each plus an fp32 absmax per block of 2048 values: 2 + 2·4/2048. SGD without momentum: 0.
    """
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return 2.0 + 2 * 4 / 2048
    return OPTIMIZER_STATES[optimizer] * param_bytes


def seed_hidden_states_bytes(shapes: ModelShapes, batch_size: int, seq_len: int, itemsize: float) -> float:
    """size(float) · L · (20·H·seq + 3·seq²) · batch, with H = attention heads (the slides' 3.16 GB)."""
    per_layer = 20 * shapes.heads * seq_len + 3 * seq_len**2
    return itemsize * shapes.layers * per_layer * batch_size


def slide_hidden_states_elements(shapes: ModelShapes, batch_size: int, seq_len: int) -> float:
    """The careful slide: 3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + V·seq·bs elements."""
    h, n_layers, s, b = shapes.hidden, shapes.layers, seq_len, batch_size
    return 3 * h * s * b + 18 * n_layers * h * s * b + 3 * n_layers * shapes.heads * s**2 * b + shapes.vocab * s * b


def seed_parameter_count(shapes: ModelShapes) -> float:
    """N_parameter of the slides: the headline size (7e9 for "7B") when known, else the exact count."""
    return shapes.headline_params or float(shapes.n_params)


def seed_components(shapes: ModelShapes, trainable_params: int, precision: Precision, optimizer: str,
                    batch_size: int, seq_len: int, full: bool = False) -> dict[str, float]:
    """The five lines of the slide, in bytes: weights, gradients, optimizer, activations, overhead.

    size(float) is the training dtype (2 for 16-bit); k-bit frozen weights count bits/8 bytes each.
    For full fine-tuning N_trainable = N_parameter (the headline count) plus any new head.
    """
    if full:
        trainable_params = round(trainable_params - shapes.n_params + seed_parameter_count(shapes))
    weight_size = precision.quantized_bits / 8 if precision.quantized_bits else precision.frozen_bytes
    float_size = precision.trained_bytes
    return {
        "weights": weight_size * seed_parameter_count(shapes),
        "gradients": float_size * trainable_params,
        "optimizer": optimizer_state_bytes(optimizer, float_size) * trainable_params,
        "activations": seed_hidden_states_bytes(shapes, batch_size, seq_len, precision.activation_bytes),
        "overhead": SEED_CUDA_CONTEXT_BYTES,
    }


# LLaMA-Factory's "Hardware Requirement" table as shown on the seed slides (GB, estimated).
HARDWARE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-30b", "llama-2-70b")
HARDWARE_ROWS: tuple[tuple[str, str, str, str, tuple[int, int, int, int]], ...] = (
    # label, bits, our method, our dtype, seed GB for 7B, 13B, 30B, 70B
    ("Full", "AMP", "full", "amp", (120, 240, 600, 1200)),
    ("Full", "16", "full", "bf16", (60, 120, 300, 600)),
    ("Freeze", "16", "last2", "bf16", (20, 40, 80, 200)),
    ("LoRA/GaLore/BAdam", "16", "lora", "bf16", (16, 32, 64, 160)),
    ("QLoRA", "8", "qlora", "int8", (10, 20, 40, 80)),
    ("QLoRA", "4", "qlora", "4bit", (6, 12, 24, 48)),
    ("QLoRA", "2", "qlora", "2bit", (4, 8, 16, 24)),
)


def rule_of_thumb_bytes(label: str, bits: str, shapes: ModelShapes) -> float:
    """The per-parameter rules behind the table (weights + gradients + optimizer, nothing else):

        Full AMP   18 bytes/param: fp32 weights 4 + fp32 grads 4 + Adam m, v 8 + fp16 weight copy 2
        Full 16     8 bytes/param: 16-bit weights 2 + grads 2 + Adam m, v 4
        Freeze 16   2 bytes/param + 6 more for the 2 trained layers (grads 2 + Adam 4)
        LoRA 16     2 bytes/param (the adapters are ~0.1%)
        QLoRA b     b/8 bytes/param for the layers' matrices, 2 for embeddings and LM head
    """
    n = seed_parameter_count(shapes)
    if label == "Full":
        return (18 if bits == "AMP" else 8) * n
    if label == "Freeze":
        return 2 * n + 6 * 2 * shapes.layer_params()
    if label == "QLoRA":
        unquantized = shapes.n_params - shapes.layers * shapes.layer_matrix_params()  # embeddings, LM head
        return int(bits) / 8 * (n - unquantized) + 2 * unquantized
    return 2 * n
