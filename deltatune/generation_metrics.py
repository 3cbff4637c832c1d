"""What a generation user reads besides the loss: replies decoded greedily and scored against the references.

    exact match   normalise(reply) == normalise(reference)          lower case, whitespace collapsed, end
                                                                    punctuation dropped
    ROUGE-L       F-measure of the longest common subsequence of words (Lin 2004; `rouge-score`, stemmed)
    chrF          character n-gram F-score (Popović 2015; `sacrebleu`, corpus level, 0-100)
    accuracy      where the answers are label words (a few distinct short answers, each repeated): the
                  label word the reply names first equals the reference (an instruction-tuned classifier)

Examples with a `group` (the `instruct` task: a sub-task and whether its phrasing was seen in training)
are also scored per group, under "groups".
"""

from __future__ import annotations

import re
from collections import defaultdict

from deltatune.data import Example

LABEL_WORDS_MAX = 20
"""At most this many distinct answers, each of at most LABEL_WORD_MAX_WORDS words, make a label set."""
LABEL_WORD_MAX_WORDS = 3
GENERATION_SCORES = ("exact_match", "rouge_l", "chrf", "accuracy", "groups", "samples")
"""The keys `generation_metrics` may return."""
MAX_NEW_TOKENS = 128
"""Replies are decoded up to the longest reference plus a few tokens, at most this many."""


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


def label_words(targets: list[str]) -> list[str] | None:
    """The label set when the references are label words, else None."""
    distinct = sorted({normalise(t) for t in targets})
    if not 1 < len(distinct) <= LABEL_WORDS_MAX or len(targets) < 2 * len(distinct):
        return None
    return distinct if all(len(d.split()) <= LABEL_WORD_MAX_WORDS for d in distinct) else None


def named_label(reply: str, labels: list[str]) -> str | None:
    """The label word that comes first in the reply (whole words), or None."""
    text = normalise(reply)
    found = [(m.start(), label) for label in labels
             for m in [re.search(rf"\b{re.escape(label)}\b", text)] if m is not None]
    return min(found)[1] if found else None


def score_texts(replies: list[str], references: list[str]) -> dict[str, float]:
    """exact_match, rouge_l, chrf (and accuracy when the references are label words) of replies."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    n = max(1, len(replies))
    scores = {
        "exact_match": sum(normalise(r) == normalise(t) for r, t in zip(replies, references)) / n,
        "rouge_l": sum(scorer.score(t, r)["rougeL"].fmeasure for r, t in zip(replies, references)) / n,
        "chrf": sacrebleu.corpus_chrf(replies, [references]).score if replies else 0.0,
    }
    labels = label_words(references)
    if labels is not None:
        scores["accuracy"] = sum(named_label(r, labels) == normalise(t) for r, t in zip(replies, references)) / n
    return scores


def generation_metrics(task_model, examples: list[Example], max_new_tokens: int | None = None,
                       samples: int = 3) -> dict:
    """Scores of greedy replies to each example's conversation before its last answer; a few samples shown."""
    from deltatune.generation import generate_texts

    if not examples:
        return {}
    tokenizer = task_model.tokenizer
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.target or "", add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = min(MAX_NEW_TOKENS, longest + 4)
    prompts = [e.turns()[:-1] for e in examples]
    replies = generate_texts(task_model, prompts, max_new_tokens=max_new_tokens)
    references = [e.target or "" for e in examples]
    metrics: dict = score_texts(replies, references)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        if example.group:
            groups[example.group].append(i)
    if groups:
        metrics["groups"] = {name: {"examples": len(idx), **score_texts([replies[i] for i in idx],
                                                                        [references[i] for i in idx])}
                             for name, idx in sorted(groups.items())}
    metrics["samples"] = [{"prompt": examples[i].text, "reply": replies[i], "reference": references[i]}
                          for i in range(min(samples, len(examples)))]
    return metrics


def describe(metrics: dict) -> str:
    """"exact match 0.41, ROUGE-L 0.52, chrF 38.1, accuracy 0.80" (what is there)."""
    parts = [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in (
        ("exact_match", "exact match", ".4f"), ("rouge_l", "ROUGE-L", ".4f"), ("chrf", "chrF", ".1f"),
        ("accuracy", "accuracy", ".4f")) if key in metrics]
    return ", ".join(parts)
