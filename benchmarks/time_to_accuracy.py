"""Time to accuracy on rotten-tomatoes: `deltatune compare` (the fast path, its defaults) against the same
methods trained with peft's defaults, on the same split, same epochs, learning rates and schedule.

    peer: peft's default config (lora, prompt) or plain transformers (full), fp32, the model's dropout,
          SDPA, batches in random order padded to their longest row (what transformers' Trainer does
          with DataCollatorWithPadding), AdamW + linear warm-up/decay like deltatune's loop
    ours: `deltatune compare --methods lora,prompt,full` with default flags

Both evaluate on validation after each epoch and keep the best epoch for test. Reported per method:
the peer's best validation accuracy and the training time it took (evaluation excluded, both
sides), the time deltatune took to first reach that accuracy, and both test accuracies.

    .venv/bin/python benchmarks/time_to_accuracy.py [--methods lora,prompt,full] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fast_step import peer_model  # noqa: E402

from deltatune.data import load_task  # noqa: E402
from deltatune.methods import REGISTRY  # noqa: E402
from deltatune.train import build_optimizer, seed_everything, warmup_linear  # noqa: E402

SIZES = {"train_size": 2000, "val_size": 500, "test_size": 1000}


def encode(tokenizer, examples, max_length: int) -> list[tuple[list[int], int]]:
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return [(row, e.label) for row, e in zip(ids, examples)]


def collate(rows, pad_id: int) -> dict:
    width = max(len(r) for r, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, _) in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in rows])}


@torch.no_grad()
def accuracy(model, rows, pad_id: int, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id)
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def train_peer(method: str, task, epochs: int, batch_size: int, seed: int, max_length: int) -> dict:
    """The peer's loop: per epoch, training seconds so far and validation accuracy; test at the best epoch."""
    from transformers import AutoTokenizer

    from deltatune.backbone import resolve_model_path

    seed_everything(seed)
    model, pad_id = peer_model("minilm", method)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    train, val, test = (encode(tokenizer, split, max_length) for split in (task.train, task.validation, task.test))
    optimizer = build_optimizer(model, REGISTRY[method].DEFAULT_LR, 0.01)
    steps = math.ceil(len(train) / batch_size) * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(steps, 0.06))
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    history, best, clock = [], (-1.0, None), 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        start = time.perf_counter()
        for i in range(0, len(order), batch_size):
            loss = model(**collate([train[j] for j in order[i:i + batch_size]], pad_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        clock += time.perf_counter() - start
        score = accuracy(model, val, pad_id)
        history.append({"epoch": epoch, "accuracy": score, "train_seconds": clock})
        print(f"peer {method} epoch {epoch}: validation {score:.4f}, {clock:.0f} s", file=sys.stderr, flush=True)
        if score > best[0]:
            best = (score, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in best[1].items():
            named[name].copy_(value)
    return {"history": history, "test_accuracy": accuracy(model, test, pad_id)}


def run_ours(methods: list[str], epochs: int, threads: int, seed: int, out: Path) -> dict:
    argv = [sys.executable, "-m", "deltatune", "compare", "--methods", ",".join(methods), "--task", "rotten-tomatoes",
            "--epochs", str(epochs), "--threads", str(threads), "--seed", str(seed), "--out", str(out),
            "--no-progress", *[f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]]
    print(" ".join(argv[1:]), file=sys.stderr)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for row in json.loads((out / "results.json").read_text()):
        meta = json.loads((out / "deltas" / row["method"] / "delta.json").read_text())
        results[row["method"]] = {"history": meta["history"], "test_accuracy": row["accuracy"],
                                  "precision": row.get("precision"), "fast_path": row.get("fast_path")}
    return results


def first_reaching(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if h["accuracy"] >= target - 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="lora,prompt,full")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/time_to_accuracy")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    load = os.getloadavg()[0]
    ours = run_ours(methods, args.epochs, args.threads, args.seed, Path(args.out))
    task = load_task("rotten-tomatoes", seed=args.seed, **SIZES)
    peers = {m: train_peer(m, task, args.epochs, 32, args.seed, 128) for m in methods}
    print(f"# time to accuracy, rotten-tomatoes {SIZES}, {args.epochs} epochs, threads {args.threads}, "
          f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}")
    print("| method | peer best val | peer time to it | deltatune time to it | speed-up | peer test | "
          "deltatune test | Δ test | deltatune precision |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in methods:
        peer, mine = peers[m], ours[m]
        best = max(peer["history"], key=lambda h: h["accuracy"])
        reached = first_reaching(mine["history"], best["accuracy"])
        mine_time = f"{reached['train_seconds']:.0f} s (epoch {reached['epoch']})" if reached else "not reached"
        speedup = f"{best['train_seconds'] / reached['train_seconds']:.2f}x" if reached else "–"
        delta = 100 * (mine["test_accuracy"] - peer["test_accuracy"])
        print(f"| {m} | {best['accuracy']:.4f} | {best['train_seconds']:.0f} s (epoch {best['epoch']}) | {mine_time} | "
              f"{speedup} | {peer['test_accuracy']:.4f} | {mine['test_accuracy']:.4f} | {delta:+.1f} pt | "
              f"{mine['precision']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "peers": peers, "load": load}, indent=2))


if __name__ == "__main__":
    main()
