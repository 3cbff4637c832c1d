"""Detailed activation model: per layer, the tensors autograd saves for backward in transformers' code.

PyTorch saves, during forward, exactly what each backward formula needs, and only for inputs that
require grad (derivatives.yaml; checked here with torch.autograd.graph.saved_tensors_hooks):

    linear   y = x·Wᵀ + b     dW = dyᵀ·x needs x → saves x iff W trains;  dx = dy·W needs W (a parameter: free)
    product  c = a·b          saves a iff b needs grad, b iff a needs grad   (q·kᵀ, probs·v, SwiGLU, IA3 scales)
    softmax  p = softmax(s)   saves p (Llama computes it in fp32 and casts back; the cast saves nothing)
    dropout  p > 0            saves its mask: 1 byte per element (bool) on CUDA, one dtype element on CPU
    GELU, SiLU                save the input; ReLU and tanh the output; GPT-2's Python gelu_new saves 4 tensors
    LayerNorm                 saves x and mean, rstd (fp32) iff its output needs grad
    RMSNorm (Llama, Python)   x upcast to fp32 and rsqrt(mean x² + ε) iff x needs grad; x̂ iff its weight trains
    SDPA (flash/mem-eff.)     q, k, v, out and logsumexp (b·heads·s fp32): nothing of size seq²

A tensor saved by several ops (x by q, k, v and LoRA's A) counts once. A layer whose input needs no grad
and whose weights are frozen saves nothing, so nothing below the lowest trainable parameter is kept
(`head`, `features` keep almost nothing); prompt tuning's trainable input makes every layer keep what its
backward needs. For one BERT layer trained fully, eager attention, T = b·s tokens, a bytes per element:

    T·[a·(h + 3h + h + h + h + 2i + h) + 2h + 16] + b·heads·s·s_k·(2a + 1)
       x  q,k,v ctx LN1 FFN GELU LN2  masks LN-stats   probs, dropped probs, mask
    = 34·T·h + 5·b·heads·s² bytes in fp16 with i = 4h (Korthikanti et al. 2022, "Reducing activation
    recomputation"), the same terms as the seed slide 004 "(4 + 8 + 2 + 4)·h·seq + 3·heads·seq²" elements.

Prompt tuning grows s by n soft tokens; prefix tuning grows only the key length s_k = s + n. Gradient
checkpointing keeps each layer's input (T·h·a) and recomputes one layer at a time during backward:
Σ inputs + max(one layer's saved set). The logits (T·V) of a language model are held by the output and
the loss keeps fp32 log-probabilities (T·V·4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deltatune.errors import UserError
from deltatune.estimate import IA3_INPUT_SCALED, IA3_OUTPUT_SCALED, LayerDelta, MethodPlan
from deltatune.estimate.shapes import ModelShapes

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class RunSettings:
    """One training step: batch, sequence and how the backbone computes."""

    batch_size: int
    seq_len: int
    """Real input tokens; prompt methods add their soft tokens to it."""
    activation_bytes: float
    """Bytes per activation element of the backbone (4 fp32, 2 bf16/fp16/k-bit compute)."""
    delta_bytes: float = 4
    """Bytes per element inside delta modules (peft runs LoRA in fp32 and casts its input to it)."""
    attention: str = "eager"
    """eager (scores of size seq² are saved) or sdpa (a fused kernel saves only logsumexp)."""
    gradient_checkpointing: bool = False
    device: str = "cuda"
    """cuda: bool dropout masks; cpu: float masks, and SDPA with dropout falls back to the eager math path."""
    generation: bool = True
    """Language-model loss over V logits per token; False: a classifier with num_labels outputs."""
    num_labels: int = 2


@dataclass(frozen=True)
class Act:
    """A tensor of the forward pass: `rows` × `width` elements of `itemsize` bytes; same name = same storage."""

    name: str
    rows: float
    width: float
    itemsize: float
    grad: bool

    @property
    def nbytes(self) -> float:
        return self.rows * self.width * self.itemsize

    def derived(self, name: str, **changes: float | bool) -> Act:
        """A new tensor shaped like this one (rows kept unless changed)."""
        return replace(self, name=name, **changes)


@dataclass
class Tape:
    """Records the tensors autograd saves for backward, following PyTorch's rules (see module docstring)."""

    device: str
    saved: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.saved.values())

    def keep(self, tensor: Act) -> None:
        self.saved.setdefault(tensor.name, tensor.nbytes)

    def linear(self, x: Act, name: str, out_features: int, weight_trains: bool, bias_trains: bool = False,
               rows: float | None = None) -> Act:
        """y = x·Wᵀ + b: keeps x only to form dW."""
        if weight_trains:
            self.keep(x)
        return Act(name, x.rows if rows is None else rows, out_features, x.itemsize,
                   x.grad or weight_trains or bias_trains)

    def product(self, a: Act, b: Act, name: str, rows: float, width: float) -> Act:
        """c = a·b (elementwise or matmul): da needs b, db needs a."""
        if b.grad:
            self.keep(a)
        if a.grad:
            self.keep(b)
        return Act(name, rows, width, a.itemsize, a.grad or b.grad)

    def scale(self, x: Act, name: str, vector_trains: bool) -> Act:
        """x · l with a per-channel vector l (IA3): dl needs x; dx needs l (a parameter)."""
        if vector_trains:
            self.keep(x)
        return x.derived(name, grad=x.grad or vector_trains)

    def softmax(self, scores: Act, name: str, itemsize: float) -> Act:
        """p = softmax(s) (or log-softmax): the backward uses the output p."""
        out = scores.derived(name, itemsize=itemsize)
        if scores.grad:
            self.keep(out)
        return out

    def dropout(self, x: Act, p: float) -> Act:
        """Keeps the mask; p = 0 is an identity (Llama's attention) and keeps nothing."""
        if p <= 0:
            return x
        if x.grad:
            self.keep(x.derived(f"{x.name}.dropout_mask", itemsize=1 if self.device == "cuda" else x.itemsize))
        return x.derived(f"{x.name}.dropped")

    def activation(self, x: Act, kind: str) -> Act:
        """Elementwise nonlinearity; what it keeps depends on how its derivative is written."""
        out = x.derived(f"{x.name}.{kind}")
        if not x.grad:
            return out
        if kind in ("relu", "tanh"):
            self.keep(out)
        elif kind == "gelu_new":  # 0.5·x·(1 + tanh(c·(x + 0.044715·x³))) in Python: x, tanh, 0.5x, 1 + tanh
            for part in ("input", "tanh", "half_x", "one_plus_tanh"):
                self.keep(x if part == "input" else x.derived(f"{x.name}.gelu_new.{part}"))
        else:  # gelu, silu: derivative evaluated at the input
            self.keep(x)
        return out

    def layer_norm(self, x: Act, name: str, weight_trains: bool) -> Act:
        """native_layer_norm keeps x, mean and rstd (fp32) whenever any of its inputs needs grad."""
        out = x.derived(name, grad=x.grad or weight_trains)
        if out.grad:
            self.keep(x)
            self.keep(x.derived(f"{name}.mean_rstd", width=2, itemsize=4))
        return out

    def rms_norm(self, x: Act, name: str, weight_trains: bool) -> Act:
        """LlamaRMSNorm: w · (x_fp32 · rsqrt(mean(x_fp32²) + ε)).to(dtype)."""
        if x.grad:
            self.keep(x if x.itemsize == 4 else x.derived(f"{x.name}.fp32", itemsize=4))  # pow and mul keep it
            self.keep(x.derived(f"{name}.rsqrt", width=1, itemsize=4))
        if weight_trains:
            self.keep(x.derived(f"{name}.normalized"))  # w · x̂ keeps x̂ to form dw
        return x.derived(name, grad=x.grad or weight_trains)

    def fused_attention(self, q: Act, k: Act, v: Act, ctx: Act, logsumexp: Act) -> Act:
        """SDPA flash / memory-efficient kernels keep q, k, v, the output and logsumexp, nothing seq²."""
        if q.grad or k.grad or v.grad:
            for tensor in (q, k, v, ctx, logsumexp):
                self.keep(tensor)
        return ctx.derived(ctx.name, grad=q.grad or k.grad or v.grad)


def residual(branch: Act, skip: Act, name: str) -> Act:
    """branch + skip: an addition keeps nothing."""
    return skip.derived(name, grad=branch.grad or skip.grad)


def delta_input(x: Act, name: str, run: RunSettings) -> Act:
    """Delta modules cast their input to their own dtype: a private copy when it differs (fp32 LoRA on bf16)."""
    return x if x.itemsize == run.delta_bytes else x.derived(f"{name}.input_cast", itemsize=run.delta_bytes)


def lora_branch(tape: Tape, x: Act, base_out: Act, rank: int, run: RunSettings) -> Act:
    """y = W·x + (α/r)·B·A·x: A keeps its input x, B keeps the r-wide z = A·x."""
    z = tape.linear(delta_input(x, base_out.name, run), f"{base_out.name}.lora_z", rank, weight_trains=True)
    tape.linear(z, f"{base_out.name}.lora_out", int(base_out.width), weight_trains=True)
    return base_out.derived(f"{base_out.name}+lora", grad=True)


def bottleneck_adapter(tape: Tape, x: Act, name: str, bottleneck: int, run: RunSettings) -> Act:
    """Houlsby adapter x + W_up·ReLU(W_down·x + b) + b': down keeps x, ReLU keeps its output (= up's input)."""
    down = tape.linear(delta_input(x, name, run), f"{name}.down", bottleneck, weight_trains=True)
    hidden = tape.activation(down, "relu")
    tape.linear(hidden, f"{name}.up", int(x.width), weight_trains=True)
    return x.derived(f"{name}.out", grad=True)


def projection(tape: Tape, x: Act, role: str, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """One of the layer's matrices with what the method attaches: IA3 scales, LoRA on the side."""
    linear = shapes.layer_linears()[role]
    if layer.ia3 and role in IA3_INPUT_SCALED[shapes.family]:  # peft casts x to l's dtype, scales, casts back
        scaled = tape.scale(delta_input(x, f"{role}.ia3", run), f"{role}.ia3_scaled_input", vector_trains=True)
        x = scaled.derived(scaled.name, itemsize=x.itemsize)
    y = tape.linear(x, role, linear.out_features, weight_trains=layer.all_weights,
                    bias_trains=linear.has_bias and (layer.all_weights or layer.biases))
    if role in layer.lora_targets:
        y = lora_branch(tape, x, y, layer.lora_rank, run)
    if layer.ia3 and role in IA3_OUTPUT_SCALED[shapes.family]:
        y = tape.scale(y, f"{role}.ia3_scaled", vector_trains=True)
    return y


def attention_block(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """Self-attention from the normalized input x to the output projection (before the residual)."""
    b, tokens, a = run.batch_size, x.rows, x.itemsize
    seq = tokens / b
    key_len = seq + layer.prefix_tokens                      # prefix tuning lengthens only the keys
    if shapes.family == "gpt2":                              # one fused c_attn, split into q, k, v views that
        qkv = projection(tape, x, "qkv", shapes, layer, run)  # the matmuls copy (transposed heads), h wide each
        q, k, v = (qkv.derived(name, width=shapes.hidden) for name in ("q", "k", "v"))
    else:
        q, k, v = (projection(tape, x, role, shapes, layer, run) for role in ("q", "k", "v"))
    if shapes.family == "llama":                             # RoPE: q·cos + rot(q)·sin keeps only cos, sin
        q, k = q.derived("q_rope"), k.derived("k_rope")
    if layer.prefix_tokens:                                  # cat(prefix, k): trainable keys and values
        k = Act("k_with_prefix", b * key_len, k.width, a, True)
        v = Act("v_with_prefix", b * key_len, v.width, a, True)
    score_rows = b * shapes.heads * seq
    math_fallback = run.attention == "sdpa" and run.device == "cpu" and shapes.attention_dropout > 0
    if run.attention == "sdpa" and not math_fallback:
        if layer.prefix_tokens:                              # peft passes a mask: kv repeated, mask kept
            k, v = k.derived("k_repeated", width=shapes.q_dim), v.derived("v_repeated", width=shapes.q_dim)
            tape.keep(Act("attention_mask", b * seq, key_len, a, False))
        ctx = Act("ctx", tokens, shapes.q_dim, a, False)     # the kernel's output is o_proj's input
        ctx = tape.fused_attention(q, k, v, ctx, Act("attention.logsumexp", score_rows, 1, 4, False))
    else:
        if math_fallback and a != 4:                         # CPU math path with dropout runs in fp32
            q, k, v = (t.derived(f"{t.name}.fp32", itemsize=4) for t in (q, k, v))
        if shapes.heads != shapes.kv_heads:                  # repeat_kv materializes heads/kv_heads copies
            k, v = k.derived("k_repeated", width=shapes.q_dim), v.derived("v_repeated", width=shapes.q_dim)
        scores = tape.product(q, k, "scores", score_rows, key_len)   # (q·kᵀ)·scale + mask keeps nothing more
        softmax_bytes = 4 if shapes.family == "llama" else q.itemsize  # Llama: softmax(dtype=float32)
        probs = tape.softmax(scores, "probs", softmax_bytes)
        if probs.itemsize != q.itemsize:
            probs = probs.derived("probs_cast", itemsize=q.itemsize)
        probs = tape.dropout(probs, shapes.attention_dropout)
        ctx = tape.product(probs, v, "ctx_heads", tokens, shapes.q_dim)
        ctx = ctx.derived("ctx", itemsize=a)                 # heads merged by a contiguous copy
    return projection(tape, ctx, "o", shapes, layer, run)


def ffn_block(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """FFN: down(act(up(x))) or, for Llama, SwiGLU down(silu(gate(x)) · up(x))."""
    if shapes.family == "llama":
        gate = projection(tape, x, "gate", shapes, layer, run)
        up = projection(tape, x, "up", shapes, layer, run)
        hidden = tape.product(tape.activation(gate, "silu"), up, "gated", x.rows, shapes.intermediate)
    else:
        hidden = tape.activation(projection(tape, x, "up", shapes, layer, run), shapes.hidden_act)
    return projection(tape, hidden, "down", shapes, layer, run)


def layer_forward(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """One block. BERT is post-LN: LN(x + attn(x)), LN(h + ffn(h)); Llama and GPT-2 are pre-norm:
    x + attn(norm(x)), h + ffn(norm(h)). Houlsby adapters follow the attention and FFN outputs;
    MAM's parallel adapter reads the FFN input and adds to its output."""
    post_norm = shapes.family == "bert"
    norm_trains = layer.all_weights or (layer.biases and shapes.family != "llama")

    def norm(t: Act, name: str) -> Act:
        if shapes.family == "llama":
            return tape.rms_norm(t, name, layer.all_weights)
        return tape.layer_norm(t, name, norm_trains)

    attn = attention_block(tape, x if post_norm else norm(x, "attn_norm"), shapes, layer, run)
    if layer.serial_adapter:
        attn = bottleneck_adapter(tape, attn, "attn_adapter", layer.serial_adapter, run)
    middle = residual(tape.dropout(attn, shapes.hidden_dropout), x, "attn_residual")
    if post_norm:
        middle = norm(middle, "attn_norm")
    ffn_in = middle if post_norm else norm(middle, "ffn_norm")
    ffn = ffn_block(tape, ffn_in, shapes, layer, run)
    if layer.parallel_adapter:
        ffn = residual(bottleneck_adapter(tape, ffn_in, "parallel_adapter", layer.parallel_adapter, run),
                       ffn, "ffn+parallel_adapter")
    if layer.serial_adapter:
        ffn = bottleneck_adapter(tape, ffn, "ffn_adapter", layer.serial_adapter, run)
    out = residual(tape.dropout(ffn, shapes.hidden_dropout), middle, "ffn_residual")
    return norm(out, "ffn_norm") if post_norm else out


@dataclass(frozen=True)
class ActivationReport:
    """Saved-for-backward bytes of one step, by part of the network."""

    embeddings_bytes: float
    layer_bytes: tuple[float, ...]
    """What each layer keeps without checkpointing."""
    layers_total_bytes: float
    """Σ layer_bytes, or with checkpointing Σ kept layer inputs + the largest layer (recomputed in backward)."""
    head_bytes: float
    """Final norm / pooler, head, logits and loss."""
    temporary_bytes: float
    """Largest short-lived buffer (scores or their grads, the fp32 logits' grad): counted as overhead."""

    @property
    def total_bytes(self) -> float:
        return self.embeddings_bytes + self.layers_total_bytes + self.head_bytes


def embeddings_forward(tape: Tape, shapes: ModelShapes, plan: MethodPlan, run: RunSettings, seq: int) -> Act:
    """Token (+ position, type) embeddings, with soft prompt tokens prepended: the input of layer 0."""
    b, h, a = run.batch_size, shapes.hidden, run.activation_bytes
    # A trained LM head tied to the embeddings trains the input lookup too: gradients then flow through
    # every (frozen) layer, so `head` on GPT-2 or SmolLM2 keeps nearly as much as prompt tuning.
    embeddings_train = plan.embeddings or (run.generation and shapes.tied_embeddings and plan.head)
    if embeddings_train:                                     # embedding backward keeps the int64 indices
        lookups = 2 if shapes.family == "bert" else 1       # word (+ token-type) ids; positions are tiny
        tape.keep(Act("input_ids", b * run.seq_len * lookups, 1, 8, False))
    if plan.prompt_encoder_hidden:                           # p-tuning MLP h→e→e→h on the n soft tokens
        e, rows = plan.prompt_encoder_hidden, b * plan.prompt_tokens
        prompt = Act("prompt", rows, h, run.delta_bytes, True)
        hidden = tape.activation(tape.linear(prompt, "prompt_mlp1", e, weight_trains=True), "relu")
        hidden = tape.activation(tape.linear(hidden, "prompt_mlp2", e, weight_trains=True), "relu")
        tape.linear(hidden, "prompt_mlp3", h, weight_trains=True)
    x = Act("embeddings", b * seq, h, a, embeddings_train or plan.prompt_tokens > 0)
    if shapes.family == "bert":
        x = tape.layer_norm(x, "embeddings_norm", plan.embeddings or plan.outside_biases)
    return tape.dropout(x, shapes.hidden_dropout)


def head_forward(tape: Tape, x: Act, shapes: ModelShapes, plan: MethodPlan, run: RunSettings) -> None:
    """Top of the network: pooler or final norm, the task head, the logits and the loss."""
    b = run.batch_size
    if shapes.family == "bert":                              # pooler on token 0: a view keeps all of x alive
        pooled = tape.linear(x, "pooler", shapes.hidden, weight_trains=plan.top,
                             bias_trains=plan.top or plan.outside_biases, rows=b)
        x = tape.dropout(tape.activation(pooled, "tanh"), shapes.hidden_dropout)
    elif shapes.family == "llama":
        x = tape.rms_norm(x, "final_norm", plan.top)
    else:
        x = tape.layer_norm(x, "final_norm", plan.top or plan.outside_biases)
    if run.generation:
        logits = tape.linear(x, "logits", shapes.vocab, weight_trains=plan.head)
        tape.keep(logits)                                    # returned in the model output: alive until step end
        tape.softmax(logits, "log_probs", itemsize=4)        # the loss upcasts to fp32, log_softmax keeps its output
    else:
        logits = tape.linear(x, "logits", run.num_labels, weight_trains=plan.head)
        tape.keep(logits)
        tape.softmax(logits.derived("pooled_logits", rows=b), "log_probs", itemsize=4)


def largest_temporary_bytes(shapes: ModelShapes, plan: MethodPlan, run: RunSettings, seq: int) -> float:
    """The biggest buffer alive only briefly: eager scores + probs (or their grads) of one layer, the fp32
    logits and their grad, or the FFN intermediate and its grad."""
    b, a = run.batch_size, run.activation_bytes
    key_len = seq + max((layer.prefix_tokens for layer in plan.layers), default=0)
    scores = 0.0
    if run.attention == "eager" or (run.device == "cpu" and shapes.attention_dropout > 0):
        scores = b * shapes.heads * seq * key_len * (a + (4 if shapes.family == "llama" else a))
    logits = b * seq * shapes.vocab * (4 + a) if run.generation and plan.backprop else 0.0
    ffn = 2 * b * seq * shapes.intermediate * a
    return max(scores, logits, ffn)


def activation_report(shapes: ModelShapes, plan: MethodPlan, run: RunSettings) -> ActivationReport:
    """Walk embeddings → layers → head, recording what each part saves for backward."""
    if run.attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"unknown attention {run.attention!r} (choose from {', '.join(ATTENTION_IMPLEMENTATIONS)})")
    if run.generation and not shapes.is_decoder:
        raise UserError(f"{shapes.name} is an encoder: it trains a classifier, not generation")
    seq = run.seq_len + plan.prompt_tokens
    temporary = largest_temporary_bytes(shapes, plan, run, seq)
    if not plan.backprop:                                    # features: forward under no_grad only
        return ActivationReport(0.0, (0.0,) * shapes.layers, 0.0, 0.0, temporary)
    embeddings = Tape(run.device)
    x = embeddings_forward(embeddings, shapes, plan, run, seq)
    layer_bytes, kept_inputs = [], 0.0
    for layer in plan.layers:
        tape = Tape(run.device)
        out = layer_forward(tape, x.derived("x"), shapes, layer, run)
        layer_bytes.append(tape.total)
        kept_inputs += x.nbytes if out.grad else 0.0         # checkpointing keeps the input of layers in backward
        x = out
    layers_total = sum(layer_bytes)
    if run.gradient_checkpointing:
        layers_total = min(layers_total, kept_inputs + max(layer_bytes, default=0.0))
    head = Tape(run.device)
    head_forward(head, x.derived("last_hidden"), shapes, plan, run)
    return ActivationReport(embeddings.total, tuple(layer_bytes), layers_total, head.total, temporary)
