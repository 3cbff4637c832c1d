"""Epoch time of `head` and `last2` with and without frozen-prefix caching (MiniLM, rotten-tomatoes).

    .venv/bin/python benchmarks/frozen_cache.py [--train-size 2000] [--epochs 3] [--threads 2]

The cached run pays for one forward pass of the frozen bottom over train + validation, then each
epoch runs only the trainable top; the uncached run pushes every batch through the whole network.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import machine_note  # noqa: E402

from deltatune.backbone import load_task_model  # noqa: E402
from deltatune.batching import encode  # noqa: E402
from deltatune.config import TrainConfig  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.evaluate import evaluate  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402
from deltatune.train import train_model  # noqa: E402


def run(method_name: str, cache: str, task, epochs: int) -> dict:
    tm = load_task_model("minilm", num_labels=len(task.label_names))
    method, config = resolve_method(method_name)
    method.apply(tm, config)
    train = encode(tm.tokenizer, task.train, 128, "train")
    val = encode(tm.tokenizer, task.validation, 128, "validation")
    test = encode(tm.tokenizer, task.test, 128, "test")
    result = train_model(tm, method, config, train, val, TrainConfig(epochs=epochs, cache=cache, progress=False))
    return {"seconds": result.train_seconds, "accuracy": evaluate(tm, test)["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("rotten-tomatoes", train_size=args.train_size, val_size=500, test_size=1000)
    print(f"# frozen-prefix cache, MiniLM, {task.summary()}, {args.epochs} epochs; {machine_note()}")
    print("| method | cache | train s (incl. validation) | s/epoch | test accuracy | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("head", "last2"):
        off = run(name, "off", task, args.epochs)
        on = run(name, "memory", task, args.epochs)
        for label, r in (("off", off), ("memory", on)):
            speed = f"{off['seconds'] / r['seconds']:.2f}x"
            print(f"| {name} | {label} | {r['seconds']:.1f} | {r['seconds'] / args.epochs:.1f} | "
                  f"{r['accuracy']:.4f} | {speed} |")


if __name__ == "__main__":
    main()
