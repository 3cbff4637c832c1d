"""The detailed model's pieces for deltatune's own training path (deltatune/fast): its attention kernel and
its chunked LM-head loss, on the same tensor-lifetime tape as transformers' code (tape.py).

    attention "deltatune" (fast/attention.py, explicit matmuls, grouped heads stacked: no k/v copies)
        T·Tk <  BLOCKWISE_MIN    saves q·scale, k, P (B, h, T, Tk) in the compute dtype, v; a decoder's
                                 causal rows keep P over their blocks' key spans only (fast/spans.py)
        T·Tk >= BLOCKWISE_MIN    saves q·scale, k, v only (fast/blockwise.py); a block's S and P are
                                 transients: bq = BLOCK_ELEMENTS / (B·h·Tk) query rows per block
        backward buffers         small: dP, dS (B, h, T, Tk); blockwise: P, dP, dS of one block + fp32 dK, dV
    LM loss "chunked" (fast/lm_loss.py), N = labelled positions
        saves                    ∂h (N, H) in the compute dtype (the gradients are formed in forward)
        forward transients       h = hidden[labelled] (N, H); per chunk of c ≤ 1,024 rows: z (c, V) fp32,
                                 softmax(z) − onehot in place, and its compute-dtype copy; nothing (T, V)
        backward                 ∂h · ∂loss (N, H) and the scatter back to (B, T, H)
"""

from __future__ import annotations

from deltatune.estimate.shapes import ModelShapes
from deltatune.estimate.tape import Act, RunSettings, Tape
from deltatune.fast import attention as attention_impl
from deltatune.fast import spans
from deltatune.fast.blockwise import block_size
from deltatune.fast.lm_loss import DEFAULT_CHUNK


def blockwise(seq: float, key_len: float) -> bool:
    """Does a training step at this length keep no probabilities (explicit_kernel's rule)?"""
    return seq * key_len >= attention_impl.BLOCKWISE_MIN


def score_columns(shapes: ModelShapes, batch: int, seq: float, key_len: float) -> float:
    """Keys per query row the explicit kernel scores: a decoder's causal rows over their blocks' spans."""
    return spans.causal_columns(batch, int(seq), int(key_len)) if shapes.is_decoder else key_len


def block_elements(run: RunSettings, shapes: ModelShapes, seq: float, key_len: float) -> float:
    """Values of one query block's score tensor S (B, h, bq, Tk)."""
    b, heads = run.batch_size, shapes.heads
    return b * heads * block_size(b, heads, int(seq), int(key_len)) * key_len


def deltatune_attention(tape: Tape, q: Act, k: Act, v: Act, shapes: ModelShapes, run: RunSettings,
                        seq: float, key_len: float) -> Act:
    """explicit_kernel from q (after RoPE) to the merged context (tokens, q_dim), what o_proj reads."""
    a, score_rows = q.itemsize, run.batch_size * shapes.heads * seq
    scaled = tape.new(q.derived("q_scaled"))                  # q · d^-½ (a copy: q stays the caller's)
    grad = scaled.grad or k.grad or v.grad
    if blockwise(seq, key_len) and grad:
        out = tape.new(Act("ctx_heads", q.rows, shapes.q_dim, a, False))
        block = block_elements(run, shapes, seq, key_len)
        s, p = (tape.new(Act(f"block_{name}", block, 1, a, False)) for name in ("scores", "probs"))
        tape.free(s, p)
        for tensor in (scaled, k, v):
            tape.keep(tensor)
        ctx = out.derived("ctx_heads", grad=True)
    else:
        scores = tape.product(scaled, k, "scores", score_rows, score_columns(shapes, run.batch_size, seq, key_len))
        masked = tape.new(scores.derived("scores_masked"))    # + the additive mask
        tape.free(scores)
        probs = tape.softmax(masked, "probs", a)              # compute dtype in and out, fp32 sums
        tape.free(masked)
        ctx = tape.product(probs, v, "ctx_heads", q.rows, shapes.q_dim)
        tape.free(probs)
    tape.free(scaled)
    merged = tape.new(ctx.derived("ctx", itemsize=a))         # transpose(1, 2).contiguous()
    tape.free(ctx)
    return merged


def deltatune_attention_backward(shapes: ModelShapes, run: RunSettings, seq: float, key_len: float) -> float:
    """The attention's gradient buffers in one layer's backward."""
    a, b = run.activation_bytes, run.batch_size
    if blockwise(seq, key_len):
        kv = 2 * b * key_len * shapes.kv_dim * 4               # dK, dV summed over blocks in fp32
        return 3 * block_elements(run, shapes, seq, key_len) * a + kv + b * seq * shapes.q_dim * a
    return 2 * b * shapes.heads * seq * score_columns(shapes, b, seq, key_len) * a  # dP, dS


def labelled_tokens(run: RunSettings, seq: float) -> float:
    """Positions whose next token is labelled: N = B·(T − 1)·fraction."""
    return run.batch_size * max(seq - 1, 1) * run.labelled_fraction


def chunked_head(tape: Tape, x: Act, shapes: ModelShapes, run: RunSettings, head_trains: bool, seq: float) -> None:
    """fast/lm_loss.py from the final norm's output x: gather the labelled rows, loss and gradients chunk
    by chunk; saved: ∂h (and ∂W when the head trains)."""
    n = labelled_tokens(run, seq)
    chunk = min(n, DEFAULT_CHUNK)
    h = tape.new(x.derived("labelled_hidden", rows=n))        # hidden[labels != -100]: a gather copy
    grad_h = tape.new(h.derived("grad_labelled_hidden"))
    if x.grad:
        tape.keep(grad_h)
    if head_trains:                                           # ∂W (V, H) fp32 and W's compute-dtype copy
        tape.keep(Act("grad_lm_head", shapes.vocab, shapes.hidden, 4, False))
        if x.itemsize != 4:
            tape.new(Act("lm_head_cast", shapes.vocab, shapes.hidden, x.itemsize, False))
    parts = [tape.new(Act(f"chunk_{name}", chunk, shapes.vocab, size, False))
             for name, size in (("logits", x.itemsize), ("logits_fp32", 4))]  # softmax in place
    tape.free(parts[0])
    tape.new(Act("chunk_grad", chunk, shapes.vocab, x.itemsize, False))  # (softmax − onehot).to(h.dtype)


def chunked_head_backward(run: RunSettings, shapes: ModelShapes, seq: float) -> float:
    """∂h · ∂loss (N, H) and the zero-filled (B, T, H) gradient of the gather."""
    a = run.activation_bytes
    return labelled_tokens(run, seq) * shapes.hidden * a + run.batch_size * seq * shapes.hidden * a
