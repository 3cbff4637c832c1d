"""In-context learning (Brown et al. 2020, GPT-3): a frozen decoder reads a task description and k
demonstrations, then scores each label's verbalizer words as the continuation of the query.

    zero-shot   description                     + query -> label?
    one-shot    description + 1 demonstration   + query -> label?
    few-shot    description + k demonstrations  + query -> label?

    random      k training examples drawn once (seeded): the same prefix for every query, so its
                keys/values are computed once (scoring.py) and few-shot costs about what zero-shot does
    retrieved   the k training examples nearest to the query by sentence embedding (Liu et al. 2022,
                "What makes good in-context examples for GPT-3?"), most similar last; one prefix per query

    predict     argmax_y log p(verbalizer(y) | prompt)
    calibrate   argmax_y p(y | x) / p_cf(y), p_cf from content-free inputs (Zhao et al. 2021)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltatune.data import Example
from deltatune.data.templates import CONTENT_FREE, PromptSpec, label_token_ids
from deltatune.errors import UserError
from deltatune.notune.index import VectorIndex, example_index, example_text
from deltatune.notune.prompts import PromptBuilder
from deltatune.notune.scoring import LabelScorer, LanguageModel, calibrate

SELECTIONS = ("random", "retrieved")
CHUNK = 128  # queries per scoring call (progress granularity)


class ICL:
    """The icl strategy: choose demonstrations (fit), then score label words for each input."""

    def __init__(self, lm: LanguageModel, spec: PromptSpec, config: Any, batch_size: int = 32,
                 precision: str = "fp32", max_length: int = 128, use_cache: bool = True, progress: bool = False):
        if config.shots < 0:
            raise UserError(f"shots must be 0 or more, not {config.shots}")
        if config.demos not in SELECTIONS:
            raise UserError(f"demos must be random or retrieved, not '{config.demos}'")
        self.lm, self.spec, self.config, self.progress = lm, spec, config, progress
        self.labels = label_token_ids(lm.tokenizer, spec.template, spec.words, spec.label_names)
        self.scorer = LabelScorer(lm, self.labels, batch_size, precision, use_cache)
        budget = min(config.max_prompt_tokens, lm.max_positions)
        self.builder = PromptBuilder(lm.tokenizer, spec, budget, max_length, config.demo_max_tokens,
                                     self.scorer.max_label_tokens)
        self.demos: list[tuple[int, Example]] = []  # random: (training index, example)
        self.index: VectorIndex | None = None  # retrieved: the training examples
        self._encoder = None
        self.stats: dict[str, float] = {}
        self.raw_scores: torch.Tensor | None = None  # before calibration (when calibrating): shows its effect

    @property
    def encoder(self):
        from deltatune.notune.encoder import TextEncoder

        if self._encoder is None:  # default: the encoder the saved index was built with, else MiniLM
            path = self.config.encoder or (self.index.encoder_info["path"] if self.index is not None else None)
            self._encoder = TextEncoder(path, device=self.lm.device)
        return self._encoder

    def fit(self, train: list[Example], seed: int) -> None:
        self.fit_examples = len(train) if self.config.shots and self.config.demos == "retrieved" else 0
        if self.config.shots == 0:
            return
        if self.config.demos == "random":
            chosen = random.Random(seed).sample(range(len(train)), min(self.config.shots, len(train)))
            self.demos = [(i, train[i]) for i in chosen]
        else:
            self.index = example_index(self.encoder, train, self.spec.label_names)

    def _content_free(self, prefix_len: int, pair: bool) -> list[list[int]]:
        return [self.builder.query(Example(text=c, text_pair="" if pair else None), prefix_len) for c in CONTENT_FREE]

    def scores(self, examples: list[Example]) -> torch.Tensor:
        """(N, K) log-probabilities over the labels (calibrated when asked); sets `stats`."""
        if self.index is not None:
            return self._scores_retrieved(examples)
        prefix, used = self.builder.fit_shared([e for _, e in self.demos])
        pair = any(e.text_pair is not None for e in examples)
        queries = [self.builder.query(e, len(prefix)) for e in examples]
        parts = [self.scorer.score(prefix, queries[i:i + CHUNK])
                 for i in tqdm(range(0, len(queries), CHUNK), desc=f"icl {self.config.shots}-shot",
                               disable=not self.progress, leave=False)]
        scores = torch.cat(parts) if parts else torch.zeros(0, len(self.labels))
        if self.config.calibrate:
            self.raw_scores = scores.log_softmax(-1)
            scores = calibrate(scores, self.scorer.score(prefix, self._content_free(len(prefix), pair)))
        lengths = [self.scorer.prompt_length(prefix, q) for q in queries]
        self.stats = {"shots_used": float(used), "prefix_tokens": float(len(prefix)),
                      "prompt_tokens": sum(lengths) / max(1, len(lengths))}
        return scores.log_softmax(-1)

    def _scores_retrieved(self, examples: list[Example]) -> torch.Tensor:
        shots = self.config.shots
        label_index = {name: i for i, name in enumerate(self.spec.label_names)}
        hits = self.index.query(self.encoder, [example_text(e.text, e.text_pair) for e in examples], shots + 1)
        out = torch.zeros(len(examples), len(self.labels))
        raw = torch.zeros(len(examples), len(self.labels))
        used, prefix_lens, lengths = [], [], []
        for n, (example, found) in enumerate(tqdm(list(zip(examples, hits)), desc=f"icl {shots}-shot retrieved",
                                                  disable=not self.progress, leave=False)):
            near = [h.record for h in found if h.record["text"] != example.text][:shots]  # never itself
            demos = [Example(text=r["text"], label=label_index[r["label"]], text_pair=r.get("text_pair"))
                     for r in reversed(near)]  # most similar last, next to the query
            prompt = self.builder.fit_one(demos, example)
            free = self._content_free(len(prompt.prefix), example.text_pair is not None) if self.config.calibrate else []
            scores = self.scorer.score(prompt.prefix, [prompt.query] + free)  # one prefix, its K/V computed once
            out[n] = calibrate(scores[:1], scores[1:])[0] if free else scores[0]
            raw[n] = scores[0]
            used.append(prompt.shots_used)
            prefix_lens.append(len(prompt.prefix))
            lengths.append(self.scorer.prompt_length(prompt.prefix, prompt.query))
        count = max(1, len(examples))
        self.stats = {"shots_used": sum(used) / count, "shots_used_min": float(min(used, default=0)),
                      "prefix_tokens": sum(prefix_lens) / count, "prompt_tokens": sum(lengths) / count}
        self.raw_scores = raw.log_softmax(-1) if self.config.calibrate else None
        return out.log_softmax(-1)

    def backbone(self) -> dict[str, Any]:
        return {"path": self.lm.model_path, "fingerprint": self.lm.fingerprint, "family": self.lm.family,
                "model_type": self.lm.lm.config.model_type, "pooling": "lm"}

    def total_params(self) -> int:
        return sum(p.numel() for p in self.lm.lm.parameters())

    def save(self, folder: Path) -> dict[str, Any]:
        """Write what predicting needs into the delta folder; returns the delta.json entry."""
        state: dict[str, Any] = {"prompt": self.spec.to_dict(), "label_token_ids": self.labels,
                                 "demonstrations": [{"index": i, "text": e.text, "text_pair": e.text_pair,
                                                     "label": self.spec.label_names[e.label]}
                                                    for i, e in self.demos]}
        if self.index is not None:
            self.index.save(folder / "index")
            state["index"] = "index"
        return state

    def restore(self, folder: Path, state: dict[str, Any]) -> None:
        label_index = {name: i for i, name in enumerate(self.spec.label_names)}
        self.demos = [(d["index"], Example(text=d["text"], label=label_index[d["label"]], text_pair=d.get("text_pair")))
                      for d in state.get("demonstrations", [])]
        if state.get("index"):
            self.index = VectorIndex.load(folder / state["index"])
