"""Deltas written by an earlier deltatune (format version 1, before the Method contract) keep loading,
value for value: tests/data/legacy/ was written by scripts/make_legacy_deltas.py from that version."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from deltatune.loading import load_delta

LEGACY = Path(__file__).parent / "data" / "legacy"
CASES = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


def test_the_legacy_set_covers_every_delta_kind():
    assert {c.split("-", 1)[1] for c in CASES} >= {"lora", "adalora", "ia3", "adapter", "prompt", "ptuning",
                                                   "prefix", "bitfit", "mam"}


@pytest.mark.parametrize("case", CASES)
def test_legacy_delta_loads_with_its_logits(tiny_dir, case):
    kind = case.split("-", 1)[0]
    with tiny.torch_threads(1):
        loaded = load_delta(LEGACY / case, model=tiny_dir(kind))
        tm = loaded.task_model
        inputs = dict(tm.tokenizer(["good movie", "the plot was very dull and boring", "a"], padding=True,
                                   return_tensors="pt"))
        with torch.no_grad():
            logits = tm.module(**inputs).logits
    expected = load_file(str(LEGACY / case / "expected.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
