"""Label scoring with a decoder: log p(label words | prompt), the shared prompt prefix computed once.

GPT-3 (Brown et al. 2020) classifies by comparing the likelihood of each label's continuation:

    score(x, y) = sum_j log p(l_y,j | prefix, query(x), l_y,<j)

    prefix (task description + demonstrations) ──> one forward, batch 1 ──> a KVCache row (P-1 slots)
                                                                                │ every row reads it first
    row b = [last prefix token] + query_b + label tokens but the last ──────────┴─> hidden (B, T, H)
                                                     LM head + log-softmax at the label positions only

The prefix's keys and values are computed once into deltatune's KV cache (`deltatune.decoding`, the
decode loop's cache type) and shared by every row through deltatune's attention functions (a
`PrefixContext`: [prefix ; row] keys at every layer, position ids continuing after the prefix), so
the cost of a few-shot prompt grows with the example, not with the demonstrations. `use_cache=False` runs each full prompt
instead (the reference the cache is tested against). Labels of one token share one row per query;
multi-token labels get one row per distinct label context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import arch_for, fingerprint_module, load_tokenizer, resolve_model_path
from deltatune.decoding.cache import CacheContext, KVCache, PrefixContext, attention_layers
from deltatune.errors import UserError
from deltatune.evaluate import autocast_for
from deltatune.fast.attention import KV_KWARG, kv_attention


@dataclass
class LanguageModel:
    """A frozen causal LM (`AutoModelForCausalLM`) with its tokenizer."""

    lm: nn.Module
    tokenizer: object
    model_path: str
    fingerprint: str
    family: str
    max_positions: int

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def load_language_model(model: str | None, device: str | torch.device = "cpu", seed: int = 0) -> LanguageModel:
    """A decoder from a folder or alias (default: the packaged SmolLM2-135M-Instruct), frozen, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_path = resolve_model_path(model or "smollm2")
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    arch = arch_for(config)
    if not arch.is_decoder:
        raise UserError(f"{model_path} is a {config.model_type} encoder; prompting needs a decoder "
                        "(llama, gpt2, ...), e.g. --model smollm2")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)  # an LM head missing from a checkpoint is initialised the same way every time
    try:
        lm = AutoModelForCausalLM.from_pretrained(model_path, config=config, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {model_path}: {str(exc).splitlines()[0]}") from exc
    lm.requires_grad_(False)
    lm.eval()
    lm.to(device)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
    return LanguageModel(lm=lm, tokenizer=load_tokenizer(model_path), model_path=model_path,
                         fingerprint=fingerprint_module(lm.base_model), family=arch.family,
                         max_positions=int(max_positions))


def start_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for some models, none for others)."""
    return list(tokenizer("")["input_ids"])


def _row_contexts(labels: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Label contexts (tokens but the last) covering every label, and which context serves each label.

    One-token labels all share the empty context: one row per query scores every label.
    """
    contexts = [tokens[:-1] for tokens in labels]
    kept: list[list[int]] = []
    for ctx in sorted(contexts, key=len, reverse=True):
        if not any(k[:len(ctx)] == ctx for k in kept):
            kept.append(ctx)
    owner = [next(j for j, k in enumerate(kept) if k[:len(ctx)] == ctx) for ctx in contexts]
    return kept, owner


class LabelScorer:
    """Scores every label continuation for many queries that share one prompt prefix."""

    def __init__(self, model: LanguageModel, labels: list[list[int]], batch_size: int = 32,
                 precision: str = "fp32", use_cache: bool = True, max_batch_tokens: int = 16384):
        if not labels or any(not tokens for tokens in labels):
            raise UserError("every label needs at least one token to score")
        self.model = model
        self.labels = labels
        self.contexts, self.owner = _row_contexts(labels)
        self.batch_size = batch_size
        self.precision = precision
        self.use_cache = use_cache
        self.max_batch_tokens = max_batch_tokens
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.max_label_tokens = max(len(tokens) for tokens in labels)

    @property
    def pad_id(self) -> int:
        tok = self.model.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def prompt_length(self, prefix: list[int], query: list[int]) -> int:
        """Tokens the model reads for the longest label: prefix + query + label tokens but the last."""
        return len(prefix) + len(query) + self.max_label_tokens - 1

    @torch.no_grad()
    def score(self, prefix: list[int], queries: list[list[int]]) -> torch.Tensor:
        """(N, K) float32: log p(label k | prefix + query n), summed over the label's tokens."""
        if not prefix:  # nothing before the first query token: give the model a start token
            tok = self.model.tokenizer
            prefix = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        cached = prefix[:-1] if self.use_cache else []
        tail = prefix[-1:] if self.use_cache else prefix
        kv = self._prefix_kv(cached) if cached else None
        rows: list[list[int]] = []
        targets: list[tuple[int, int, int, int, int]] = []  # (row, position, token, query, label)
        for n, query in enumerate(queries):
            for r, ctx in enumerate(self.contexts):
                first = len(tail) + len(query) - 1  # the position whose output predicts the label's first token
                for k, tokens in enumerate(self.labels):
                    if self.owner[k] == r:
                        targets += [(len(rows), first + j, t, n, k) for j, t in enumerate(tokens)]
                rows.append(tail + query + ctx)
        scores = torch.zeros(len(queries), len(self.labels), dtype=torch.float32)
        by_row: dict[int, list[tuple[int, int, int, int]]] = {}
        for row, pos, token, n, k in targets:
            by_row.setdefault(row, []).append((pos, token, n, k))
        for batch in self._batches(rows, len(cached)):
            logprobs = self._forward([rows[i] for i in batch], kv, len(cached),
                                     [by_row[i] for i in batch])
            for (_, _, n, k), value in zip([t for i in batch for t in by_row[i]], logprobs.tolist()):
                scores[n, k] += value
        return scores

    def _batches(self, rows: list[list[int]], cached_len: int) -> list[list[int]]:
        """Row indices, longest first, in batches bounded by rows and by (cached + row) tokens."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches: list[list[int]] = []
        for i in order:
            if batches:  # the first row of a batch is its longest
                last = batches[-1]
                width = cached_len + len(rows[last[0]])
                if len(last) < self.batch_size and (len(last) + 1) * width <= self.max_batch_tokens:
                    last.append(i)
                    continue
            batches.append([i])
        return batches

    def _prefix_kv(self, cached: list[int]) -> torch.Tensor:
        """Keys and values of the cached prefix, (1, L, 2, P, kv_dim); reused while it is the same."""
        key = tuple(cached)
        if self._cached is None or self._cached[0] != key:
            base = self.model.lm.base_model
            cache = KVCache.for_model(base, capacity=len(cached))
            n = torch.tensor([len(cached)], device=cache.device)
            context = CacheContext(cache, attention_layers(base), cache.add_rows(1), n, len(cached))
            ids = torch.tensor([cached], dtype=torch.long, device=cache.device)
            with autocast_for(cache.device, self.precision), kv_attention(base):
                base(input_ids=ids, position_ids=context.positions(), use_cache=False, **{KV_KWARG: context})
            context.finish()
            self._cached = (key, cache.as_prefix(0))
        return self._cached[1]

    def _forward(self, rows: list[list[int]], kv: torch.Tensor | None, cached_len: int,
                 wanted: list[list[tuple[int, int, int, int]]]) -> torch.Tensor:
        """Log-probabilities of the wanted tokens, flattened in the order of `wanted`."""
        device = self.model.device
        base = self.model.lm.base_model
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T): the prefix is always attended
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        kwargs = {"position_ids": (cached_len + torch.arange(width)).expand(len(rows), -1).to(device)}
        if kv is not None:  # every row continues the same prefix: its keys/values before the row's own
            kwargs[KV_KWARG] = PrefixContext(kv, attention_layers(base))
        with autocast_for(device, self.precision), kv_attention(base):
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                          **kwargs).last_hidden_state  # (B, T, H)
        picks = [(b, pos) for b, row_targets in enumerate(wanted) for pos, _, _, _ in row_targets]
        rows_idx = torch.tensor([b for b, _ in picks], device=device)
        pos_idx = torch.tensor([p for _, p in picks], device=device)
        tokens = torch.tensor([t for row_targets in wanted for _, t, _, _ in row_targets], device=device)
        head = self.model.lm.get_output_embeddings()
        logits = head(hidden[rows_idx, pos_idx].to(head.weight.dtype)).float()  # (M, V) at label positions only
        return logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0].cpu()  # (M,)


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al. 2021): q = normalise(p / p_cf), in log space.

    scores: (N, K) label log-likelihoods; content_free: (C, K) for the content-free inputs ("N/A", "",
    "[MASK]") in the same prompt. p_cf is their mean label distribution; W = diag(p_cf)^-1, b = 0.
    """
    p_cf = content_free.log_softmax(-1).exp().mean(0)  # (K,)
    return (scores.log_softmax(-1) - p_cf.clamp_min(1e-12).log()).log_softmax(-1)  # (N, K)
