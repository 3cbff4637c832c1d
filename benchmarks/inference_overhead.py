"""Inference overhead of each trained delta against the bare backbone (the seed's inference-overhead column).

    .venv/bin/python benchmarks/inference_overhead.py [--deltas runs/compare-all/deltas] [--rows 256] [--threads 1]

Every delta folder under --deltas (what `deltatune compare` leaves in OUT/deltas/) is reloaded with
`load_delta`, and its forward is timed against a freshly loaded bare backbone with the same kind of
head, on the same rotten-tomatoes test rows, by `deltatune.evaluate.inference_overhead` (this process's
CPU time, the two models alternating batch by batch, median of rounds): the same measurement
`deltatune train` makes after training. No-tuning strategies (icl, knn) have no tensor delta and are
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import machine_note  # noqa: E402

from deltatune.backbone import load_task_model  # noqa: E402
from deltatune.batching import encode  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.delta import read_meta  # noqa: E402
from deltatune.evaluate import inference_overhead  # noqa: E402
from deltatune.loading import load_delta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", default="runs/compare-all/deltas")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("rotten-tomatoes", train_size=100, val_size=50, test_size=args.rows)
    print(f"# inference overhead vs the bare backbone, {args.rows} rotten-tomatoes test texts, batch "
          f"{args.batch_size}, CPU time, median of {args.rounds} rounds; {machine_note()}")
    print("| method | trainable params | delta ms/ex | backbone ms/ex | overhead |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for folder in sorted(p for p in Path(args.deltas).iterdir() if (p / "delta.safetensors").exists()):
        meta = read_meta(folder)
        loaded = load_delta(folder)
        backbone = meta["backbone"]
        plain = load_task_model(backbone["path"], num_labels=meta["num_labels"], pooling=backbone["pooling"])
        encoded = encode(plain.tokenizer, task.test, 128)
        timing = inference_overhead(loaded.task_model, plain, encoded, args.batch_size, args.rounds)
        params = meta.get("metrics", {}).get("trainable_params")
        rows.append({"method": folder.name, "trainable_params": params, **timing})
        print(f"| {folder.name} | {params:,} | {timing['inference_ms_per_example']:.2f} | "
              f"{timing['backbone_ms_per_example']:.2f} | {timing['inference_overhead_pct']:+.1f}% |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
