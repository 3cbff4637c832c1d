"""--packing: several short examples in one training sequence, each attending to itself only.

    example a (5 tokens), b (3), c (4)  ->  one row of 12 tokens, no padding
    input_ids      a a a a a b b b c c c c
    position_ids   0 1 2 3 4 0 1 2 0 1 2 3          restart per example: rotary / learned positions as alone
    mask           block-diagonal causal            transformers builds it from the position restarts
                                                     (`find_packed_sequence_indices`, no attention_mask given)
    shift_labels   a₁a₂a₃a₄ ∅ b₁b₂ ∅ c₁c₂c₃ ∅        label t is the target of position t: an example's last
                                                     position predicts nothing (never the next example)

So every example's logits and loss equal those of the example alone (tested within fp32 tolerance).
Rows are packed best-fit decreasing into sequences of at most ROW_TOKENS tokens (a longer example gets
a row of its own); a batch then holds
about as many examples as --batch-size unpacked rows would (`packed_batch_size`), so the optimizer
sees the same number of examples per step. The remainder of a batch's shorter rows is padding in its
own position run, a segment nothing else attends to, with labels -100.
"""

from __future__ import annotations

import bisect

from deltatune.batching import Encoded
from deltatune.errors import UserError
from deltatune.rendering import IGNORE

ROW_TOKENS = 256
"""Packed row length. A packed row's attention reads, per block of queries, only the keys of the examples
in that block (fast/spans.py): with ~100-token examples a row of 256 computes ~40% of its T x T scores.
Rows of 512 ran 0.84x as fast as rows of 256 on `instruct` (past 512 x 512 scores attention recomputes
its probabilities in backward, fast/blockwise.py); rows of 256 ran 1.07x the real tokens/s of
length-bucketed batches there (benchmarks/RESULTS.md, session 13)."""


def refuse_packing(method, seq2seq: bool, generation: bool) -> None:
    """--packing applies to generation on decoders, with methods that add no per-row virtual tokens."""
    if not generation:
        raise UserError("--packing applies to generation tasks (classification rows are scored one per sequence)")
    if seq2seq:
        raise UserError("--packing applies to decoder models; an encoder-decoder (T5) trains one example per row")
    if method.ROW_INPUT is not None:
        raise UserError(f"--packing with method '{method.NAME}': its {method.ROW_INPUT.replace('_', ' ')} would sit "
                        "once at the start of a packed row, not before each example; train without --packing")


def pack_rows(rows: list[Encoded], max_length: int = ROW_TOKENS, row_tokens: int = ROW_TOKENS) -> list[Encoded]:
    """Packed rows of at most min(max_length, row_tokens) tokens (best-fit decreasing): token_labels hold
    each example's shifted labels, position_ids its own positions from 0."""
    max_length = min(max_length, row_tokens)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = len(rows[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))  # the fullest bin with room
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - size, len(bins) - 1))
    packed = []
    for b, members in enumerate(bins):
        ids, positions, labels = [], [], []
        for i in members:
            row = rows[i]
            ids += row.input_ids
            positions += range(len(row.input_ids))
            labels += list(row.token_labels[1:]) + [IGNORE]  # shifted within the example
        packed.append(Encoded(key=f"pack:{b}", input_ids=ids, token_type_ids=None, label=None, token_labels=labels,
                              position_ids=positions))
    return packed


def packed_batch_size(rows: list[Encoded], packed: list[Encoded], batch_size: int) -> int:
    """Packed rows per batch so that a batch holds about `batch_size` examples, as unpacked."""
    return max(1, round(batch_size * len(packed) / max(1, len(rows))))
