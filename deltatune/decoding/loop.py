"""deltatune's decode loop: sequences of different tasks in one batch, each with its own KV-cache row.

    add(seq)     a sequence waits to join: its prompt ids, its task (the row routers' name), soft tokens
                 (spliced into its prompt's embeddings), a prefix (its first cache slots), its LM head,
                 its sampling settings
    step()       1. prefill: the waiting sequences' prompts in one forward (right-padded, each row at
                    positions len_b + t), their first tokens
                 2. decode: one token for every sequence that was already running, one forward, T = 1
                 finished sequences (a stop id, max_new_tokens) leave; their cache rows are compacted
    -> [(seq, token)] of this step

Every forward is the bare decoder called with use_cache=False, explicit position ids and a
`CacheContext` under fast/attention's KV_KWARG: the attention functions read and write deltatune's
`KVCache`, never transformers' cache argument. Per-row deltas (LoRA, AdaLoRA, IA³, adapters) are the
engine's row routers, told the row tasks whenever the set of rows in a forward changes.

Sampling per row: greedy when temperature = 0, else softmax(z / temperature) cut to top_k, then to the
smallest set with probability ≥ top_p (transformers' order), drawn with the row's own torch.Generator
(seeded): a row's tokens do not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.decoding.cache import CacheContext, KVCache, attention_layers
from deltatune.errors import UserError
from deltatune.fast.attention import KV_KWARG, kv_attention
from deltatune.methods.prompt import splice_soft_tokens


@dataclass
class Sampling:
    """How one sequence picks its tokens."""

    max_new_tokens: int = 64
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = 0
    """Only the k most likely tokens (0: all)."""
    seed: int | None = None
    """Seed of the sequence's own generator (None: a random one)."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end the sequence (kept as its last token)."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


@dataclass(eq=False)
class Sequence:
    """One prompt being continued."""

    ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    task: str | None = None
    """The task whose row-routed deltas apply to this row (None: the bare backbone)."""
    soft_tokens: tuple[torch.Tensor, int] | None = None
    """(P (n, H), insert position) of prompt / P-tuning tasks."""
    prefix: torch.Tensor | None = None
    """(L, 2, n, kv_dim) of prefix tasks: the first n slots of the row's cache."""
    head: nn.Module | None = None
    """The LM head (None: the decoder's)."""
    new: list[int] = field(default_factory=list)
    """Tokens generated so far."""
    done: bool = False
    generator: torch.Generator | None = None
    logits: list[torch.Tensor] | None = None
    """When a list: receives the (V,) logits of every step (tests compare them)."""


class Decoder:
    """The step-level loop over one decoder (`model`: the bare transformer, `head` its default LM head)."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None, routers: Iterable = ()):
        self.model, self.head = model, head
        self.layer_of = attention_layers(model)
        self.routers = list(routers)
        self.cache = KVCache.for_model(model)
        self.device = self.cache.device
        self.live: list[Sequence] = []
        """Running sequences, in cache-row order."""
        self.waiting: list[Sequence] = []
        self.row_tasks: list[str | None] | None = None  # what the routers were last told
        self.max_positions = max_positions_of(model.config)
        self._attention = kv_attention(model)
        self._attention.__enter__()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the routers and give the model its attention implementation back."""
        if self.row_tasks is not None:
            for router in self.routers:
                router.end()
            self.row_tasks = None
        if self._attention is not None:
            self._attention.__exit__(None, None, None)
            self._attention = None

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting)

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it joins the batch at the next step."""
        seq.sampling.check()
        if not seq.ids and seq.soft_tokens is None:
            raise UserError("a prompt needs at least one token")
        if seq.sampling.temperature > 0 and seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            if seq.sampling.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(seq.sampling.seed)
        if self.max_positions is not None:
            length = (len(seq.ids) + (0 if seq.soft_tokens is None else seq.soft_tokens[0].shape[0])
                      + (0 if seq.prefix is None else seq.prefix.shape[2]) + seq.sampling.max_new_tokens - 1)
            if length > self.max_positions:
                raise UserError(f"prompt and new tokens need {length} positions, the model has {self.max_positions}: "
                                "shorten the prompt or max_new_tokens")
        self.waiting.append(seq)
        return seq

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int]]:
        """Prefill the waiting sequences and advance the running ones by one token each."""
        produced: list[tuple[Sequence, int]] = []
        running = len(self.live)
        if running:
            last = torch.tensor([[s.new[-1]] for s in self.live], device=self.device)  # (B, 1)
            ones = torch.ones(running, dtype=torch.long, device=self.device)
            hidden = self._forward(self.live, slice(0, running), ones, input_ids=last)[:, 0]  # (B, H)
            produced += self._choose(self.live, hidden)
        if self.waiting:
            joining, self.waiting = self.waiting, []
            rows = self.cache.add_rows(len(joining), [s.prefix for s in joining])
            embeds, counts = self._prompt_embeddings(joining)  # (P, T, H), (P,)
            hidden = self._forward(joining, rows, counts, inputs_embeds=embeds)  # (P, T, H)
            last = hidden[torch.arange(len(joining), device=self.device), counts - 1]  # (P, H)
            produced += self._choose(joining, last)
            self.live += joining
        keep = [i for i, s in enumerate(self.live) if not s.done]
        if len(keep) < len(self.live):
            self.cache.keep(keep)
            self.live = [self.live[i] for i in keep]
        return produced

    def drop(self, seq: Sequence) -> None:
        """Take a sequence out between steps (a cancelled request, a stop string): its cache row is freed."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.live:
            keep = [i for i, s in enumerate(self.live) if s is not seq]
            self.cache.keep(keep)
            self.live = [self.live[i] for i in keep]
        seq.done = True

    def run(self) -> None:
        """Step until every sequence has finished."""
        while self.busy:
            self.step()

    # ---- internals -------------------------------------------------------------------------------------

    def _prompt_embeddings(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt embeddings with each row's soft tokens spliced in, and each row's length."""
        width = max(len(s.ids) for s in seqs) or 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)  # (P, T)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            mask[b, :len(s.ids)] = 1
        embeds = self.model.get_input_embeddings()(ids)  # (P, T, H)
        if any(s.soft_tokens is not None for s in seqs):
            embeds, mask, _ = splice_soft_tokens(embeds, mask, None, [s.soft_tokens for s in seqs])
        return embeds, mask.sum(1)

    def _forward(self, seqs: list[Sequence], rows: slice, new: torch.Tensor, **inputs) -> torch.Tensor:
        """One forward of these sequences' rows, `new` (B,) real tokens each: (B, T, H) hidden states."""
        tasks = [s.task for s in seqs]
        if tasks != self.row_tasks:
            for router in self.routers:
                router.end()  # begin() may keep the last batch's rows when none of these rows is its task's
                router.begin(tasks)
            self.row_tasks = tasks
        first = next(iter(inputs.values()))
        context = CacheContext(self.cache, self.layer_of, rows, new, first.shape[1])
        out = self.model(**inputs, position_ids=context.positions(), use_cache=False, **{KV_KWARG: context})
        context.finish()
        return out.last_hidden_state

    def _choose(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[tuple[Sequence, int]]:
        """hidden (B, H) of each row's last position -> each row's next token; marks finished rows."""
        logits = self._logits(seqs, hidden)  # (B, V) float32
        greedy = logits.argmax(-1).tolist()
        produced = []
        for b, s in enumerate(seqs):
            if s.logits is not None:
                s.logits.append(logits[b])
            token = greedy[b] if s.sampling.temperature == 0 else sample(logits[b], s.sampling, s.generator)
            s.new.append(token)
            s.done = token in s.sampling.stop_ids or len(s.new) >= s.sampling.max_new_tokens
            produced.append((s, token))
        return produced

    def _logits(self, seqs: list[Sequence], hidden: torch.Tensor) -> torch.Tensor:
        heads: dict[object, tuple[nn.Module, list[int]]] = {}
        for b, s in enumerate(seqs):
            head = s.head if s.head is not None else self.head
            heads.setdefault(head_key(head), (head, []))[1].append(b)
        if len(heads) == 1:
            head = next(iter(heads.values()))[0]
            return head(hidden.to(head.weight.dtype)).float()
        parts = []
        for head, rows in heads.values():
            index = torch.tensor(rows, device=hidden.device)
            parts.append((index, head(hidden.index_select(0, index).to(head.weight.dtype)).float()))
        logits = hidden.new_empty(len(seqs), parts[0][1].shape[1], dtype=torch.float32)  # (B, V)
        for index, part in parts:
            logits[index] = part
        return logits


def head_key(head: nn.Module) -> object:
    """Heads that compute the same function share one matmul: bias-free Linears over one weight (every
    served task's own module around the shared LM head) read the (V, H) weight once per step, not per task."""
    if type(head) is nn.Linear and head.bias is None:
        return ("linear", id(head.weight))
    return id(head)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from logits (V,): temperature, then top-k, then top-p, then a draw with `generator`."""
    z = logits.float() / sampling.temperature  # (V,)
    if 0 < sampling.top_k < z.shape[0]:
        z = z.masked_fill(z < z.topk(sampling.top_k).values[-1], float("-inf"))
    if sampling.top_p < 1:
        ordered, order = z.sort()  # ascending
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(z.softmax(-1), 1, generator=generator))


def max_positions_of(config) -> int | None:
    """Learned absolute position tables (GPT-2) cap a sequence's length; rotary models have no cap here."""
    if getattr(config, "model_type", "") in ("gpt2",):
        return getattr(config, "n_positions", None)
    return None


def decode(decoder: Decoder, seqs: list[Sequence]) -> list[list[int]]:
    """Run these sequences to the end together (others may already be running): their new tokens."""
    for s in seqs:
        decoder.add(s)
    while not all(s.done for s in seqs):
        decoder.step()
    return [s.new for s in seqs]
