"""Fixed, seeded, stratified train/validation/test splits and stratified subsampling.

Everything here works on index lists and per-example group keys (the label name, or ``None`` for
generation tasks), so it knows nothing about the example type. Randomness comes only from
``random.Random`` instances seeded with ints or strings, which is reproducible across processes
(string seeds are hashed with SHA-512, never with Python's salted ``hash()``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from fractions import Fraction

SPLIT_SEED = 0
"""Seed of the corpus split itself: fixed so that the test set never changes between runs."""

VALIDATION_FRACTION = Fraction(1, 10)
TEST_FRACTION = Fraction(1, 10)


def round_half_up(value: Fraction) -> int:
    """Round to the nearest integer, halves going up (Python's round() would go to even)."""
    return math.floor(value + Fraction(1, 2))


def apportion(
    total: int,
    weights: Sequence[int],
    minimums: Sequence[int] | None = None,
    caps: Sequence[int] | None = None,
) -> list[int]:
    """Split ``total`` units over groups in proportion to ``weights`` (largest-remainder method).

    Each group gets at least ``minimums[i]`` and at most ``caps[i]`` units (a minimum above its cap is
    lowered to the cap). The result sums to ``total`` unless the caps or minimums make that
    impossible, in which case it gets as close as they allow. Ties go to the heavier group, then to
    the earlier one, so the result is fully deterministic.
    """
    group_count = len(weights)
    caps = list(caps) if caps is not None else [total] * group_count
    minimums = [min(low, cap) for low, cap in zip(minimums or [0] * group_count, caps)]
    weight_sum = sum(weights)
    ideal = [Fraction(total * weight, weight_sum) if weight_sum else Fraction(0) for weight in weights]
    allocation = [min(cap, max(low, math.floor(share))) for share, low, cap in zip(ideal, minimums, caps)]

    while sum(allocation) < total:
        open_groups = [i for i in range(group_count) if allocation[i] < caps[i]]
        if not open_groups:
            break
        chosen = max(open_groups, key=lambda i: (ideal[i] - allocation[i], weights[i], -i))
        allocation[chosen] += 1
    while sum(allocation) > total:
        reducible = [i for i in range(group_count) if allocation[i] > minimums[i]]
        if not reducible:
            break
        chosen = min(reducible, key=lambda i: (ideal[i] - allocation[i], weights[i], -i))
        allocation[chosen] -= 1
    return allocation


def group_positions(group_keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of each group key, groups in order of first appearance, positions ascending."""
    positions: dict[Hashable, list[int]] = {}
    for position, key in enumerate(group_keys):
        positions.setdefault(key, []).append(position)
    return positions


def split_indices(group_keys: Sequence[Hashable]) -> tuple[list[int], list[int], list[int]]:
    """Split examples into train 80% / validation 10% / test 10%, stratified by group key.

    Uses the fixed ``SPLIT_SEED``, so the same corpus always gives the same split. Every group keeps
    at least one example in train, so a label seen in validation or test is always seen in train.
    Returns (train, validation, test) lists of indices into ``group_keys``, each in shuffled order.
    """
    rng = random.Random(SPLIT_SEED)
    groups = group_positions(group_keys)
    counts = [len(positions) for positions in groups.values()]
    corpus_size = len(group_keys)

    validation_counts = apportion(
        round_half_up(corpus_size * VALIDATION_FRACTION), counts, caps=[count - 1 for count in counts]
    )
    test_counts = apportion(
        round_half_up(corpus_size * TEST_FRACTION),
        counts,
        caps=[count - 1 - taken for count, taken in zip(counts, validation_counts)],
    )

    train: list[int] = []
    validation: list[int] = []
    test: list[int] = []
    for positions, validation_count, test_count in zip(groups.values(), validation_counts, test_counts):
        shuffled = list(positions)
        rng.shuffle(shuffled)
        validation.extend(shuffled[:validation_count])
        test.extend(shuffled[validation_count : validation_count + test_count])
        train.extend(shuffled[validation_count + test_count :])
    for indices in (train, validation, test):
        rng.shuffle(indices)
    return train, validation, test


def subsample_indices(group_keys: Sequence[Hashable], size: int, seed: int, split_name: str) -> list[int]:
    """Pick ``size`` positions of a split, stratified by group key, deterministic given ``seed``.

    Each group gets a share proportional to its size and at least one example when ``size`` allows
    it. The random stream depends on ``seed`` and ``split_name`` only, so resizing one split does not
    change what is drawn from another. If ``size`` covers the whole split, the split is returned as is.
    """
    if size >= len(group_keys):
        return list(range(len(group_keys)))
    rng = random.Random(f"deltatune-subsample:{seed}:{split_name}")
    groups = group_positions(group_keys)
    counts = [len(positions) for positions in groups.values()]
    minimum = 1 if size >= len(groups) else 0
    taken_counts = apportion(size, counts, minimums=[minimum] * len(counts), caps=counts)

    chosen: list[int] = []
    for positions, taken in zip(groups.values(), taken_counts):
        shuffled = list(positions)
        rng.shuffle(shuffled)
        chosen.extend(shuffled[:taken])
    rng.shuffle(chosen)
    return chosen
