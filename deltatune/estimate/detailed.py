"""Detailed activation model: per layer, the tensors autograd saves for backward in transformers' code, the
short-lived tensors alive beside them, and the step's peak.

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
Σ inputs + max(one layer's saved set). A language model's loss keeps fp32 log-probabilities (T·V·4); the
logits themselves are dropped with the model output once the loss is taken (`model(**batch).loss`).

Live tensors. Beside what is saved, each op's output lives until the code drops its last reference: a
temporary in an expression dies when its consumer returns, a Python local when its function returns, the
layer input when the layer returns (the caller still holds it). The walk records every allocation (`new`)
and release (`free`), so each layer has a forward peak: what it saved so far + what is alive. A frozen
layer under no autograd keeps nothing but still holds, at its widest point, its input, q, k, v, and the
attention probabilities, their dropout noise and the dropped copy (the math kernel SDPA falls back to on
CPU when dropout is on), or the FFN intermediate and its activation.

The step's peak (`step_peak`): with the optimizer states resident and the gradients freed by
zero_grad(set_to_none=True), memory is highest at one of

    forward        saved so far + the live tensors of the widest layer (or of the loss: logits, log-probs)
    backward top   all saved + the loss gradients (∂log-probs and ∂logits: 2·T·V·4 for a language model)
    backward l     saved of layers ≤ l + gradients formed so far (head, layers ≥ l) + layer l's gradient buffers
    optimizer      every gradient + AdamW's temporaries (CPU: sqrt(v) and sqrt(v)/bias-correction of the
                   largest tensor; CUDA foreach: one copy of the whole parameter group)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deltatune.errors import UserError
from deltatune.estimate import LayerDelta, MethodPlan, fastpath
from deltatune.estimate.shapes import ModelShapes
from deltatune.estimate.tape import ATTENTION_IMPLEMENTATIONS, LM_LOSSES, Act, RunSettings, Tape
from deltatune.fast.forwards import LONG_ROWS
from deltatune.methods.base import SiteEstimate


def delta_input(tape: Tape, x: Act, name: str, run: RunSettings) -> Act:
    """Delta modules cast their input to their own dtype: a private copy when it differs (fp32 LoRA on bf16)."""
    return x if x.itemsize == run.delta_bytes else tape.new(x.derived(f"{name}.input_cast", itemsize=run.delta_bytes))


def lora_branch(tape: Tape, x: Act, base_out: Act, rank: float, run: RunSettings,
                site: SiteEstimate | None = None) -> Act:
    """y = W·x + (α/r)·B·A·x: A keeps its input x, B keeps the r-wide z = A·x. A method's `site` (its
    `estimate_site`) sets the rank and adds what it keeps beyond: factors formed each step (the A-side one
    only when x needs a gradient) and per-token tensors (DoRA's W0 x + s·BAx for its magnitude)."""
    name = base_out.name
    if site is not None:
        rank = site.rank
        formed_a, formed_b = site.formed
        for part, elements in (("a", formed_a if x.grad else 0.0), ("b", formed_b)):
            if elements:
                tape.keep(Act(f"{name}.formed_{part}", 1, elements, run.delta_bytes, False))
    z = tape.linear(delta_input(tape, x, name, run), f"{name}.lora_z", rank, weight_trains=True)
    update = tape.linear(z, f"{name}.lora_out", int(base_out.width), weight_trains=True)
    if site is not None and site.per_token:
        tape.keep(Act(f"{name}.site_kept", x.rows, site.per_token, run.delta_bytes, False))
    out = tape.add(update, base_out, f"{name}+lora")
    tape.free(z, update, base_out)
    return out.derived(out.name, grad=True)


def bottleneck_adapter(tape: Tape, x: Act, name: str, bottleneck: int, run: RunSettings) -> Act:
    """Houlsby adapter x + W_up·ReLU(W_down·x + b) + b': down keeps x, ReLU keeps its output (= up's input)."""
    down = tape.linear(delta_input(tape, x, name, run), f"{name}.down", bottleneck, weight_trains=True)
    hidden = tape.activation(down, "relu")
    tape.free(down)
    up = tape.linear(hidden, f"{name}.up", int(x.width), weight_trains=True)
    out = tape.add(up, x, f"{name}.out")
    tape.free(hidden, up)
    return out.derived(out.name, grad=True)


def projection(tape: Tape, x: Act, role: str, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """One of the layer's matrices with what the method attaches: IA3 scales, LoRA on the side."""
    linear = shapes.layer_linears()[role]
    source = x
    if role in layer.ia3_in:  # x cast to l's dtype, scaled, cast back
        scaled = tape.scale(delta_input(tape, x, f"{role}.ia3", run), f"{role}.ia3_scaled_input", vector_trains=True)
        x = scaled.derived(scaled.name, itemsize=x.itemsize)
    y = tape.linear(x, role, linear.out_features, weight_trains=layer.all_weights,
                    bias_trains=linear.has_bias and (layer.all_weights or layer.biases))
    if x is not source:
        tape.free(x)
    site = dict(layer.sites).get(role)
    if site is not None:
        y = lora_branch(tape, source, y, site.rank, run, site)
    elif role in layer.lora_targets:
        y = lora_branch(tape, source, y, layer.lora_rank, run)
    if role in layer.ia3_out:
        scaled = tape.scale(y, f"{role}.ia3_scaled", vector_trains=True)
        tape.free(y)
        y = scaled
    return y


def attention_block(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """Self-attention from the normalized input x to the output projection (before the residual); q, k, v
    are locals of the attention function and live until it returns."""
    b, tokens, a = run.batch_size, x.rows, x.itemsize
    caller = tape.scope()
    seq = tokens / b
    key_len = seq + layer.prefix_tokens                      # prefix tuning lengthens only the keys
    if shapes.family == "gpt2":                              # one fused c_attn, split into q, k, v views that
        qkv = projection(tape, x, "qkv", shapes, layer, run)  # the matmuls copy (transposed heads), h wide each
        q, k, v = (qkv.derived(name, width=shapes.hidden) for name in ("q", "k", "v"))
    else:
        q, k, v = (projection(tape, x, role, shapes, layer, run) for role in ("q", "k", "v"))
    if shapes.family == "llama":                             # RoPE: q·cos + rot(q)·sin keeps only cos, sin
        rotated = tape.new(q.derived("q_rope")), tape.new(k.derived("k_rope"))
        tape.free(q, k)                                      # rebound to the rotated copies
        q, k = rotated
    if layer.prefix_tokens:                                  # cat(prefix, k): trainable keys and values
        k_old, v_old = k, v
        k = tape.new(Act("k_with_prefix", b * key_len, k.width, a, True))
        v = tape.new(Act("v_with_prefix", b * key_len, v.width, a, True))
        tape.free(k_old, v_old)
    score_rows = b * shapes.heads * seq
    math_fallback = run.attention == "sdpa" and run.device == "cpu" and shapes.attention_dropout > 0
    if run.attention == "deltatune":                         # fast/attention.py: no k/v copies, maybe blockwise
        ctx = fastpath.deltatune_attention(tape, q, k, v, shapes, run, seq, key_len)
    elif run.attention == "sdpa" and not math_fallback:
        if layer.prefix_tokens:                              # peft passes a mask: kv repeated, mask kept
            k = tape.new(k.derived("k_repeated", width=shapes.q_dim))
            v = tape.new(v.derived("v_repeated", width=shapes.q_dim))
            tape.keep(Act("attention_mask", b * seq, key_len, a, False))
        ctx = Act("ctx", tokens, shapes.q_dim, a, False)     # the kernel's output is o_proj's input
        ctx = tape.fused_attention(q, k, v, ctx, Act("attention.logsumexp", score_rows, 1, 4, False))
    else:
        if math_fallback and a != 4:                         # CPU math path with dropout runs in fp32
            q, k, v = (tape.new(t.derived(f"{t.name}.fp32", itemsize=4)) for t in (q, k, v))
        if shapes.heads != shapes.kv_heads:                  # repeat_kv materializes heads/kv_heads copies
            k = tape.new(k.derived("k_repeated", width=shapes.q_dim))
            v = tape.new(v.derived("v_repeated", width=shapes.q_dim))
        scores = tape.product(q, k, "scores", score_rows, key_len)   # (q·kᵀ)·scale + mask keeps nothing more
        softmax_bytes = 4 if shapes.family == "llama" else q.itemsize  # Llama: softmax(dtype=float32)
        probs = tape.softmax(scores, "probs", softmax_bytes)
        tape.free(scores)
        if probs.itemsize != q.itemsize:
            cast = tape.new(probs.derived("probs_cast", itemsize=q.itemsize))
            tape.free(probs)
            probs = cast
        dropped = tape.dropout(probs, shapes.attention_dropout)
        ctx = tape.product(dropped, v, "ctx_heads", tokens, shapes.q_dim)
        tape.free(probs, dropped)
        merged = tape.new(ctx.derived("ctx", itemsize=a))    # heads merged by a contiguous copy
        tape.free(ctx)
        ctx = merged
    out = projection(tape, ctx, "o", shapes, layer, run)
    tape.free_all_but(out, since=caller)
    return out


def saving_forms(run: RunSettings) -> bool:
    """Does the fast path run its memory-saving SwiGLU and RMSNorm here (deltatune's path, long rows)?"""
    return run.attention == "deltatune" and run.seq_len >= LONG_ROWS


def ffn_block(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """FFN: down(act(up(x))) or, for Llama, SwiGLU down(silu(gate(x)) · up(x)); each intermediate is a
    temporary that dies once its consumer has run (BERT's activated output lives until its output block returns)."""
    if shapes.family == "llama" and saving_forms(run):  # fast/swiglu.py: keeps gate and up only
        gate = projection(tape, x, "gate", shapes, layer, run)
        up = projection(tape, x, "up", shapes, layer, run)
        activated = tape.new(gate.derived(f"{gate.name}.silu"))          # a temporary of the fused forward
        hidden = tape.new(Act("gated", x.rows, shapes.intermediate, gate.itemsize, gate.grad or up.grad))
        if gate.grad or up.grad:
            tape.keep(gate)
            tape.keep(up)
        tape.free(activated, gate, up)
    elif shapes.family == "llama":
        gate = projection(tape, x, "gate", shapes, layer, run)
        activated = tape.activation(gate, "silu")
        tape.free(gate)
        up = projection(tape, x, "up", shapes, layer, run)
        hidden = tape.product(activated, up, "gated", x.rows, shapes.intermediate)
        tape.free(activated, up)
    else:
        up = projection(tape, x, "up", shapes, layer, run)
        hidden = tape.activation(up, shapes.hidden_act)
        tape.free(up)
    out = projection(tape, hidden, "down", shapes, layer, run)
    tape.free(hidden)
    return out


def layer_forward(tape: Tape, x: Act, shapes: ModelShapes, layer: LayerDelta, run: RunSettings) -> Act:
    """One block. BERT is post-LN: LN(x + attn(x)), LN(h + ffn(h)); Llama and GPT-2 are pre-norm:
    x + attn(norm(x)), h + ffn(norm(h)). Houlsby adapters follow the attention and FFN outputs;
    MAM's parallel adapter reads the FFN input and adds to its output. The input x lives through the layer."""
    post_norm = shapes.family == "bert"
    norm_trains = layer.all_weights or (layer.biases and shapes.family != "llama")
    tape.new(x)

    def norm(t: Act, name: str) -> Act:
        if shapes.family == "llama":  # the fast path's bf16 norms rerun in backward (fast/recompute.py)
            return tape.rms_norm(t, name, layer.all_weights, recompute=saving_forms(run) and t.itemsize == 2)
        return tape.layer_norm(t, name, norm_trains)

    def branch_out(branch: Act, skip: Act, name: str) -> Act:
        """dropout(branch) + skip: the branch and its dropped copy die at the addition."""
        dropped = tape.dropout(branch, shapes.hidden_dropout)
        out = tape.add(dropped, skip, name)
        tape.free(branch, dropped)
        return out

    attn_in = x if post_norm else norm(x, "attn_norm")
    attn = attention_block(tape, attn_in, shapes, layer, run)
    if attn_in is not x:
        tape.free(attn_in)
    if layer.serial_adapter:
        adapted = bottleneck_adapter(tape, attn, "attn_adapter", layer.serial_adapter, run)
        tape.free(attn)
        attn = adapted
    middle = branch_out(attn, x, "attn_residual")
    if post_norm:
        normed = norm(middle, "attn_norm")
        tape.free(middle)
        middle = normed
    ffn_in = middle if post_norm else norm(middle, "ffn_norm")
    ffn = ffn_block(tape, ffn_in, shapes, layer, run)
    if layer.parallel_adapter:
        parallel = bottleneck_adapter(tape, ffn_in, "parallel_adapter", layer.parallel_adapter, run)
        combined = tape.add(parallel, ffn, "ffn+parallel_adapter")
        tape.free(parallel, ffn)
        ffn = combined
    if ffn_in is not middle:
        tape.free(ffn_in)
    if layer.serial_adapter:
        adapted = bottleneck_adapter(tape, ffn, "ffn_adapter", layer.serial_adapter, run)
        tape.free(ffn)
        ffn = adapted
    out = branch_out(ffn, middle, "ffn_residual")
    if post_norm:
        normed = norm(out, "ffn_norm")
        tape.free(out)
        out = normed
    tape.free_all_but(out)
    return out


@dataclass(frozen=True)
class ActivationReport:
    """Saved-for-backward bytes of one step, by part of the network, and the transients beside them."""

    embeddings_bytes: float
    layer_bytes: tuple[float, ...]
    """What each layer keeps without checkpointing."""
    layers_total_bytes: float
    """Σ layer_bytes, or with checkpointing Σ kept layer inputs + the largest layer (recomputed in backward)."""
    head_bytes: float
    """Final norm / pooler, head and loss (the fp32 log-probabilities of a language model)."""
    forward_peak_bytes: float
    """The most the forward holds: saved so far + the live tensors of its widest layer or of the loss."""
    head_backward_bytes: float
    """Gradient buffers of the loss at the top of backward (∂log-probs, ∂logits)."""
    logits_grad_bytes: float
    """∂logits in the compute dtype, alive while the LM head's matmul forms its gradients."""
    layer_backward_bytes: tuple[float, ...]
    """Per layer, its largest gradient buffers (FFN intermediate or attention scores); 0 where backward stops."""
    layer_input_bytes: tuple[float, ...]
    """Per layer, its input when backward passes through it (what checkpointing keeps)."""
    checkpointed: tuple[bool, ...] = ()
    """Per layer, whether it runs checkpointed (keeps its input, recomputed in backward)."""

    @property
    def gradient_checkpointing(self) -> bool:
        return any(self.checkpointed)

    @property
    def total_bytes(self) -> float:
        return self.embeddings_bytes + self.layers_total_bytes + self.head_bytes


def embeddings_forward(tape: Tape, shapes: ModelShapes, plan: MethodPlan, run: RunSettings, seq: int) -> Act:
    """Token (+ position, type) embeddings, with soft prompt tokens prepended: the input of layer 0."""
    b, h, a = run.batch_size, shapes.hidden, run.activation_bytes
    if plan.embeddings:                                      # embedding backward keeps the int64 indices
        lookups = 2 if shapes.family == "bert" else 1       # word (+ token-type) ids; positions are tiny
        tape.keep(Act("input_ids", b * run.seq_len * lookups, 1, 8, False))
    if plan.prompt_encoder_hidden:                           # p-tuning MLP h→e→e→h on the n soft tokens
        e, rows = plan.prompt_encoder_hidden, b * plan.prompt_tokens
        prompt = tape.new(Act("prompt", rows, h, run.delta_bytes, True))
        hidden = tape.activation(tape.linear(prompt, "prompt_mlp1", e, weight_trains=True), "relu")
        hidden = tape.activation(tape.linear(hidden, "prompt_mlp2", e, weight_trains=True), "relu")
        tape.linear(hidden, "prompt_mlp3", h, weight_trains=True)
    x = tape.new(Act("embeddings", b * seq, h, a, plan.embeddings or plan.prompt_tokens > 0))
    if shapes.family == "bert":
        normed = tape.layer_norm(x, "embeddings_norm", plan.embeddings or plan.outside_biases)
        tape.free(x)
        x = normed
    out = tape.dropout(x, shapes.hidden_dropout)
    tape.free_all_but(out)
    return out


def head_forward(tape: Tape, x: Act, shapes: ModelShapes, plan: MethodPlan, run: RunSettings) -> None:
    """Top of the network: pooler or final norm, the task head, the logits and the loss. The logits leave
    with the model output, which the training loop drops once it has the loss."""
    b = run.batch_size
    tape.new(x)
    if shapes.family == "bert":                              # pooler on token 0: a view keeps all of x alive
        pooled = tape.linear(x, "pooler", shapes.hidden, weight_trains=plan.top,
                             bias_trains=plan.top or plan.outside_biases, rows=b)
        x = tape.dropout(tape.activation(pooled, "tanh"), shapes.hidden_dropout)
    elif shapes.family == "llama":
        x = tape.rms_norm(x, "final_norm", plan.top)
    else:
        x = tape.layer_norm(x, "final_norm", plan.top or plan.outside_biases)
    if run.generation and run.lm_loss == "chunked":         # fast/lm_loss.py: no (T, V) logits
        fastpath.chunked_head(tape, x, shapes, run, plan.head, x.rows / b)
    elif run.generation:
        logits = tape.linear(x, "logits", shapes.vocab, weight_trains=plan.head)
        if logits.itemsize != 4:                             # the loss upcasts: logits.float()
            logits = tape.new(logits.derived("logits_fp32", itemsize=4))
        tape.softmax(logits, "log_probs", itemsize=4)        # log_softmax keeps its output
    else:                                                    # decoders score every token, then pick the last
        logits = tape.linear(x, "logits", run.num_labels, weight_trains=plan.head)
        tape.softmax(logits.derived("pooled_logits", rows=b), "log_probs", itemsize=4)
    tape.free_all_but()


def backward_buffers(shapes: ModelShapes, run: RunSettings, seq: int, key_len: float) -> float:
    """The biggest gradient buffers of one layer's backward: eager (or CPU math-path) scores and probs
    gradients, or the FFN intermediate's gradient and its activation's."""
    b, a = run.batch_size, run.activation_bytes
    scores = 0.0
    if run.attention == "deltatune":
        scores = fastpath.deltatune_attention_backward(shapes, run, seq, key_len)
    elif run.attention == "eager" or (run.device == "cpu" and shapes.attention_dropout > 0):
        scores = b * shapes.heads * seq * key_len * (a + (4 if shapes.family == "llama" else a))
    ffn = 2 * b * seq * shapes.intermediate * a
    return max(scores, ffn)


def activation_report(shapes: ModelShapes, plan: MethodPlan, run: RunSettings) -> ActivationReport:
    """Walk embeddings → layers → head, recording what each part saves for backward and holds meanwhile."""
    if run.attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"unknown attention {run.attention!r} (choose from {', '.join(ATTENTION_IMPLEMENTATIONS)})")
    if run.lm_loss not in LM_LOSSES:
        raise UserError(f"unknown LM loss {run.lm_loss!r} (choose from {', '.join(LM_LOSSES)})")
    if run.generation and not shapes.is_decoder:
        raise UserError(f"{shapes.name} is an encoder: it trains a classifier, not generation")
    seq = run.seq_len + plan.prompt_tokens
    key_len = seq + max((layer.prefix_tokens for layer in plan.layers), default=0)
    if not plan.backprop:                                    # features: forward under no_grad only
        plan = replace(plan, embeddings=False, top=False, head=False, outside_biases=False)
    embeddings = Tape(run.device)
    x = embeddings_forward(embeddings, shapes, plan, run, seq)
    if run.attention == "deltatune" and fastpath.blockwise(seq, key_len):  # the additive mask, saved by
        embeddings.keep(Act("attention_mask", run.batch_size * seq, key_len, 2, False))  # every layer (bf16)
    checkpointed = tuple(run.checkpointed(i, len(plan.layers)) for i in range(len(plan.layers)))
    forward_peak = embeddings.peak
    layer_bytes, layer_backward, layer_inputs = [], [], []
    resident = embeddings.total                              # what the forward holds between layers
    for i, layer in enumerate(plan.layers):
        tape = Tape(run.device)
        out = layer_forward(tape, x.derived("x"), shapes, layer, run)
        forward_peak = max(forward_peak, resident + tape.peak)
        layer_bytes.append(tape.total)
        layer_backward.append(backward_buffers(shapes, run, seq, key_len) if out.grad else 0.0)
        layer_inputs.append(x.nbytes if out.grad else 0.0)   # checkpointing keeps the input of layers in backward
        resident += layer_inputs[-1] if checkpointed[i] else tape.total
        x = out
    kept = [layer_inputs[i] if c else layer_bytes[i] for i, c in enumerate(checkpointed)]
    recomputed = max((layer_bytes[i] for i, c in enumerate(checkpointed) if c), default=0.0)
    layers_total = min(sum(layer_bytes), sum(kept) + recomputed)
    head = Tape(run.device)
    head_forward(head, x.derived("last_hidden"), shapes, plan, run)
    forward_peak = max(forward_peak, resident + head.peak)
    tokens = run.batch_size * seq
    if not plan.backprop:
        head_backward = logits_grad = 0.0
    elif run.generation and run.lm_loss == "chunked":
        head_backward, logits_grad = fastpath.chunked_head_backward(run, shapes, seq), 0.0
    elif run.generation:
        head_backward = 2 * tokens * shapes.vocab * 4        # ∂log-probs (nll backward) and ∂logits (fp32)
        logits_grad = tokens * shapes.vocab * run.activation_bytes
    else:
        head_backward = logits_grad = 2 * run.batch_size * run.num_labels * 4
    return ActivationReport(embeddings.total, tuple(layer_bytes), layers_total, head.total, forward_peak,
                            head_backward, logits_grad, tuple(layer_backward), tuple(layer_inputs),
                            checkpointed)
