"""Write the deltas that tests/test_legacy_deltas.py must keep loading: run with the deltatune version whose
format is to be frozen (e.g. `PYTHONPATH=/path/to/old/checkout python scripts/make_legacy_deltas.py`).

Each tests/data/legacy/<kind>-<method>/ holds a delta (as that version saved it) and `expected.safetensors`:
the logits that version computed for a fixed batch, so a later version is checked value for value.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT / "tests"))

import tiny  # noqa: E402

from deltatune.backbone import load_task_model  # noqa: E402
from deltatune.delta import save_delta  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402

CASES = [("bert", m) for m in ("lora", "adalora", "ia3", "adapter", "prompt", "ptuning", "prefix", "bitfit", "mam")] + [
    ("llama", m) for m in ("lora", "ia3", "prompt", "prefix")] + [("gpt2", "lora")]
TEXTS = ["good movie", "the plot was very dull and boring", "a"]


def batch(tokenizer) -> dict:
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def main(out: Path = ROOT / "tests" / "data" / "legacy") -> None:
    models = Path(tempfile.mkdtemp())
    for kind, name in CASES:
        torch.manual_seed(0)
        tm = load_task_model(tiny.make_model_dir(models, kind), num_labels=2, pooling="hf")
        method, config = resolve_method(name)
        method.apply(tm, config)
        tiny.perturb(tm.module)
        tm.module.eval()
        with torch.no_grad():
            logits = tm.module(**batch(tm.tokenizer)).logits
        folder = out / f"{kind}-{name}"
        save_delta(folder, tm, method, config, {"task": {"name": "toy", "kind": "classification",
                                                         "label_names": ["neg", "pos"]}})
        save_file({"logits": logits.contiguous()}, str(folder / "expected.safetensors"))
        print(folder, tuple(logits.shape))


if __name__ == "__main__":
    main()
