"""Examples -> token ids -> padded batches, grouped by length so that little compute goes to padding.

Training batches: shuffle (seeded), cut into pools of 50 batches, sort each pool by length, cut into
batches, shuffle the batch order. Each batch is padded to its own longest row, not to max_length.
Evaluation batches: sorted by length; results are put back in the input order by the caller.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from deltatune.data import Example

POOL_BATCHES = 50


@dataclass
class Encoded:
    """One tokenized example. `key` identifies it across epochs (for caches)."""

    key: str
    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | None
    token_labels: list[int] | None = None
    """Language-model rows: the target id of each token (-100: not scored, e.g. prompt tokens)."""
    position_ids: list[int] | None = None
    """Packed rows (packing.py): each example's positions from 0; token_labels are then already shifted
    (the target of each position), collated as `shift_labels` with no attention mask."""


def encode(tokenizer, examples: list[Example], max_length: int, split: str = "x") -> list[Encoded]:
    """Tokenize single texts or text pairs, truncated to max_length tokens."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    kwargs = {"truncation": True, "max_length": max_length}
    if any(p is not None for p in pairs):
        out = tokenizer(texts, [p or "" for p in pairs], **kwargs)
    else:
        out = tokenizer(texts, **kwargs)
    token_types = out.get("token_type_ids")
    return [Encoded(key=f"{split}:{i}", input_ids=ids,
                    token_type_ids=token_types[i] if token_types is not None else None,
                    label=examples[i].label)
            for i, ids in enumerate(out["input_ids"])]


def train_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Length-bucketed, shuffled batches of indices; every index appears exactly once."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = batch_size * POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lambda i: lengths[i])
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices sorted by length (longest first, so a memory problem shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Pad to the longest row (right padding). Returns tensors plus the rows' keys."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row.input_ids)] = torch.tensor(row.input_ids)
        attention_mask[i, :len(row.input_ids)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if rows[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            token_type_ids[i, :len(row.token_type_ids)] = torch.tensor(row.token_type_ids)
        batch["token_type_ids"] = token_type_ids.to(device)
    if rows[0].label is not None:
        batch["labels"] = torch.tensor([r.label for r in rows], dtype=torch.long, device=device)
    if rows[0].token_labels is not None:  # padded to their own longest row (seq2seq targets differ)
        labels = torch.full((len(rows), max(len(r.token_labels) for r in rows)), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, :len(row.token_labels)] = torch.tensor(row.token_labels)
        batch["labels"] = labels.to(device)
    if rows[0].position_ids is not None:  # packed: the position restarts make the block-diagonal mask
        positions = torch.zeros((len(rows), width), dtype=torch.long)  # padding: its own run from 0
        for i, row in enumerate(rows):
            n = len(row.position_ids)
            positions[i, :n] = torch.tensor(row.position_ids)
            positions[i, n:] = torch.arange(width - n)
        batch["position_ids"] = positions.to(device)
        batch["shift_labels"] = batch["labels"]
        del batch["attention_mask"]
        batch["use_cache"] = False  # transformers reads packing from the positions only without a KV cache
    batch["keys"] = [r.key for r in rows]
    return batch
