"""No-tuning strategies vs prompt-based and head-based LoRA on rotten-tomatoes (the README table).

    python benchmarks/notune_accuracy.py --out benchmarks/results/notune_accuracy.json [--only icl,knn,lora]

Every row is what `deltatune train` produces (workflow.run_train_job), on the same fixed test split:
  icl   zero-shot, one-shot, 8-shot random, 8-shot retrieved (SmolLM2-135M-Instruct), each scored once
        with calibration: `accuracy` is calibrated, `uncalibrated_accuracy` the same run without it
  knn   all-MiniLM-L6-v2 + FAISS over the training texts
  lora  SmolLM2 + LoRA with 16/64/256 training examples per class, --objective verbalizer (PET/LM-BFF)
        against --objective head (a new classification head), same steps and learning rate
--seed picks the demonstrations and the few-shot training examples (and seeds training); the test
examples are the same for every seed. Results are appended to --out as they finish, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.data.templates import PromptArgs
from deltatune.io import write_json_atomic
from deltatune.workflow import TrainJob, run_train_job

POOL = 2000  # training examples available to icl (demonstrations) and knn, as `compare` uses
ICL_RUNS = [("0-shot", 0, "random"), ("1-shot", 1, "random"), ("8-shot random", 8, "random"),
            ("8-shot retrieved", 8, "retrieved")]
PER_CLASS = [(16, 10), (64, 5), (256, 2)]  # (training examples per class, epochs): 40/80/128 steps of 8


def balanced(examples, per_class: int, seed: int):
    """`per_class` examples of each label, drawn with a seeded RNG (LM-BFF's K examples per class)."""
    rng = random.Random(seed)
    out = []
    for label in sorted({e.label for e in examples}):
        out += rng.sample([e for e in examples if e.label == label], per_class)
    rng.shuffle(out)
    return out


def jobs(test_size: int, precision: str, seed: int):
    """(name, TrainJob) pairs in the order of the README table."""
    task = load_task("rotten-tomatoes", train_size=POOL, test_size=test_size)  # the same test set for every seed
    base = {"precision": precision, "seed": seed, "progress": False}
    for name, shots, demos in ICL_RUNS:
        yield f"icl {name}", TrainJob("icl", task, options={"shots": shots, "demos": demos, "calibrate": True},
                                      train=TrainConfig(eval_batch_size=32, **base))
    yield "knn (k=10)", TrainJob("knn", task, train=TrainConfig(**base))
    full = load_task("rotten-tomatoes", test_size=test_size)
    for per_class, epochs in PER_CLASS:
        few = replace(full, train=balanced(full.train, per_class, seed),
                      validation=balanced(full.validation, 16, seed))  # 32 to pick the epoch
        config = TrainConfig(epochs=epochs, batch_size=8, eval_batch_size=32, **base)
        for objective in ("verbalizer", "head"):
            yield (f"lora {objective} {per_class}/class",
                   TrainJob("lora", few, model="smollm2", train=config, prompt=PromptArgs(objective=objective)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/notune_accuracy.json")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", default="/tmp/deltatune-notune-runs", help="where the deltas go")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    wanted = [w for w in args.only.split(",") if w]
    for name, job in jobs(args.test_size, args.precision, args.seed):
        key = f"{name} (seed {args.seed})"
        if key in done or (wanted and not any(name.startswith(w) for w in wanted)):
            continue
        start = time.perf_counter()
        metrics = run_train_job(job, Path(args.runs) / key.replace(" ", "_").replace("/", "-"))
        metrics["wall_seconds"] = time.perf_counter() - start
        done[key] = metrics
        write_json_atomic(out, done)
        print(f"{key}: accuracy {metrics['accuracy']:.4f}"
              + (f" (uncalibrated {metrics['uncalibrated_accuracy']:.4f})" if "uncalibrated_accuracy" in metrics else "")
              + f", {metrics['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
