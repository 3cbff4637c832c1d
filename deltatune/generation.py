"""Generation tasks: train a delta on (prompt, answer) pairs with the LM loss on the answer only, then decode.

    tokens:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n   Hello!<|im_end|>\\n
             └──────────────── prompt (chat template) ─────────────┘   └──── answer ────┘
    labels:  -100 ... -100                                               Hello!<|im_end|>\\n

    loss = − mean over answer tokens t of log p(x_t | x_<t)     (the model shifts labels by one)

The prompt is the tokenizer's chat template (one user turn + the generation prompt) when it has one,
else the text and a newline; the answer is what the template adds for the assistant's turn (ending in
its end-of-turn token), else the target and EOS. Labels come from each row's own length, never from
the pad id, so a pad token equal to EOS (SmolLM2) still has its final EOS learned. Encoder-decoder
models (T5) take the prompt as encoder input and the answer as decoder labels.
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

IGNORE = -100
SEPARATOR = "\n"
LM_EVAL_BATCH = 8
"""Evaluation batches hold (B, T, vocab) logits: at most 8 rows (49k vocab x 128 tokens = 200 MB)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_seq2seq(task_model: TaskModel) -> bool:
    return bool(getattr(task_model.module.config, "is_encoder_decoder", False))


def prompt_text(tokenizer, text: str, seq2seq: bool = False) -> str:
    """What the model sees before the answer: the chat template's user turn + generation prompt."""
    if seq2seq:
        return text
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return text + SEPARATOR


def answer_ids(tokenizer, text: str, target: str, seq2seq: bool = False) -> list[int]:
    """Token ids of the answer as the model should produce them, ending the turn."""
    if seq2seq:
        return tokenizer(target)["input_ids"]  # T5's tokenizer appends </s>
    if has_chat_template(tokenizer):
        prompt = prompt_text(tokenizer, text)
        full = tokenizer.apply_chat_template([{"role": "user", "content": text},
                                              {"role": "assistant", "content": target}], tokenize=False)
        if full.startswith(prompt):  # the template's own end of turn (SmolLM2: "<|im_end|>\n")
            return tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def prompt_ids(tokenizer, text: str, seq2seq: bool = False) -> list[int]:
    # a chat template writes its own special tokens (BOS, turn markers); a plain prompt gets the tokenizer's
    special = seq2seq or not has_chat_template(tokenizer)
    return tokenizer(prompt_text(tokenizer, text, seq2seq), add_special_tokens=special)["input_ids"]


def fit_length(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate to max_length tokens: the answer keeps at least half, the prompt keeps its end."""
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer
    answer = answer[:max(max_length - len(prompt), max_length // 2)]
    keep = max_length - len(answer)
    return (prompt[-keep:] if keep > 0 else []), answer


def encode_lm(tokenizer, examples: list[Example], max_length: int, split: str = "x",
              seq2seq: bool = False) -> list[Encoded]:
    """Rows whose labels score only the answer tokens (prompt tokens are -100)."""
    rows = []
    for i, example in enumerate(examples):
        if example.target is None:
            raise UserError(f"{split} example {i} has no target text: a generation task needs one per example")
        prompt = prompt_ids(tokenizer, example.text, seq2seq)
        answer = answer_ids(tokenizer, example.text, example.target, seq2seq)
        if seq2seq:  # encoder input and decoder labels are separate sequences
            rows.append(Encoded(key=f"{split}:{i}", input_ids=prompt[:max_length], token_type_ids=None,
                                label=None, token_labels=answer[:max_length]))
            continue
        prompt, answer = fit_length(prompt, answer, max_length)
        rows.append(Encoded(key=f"{split}:{i}", input_ids=prompt + answer, token_type_ids=None, label=None,
                            token_labels=[IGNORE] * len(prompt) + answer))
    return rows


def token_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of a batch."""
    if shift:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    # logits: (B, T, V), labels: (B, T)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())


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
                logits = forward_batch(task_model, batch, cache).logits
            nll, tokens = token_nll(logits, batch["labels"], shift=not is_seq2seq(task_model))
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
def generate_texts(task_model: TaskModel, prompts: list[str], max_new_tokens: int = 64, sample: bool = False,
                   temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> list[str]:
    """One reply per prompt: greedy decoding, or sampling with temperature / top-p (and transformers'
    default top-k of 50) when `sample`, prompt i with its own generator seeded `seed + i`.

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
    ids = [prompt_ids(tokenizer, prompt, seq2seq) for prompt in prompts]
    if decodes_alone(module) is not None:
        news = _transformers_generate(task_model, ids, max_new_tokens, sample, temperature, top_p, seed)
        return [tokenizer.decode(new, skip_special_tokens=True).strip() for new in news]
    from deltatune.decoding.loop import Decoder, Sampling, Sequence, decode
    from deltatune.methods.prefix import prefix_of
    from deltatune.methods.prompt import soft_tokens_of

    eos = tokenizer.eos_token_id
    soft, prefix = soft_tokens_of(module), prefix_of(module)
    seqs = [Sequence(ids=row, soft_tokens=soft, prefix=prefix, sampling=Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
        top_k=50 if sample else 0, seed=seed + i, stop_ids=() if eos is None else (eos,)))
        for i, row in enumerate(ids)]
    with Decoder(task_model.backbone, head=module.get_output_embeddings()) as decoder:
        news = decode(decoder, seqs)
    return [tokenizer.decode(new, skip_special_tokens=True).strip() for new in news]


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
