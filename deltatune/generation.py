"""Generation tasks: train a delta on (prompt, answer) pairs with the LM loss on the answer only, then decode.

    tokens:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n   Hello!<|im_end|>\\n
             └──────────────── prompt (chat template) ─────────────┘   └──── answer ────┘
    labels:  -100 ... -100                                               Hello!<|im_end|>\\n

    loss = − mean over answer tokens t of log p(x_t | x_<t)     (the model shifts labels by one)

Rows are conversations rendered by `rendering.py` (the chat template, or its plain template): every
assistant turn is labelled, a multi-turn row teaching each answer; an over-long row loses tokens from
the left. Labels come from each row's own segments, never from the pad id, so a pad token equal to EOS
(SmolLM2) still has its final EOS learned. Encoder-decoder models (T5) take the turns before the last
answer as encoder input and that answer as decoder labels.
A task model for this is `load_task_model(model, 0, pooling="lm")`: the model's own LM head, frozen.
"""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from deltatune.backbone import TaskModel
from deltatune.batching import Encoded, collate, eval_batches
from deltatune.caching import FrozenPrefixCache
from deltatune.data import Example
from deltatune.errors import UserError
from deltatune.evaluate import autocast_for, forward_batch
from deltatune.fast.lm_loss import chunked_lm_loss, defer_lm_head, deferrable_head
from deltatune.rendering import IGNORE, SEPARATOR, Fitter, Message, encode_turns, prompt_ids, segments

__all__ = ["IGNORE", "SEPARATOR", "answer_ids", "encode_lm", "evaluate_lm", "generate_texts", "prompt_ids"]

LM_EVAL_BATCH = 8
"""Evaluation batches hold (B, T, vocab) logits: at most 8 rows (49k vocab x 128 tokens = 200 MB)."""


def is_seq2seq(task_model: TaskModel) -> bool:
    return bool(getattr(task_model.module.config, "is_encoder_decoder", False))


def answer_ids(tokenizer, text: str, target: str, seq2seq: bool = False) -> list[int]:
    """Token ids of the answer to one user turn as the model should produce them, ending the turn."""
    if seq2seq:
        return tokenizer(target)["input_ids"]  # T5's tokenizer appends </s>
    return segments(tokenizer, [("user", text), ("assistant", target)])[-1][0]


def encode_lm(tokenizer, examples: list[Example], max_length: int, split: str = "x", seq2seq: bool = False,
              train_on_prompt: bool = False) -> list[Encoded]:
    """Rows whose labels score the assistant turns only (every other token -100; `train_on_prompt`: all);
    over-long rows lose prompt tokens from the left, a final answer longer than max_length is refused."""
    fitter = Fitter(max_length, split)
    rows = []
    for i, example in enumerate(examples):
        if example.target is None and example.messages is None:
            raise UserError(f"{split} example {i} has no target text: a generation task needs one per example")
        ids, labels = encode_turns(tokenizer, example.turns(), fitter, example.where or f"example {i}", seq2seq,
                                   train_on_prompt)
        rows.append(Encoded(key=f"{split}:{i}", input_ids=ids, token_type_ids=None, label=None,
                            token_labels=labels))
    fitter.check()
    fitter.report()
    return rows


def token_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of a batch."""
    if shift:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    # logits: (B, T, V), labels: (B, T)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())


def batch_nll(task_model: TaskModel, batch: dict, cache: FrozenPrefixCache | None) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of a batch. A causal LM's head runs over the labelled
    positions only, in chunks (fast/lm_loss.py), so evaluation never holds (B, T, vocab) logits: 8 rows of
    2,048 tokens of SmolLM2 would be 3.2 GB of fp32 logits, and as much again for their log-softmax."""
    module = task_model.module
    head = deferrable_head(module)
    if head is None:  # encoder-decoders, custom heads: the model's own logits
        logits = forward_batch(task_model, batch, cache).logits
        return token_nll(logits, batch["labels"], shift=not is_seq2seq(task_model))
    undo = defer_lm_head(module)
    try:  # without labels: the model computes no loss, and `logits` are the (B, T, H) hidden states
        hidden = forward_batch(task_model, {k: v for k, v in batch.items() if k != "labels"}, cache).logits
    finally:
        undo()
    scored = int((batch["labels"][:, 1:] != IGNORE).sum())
    if scored == 0:
        return 0.0, 0
    bias = head.bias.detach() if head.bias is not None else None
    mean = chunked_lm_loss(hidden, batch["labels"], head.weight.detach(), bias)
    return mean.item() * scored, scored


@torch.no_grad()
def evaluate_lm(task_model: TaskModel, rows: list[Encoded], batch_size: int = 64, precision: str = "fp32",
                cache: FrozenPrefixCache | None = None) -> dict[str, float]:
    """Mean loss per answer token, its perplexity exp(loss), and inference time per example."""
    module = task_model.module
    was_training = module.training
    module.eval()
    device = task_model.device()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    try:
        for idx in eval_batches([len(r.input_ids) for r in rows], min(batch_size, LM_EVAL_BATCH)):
            batch = collate([rows[i] for i in idx], task_model.tokenizer.pad_token_id, device)
            with autocast_for(device, precision):
                nll, tokens = batch_nll(task_model, batch, cache)
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    finally:
        module.train(was_training)
    loss = total_nll / max(1, total_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "answer_tokens": total_tokens,
            "inference_ms_per_example": 1000 * (time.perf_counter() - start) / max(1, len(rows))}


def decodes_alone(module: torch.nn.Module) -> str | None:
    """Why a task model cannot decode in deltatune's loop (`deltatune.decoding`), or None.

    Encoder-decoders (T5) keep transformers' `generate`: the loop's KV cache holds a decoder's self-
    attention only (no cross-attention over encoder outputs). A prefix on some layers only (S4) has no
    place in a cache row, whose slots every layer shares."""
    if getattr(module.config, "is_encoder_decoder", False):
        return "an encoder-decoder model decodes through transformers' generate, one sequence at a time"
    hooks = getattr(module, "prefix_hooks", None)
    if hooks is not None and getattr(hooks, "rows", None) is not None:
        return "a prefix on some layers only decodes through transformers' generate"
    return None


@torch.no_grad()
def generate_texts(task_model: TaskModel, prompts: list[str | list[Message]], max_new_tokens: int = 64,
                   sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                   raw: bool = False) -> list[str]:
    """One reply per prompt: greedy decoding, or sampling with temperature / top-p (and transformers'
    default top-k of 50) when `sample`, prompt i with its own generator seeded `seed + i`. A prompt is a
    text (one user turn) or a conversation's turns so far; `raw`: texts without the chat template.

    Decoders run deltatune's decode loop, every prompt in one batch with its own KV-cache row (soft
    tokens and prefixes included); encoder-decoders (T5) decode one prompt at a time through
    transformers' `generate` (`decodes_alone`)."""
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise UserError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
    module, tokenizer = task_model.module, task_model.tokenizer
    module.eval()
    seq2seq = is_seq2seq(task_model)
    ids = [prompt_ids(tokenizer, prompt, seq2seq, raw) for prompt in prompts]  # a text or the turns so far
    if decodes_alone(module) is not None:
        news = _transformers_generate(task_model, ids, max_new_tokens, sample, temperature, top_p, seed)
        return [tokenizer.decode(new, skip_special_tokens=True).strip() for new in news]
    from deltatune.decoding.loop import Decoder, decode

    seqs = [sequence(task_model, row, max_new_tokens, sample, temperature, top_p, seed + i)
            for i, row in enumerate(ids)]
    with Decoder(task_model.backbone, head=module.get_output_embeddings()) as decoder:
        news = decode(decoder, seqs)
    return [tokenizer.decode(new, skip_special_tokens=True).strip() for new in news]


def sequence(task_model: TaskModel, ids: list[int], max_new_tokens: int, sample: bool, temperature: float,
             top_p: float, seed: int):
    """A decode-loop `Sequence` for a prompt of this task model: its soft tokens / prefix, greedy or sampled
    (top-k 50, as transformers), stopping at EOS."""
    from deltatune.decoding.loop import Sampling, Sequence
    from deltatune.methods.prefix import prefix_of
    from deltatune.methods.prompt import soft_tokens_of

    module, eos = task_model.module, task_model.tokenizer.eos_token_id
    return Sequence(ids=ids, soft_tokens=soft_tokens_of(module), prefix=prefix_of(module), sampling=Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
        top_k=50 if sample else 0, seed=seed, stop_ids=() if eos is None else (eos,)))


def _transformers_generate(task_model: TaskModel, ids: list[list[int]], max_new_tokens: int, sample: bool,
                           temperature: float, top_p: float, seed: int) -> list[list[int]]:
    """New token ids per prompt from transformers' `generate`, one prompt at a time (no padding)."""
    module, tokenizer = task_model.module, task_model.tokenizer
    device = task_model.device()
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    news = []
    for i, row in enumerate(ids):
        torch.manual_seed(seed + i)
        x = torch.tensor([row], device=device)  # (1, T)
        out = module.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **options)
        news.append((out[0] if is_seq2seq(task_model) else out[0, x.shape[1]:]).tolist())  # (T_new,)
    return news
