"""Scale-out on all-MiniLM-L6-v2: tokens/s of LoRA and full fine-tuning for 1 process x 1 thread, 1 process x
2 threads and 2 processes x 1 thread (DDP over gloo), at the same global batch; bytes all-reduced per step.

Each configuration runs in fresh processes (2 processes: `python -m torch.distributed.run --standalone`).
A step is the training loop's own: each rank's rows of the global batch -> loss x (my count / global
count) -> backward -> `deltatune.distributed.all_reduce_grads` (a no-op in one process) -> clip -> AdamW.

    .venv/bin/python benchmarks/scaling.py [--batch 32] [--seq 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import machine_note  # noqa: E402

from deltatune import distributed  # noqa: E402
from deltatune.backbone import load_task_model  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402
from deltatune.train import build_optimizer  # noqa: E402

CONFIGS = [(1, 1), (1, 2), (2, 1)]
"""(processes, threads per process)."""
METHODS = {"lora": {}, "full": {}}
LR = 1e-4
RESULTS = os.path.join(os.path.dirname(__file__), "results", "scaling.json")


def worker(method_name: str, threads: int, batch: int, seq: int, steps: int, warmup: int) -> None:
    world, _ = distributed.setup("cpu")
    torch.set_num_threads(threads)
    task_model = load_task_model(None, num_labels=2, pooling="hf", device="cpu", seed=0)
    method, config = resolve_method(method_name, METHODS[method_name])
    method.apply(task_model, config)
    module = task_model.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module, LR, 0.01)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, module.config.vocab_size, (batch, seq), generator=g)  # (B, T): the global batch
    labels = torch.randint(0, 2, (batch,), generator=g)
    mine = slice(world.rank, None, world.size)  # this rank's rows, as the loop takes them
    inputs = {"input_ids": ids[mine], "attention_mask": torch.ones_like(ids[mine]), "labels": labels[mine]}
    share = inputs["input_ids"].shape[0] / batch
    sent = 0

    def step() -> None:
        nonlocal sent
        loss = module(**inputs).loss * share
        loss.backward()
        sent = distributed.all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        distributed.barrier()
        start = time.perf_counter()
        step()
        distributed.barrier()
        times.append(time.perf_counter() - start)
    if world.main:
        seconds = statistics.median(times)
        print(json.dumps({"method": method_name, "processes": world.size, "threads": threads,
                          "seconds_per_step": seconds, "tokens_per_s": batch * seq / seconds,
                          "trainable_params": sum(p.numel() for p in params),
                          "allreduce_bytes_per_step": sent if world.active else distributed.gradient_bytes(params)}))
    distributed.teardown()


def run(method: str, processes: int, threads: int, args) -> dict:
    script = [os.path.abspath(__file__), "--worker", method, "--threads", str(threads), "--batch", str(args.batch),
              "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launcher, *script], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"method": method, "processes": processes, "threads": threads,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="global batch (rows per step over all ranks)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=list(METHODS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.batch, args.seq, args.steps, args.warmup)
        return
    rows = [run(method, p, t, args) for method in METHODS for p, t in CONFIGS]
    print(f"# {machine_note()}; global batch {args.batch} x {args.seq} tokens, median of {args.steps} steps")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:5} {row['processes']} proc x {row['threads']} thread: error {row['error']}")
            continue
        base = next(r for r in rows if r["method"] == row["method"] and (r["processes"], r["threads"]) == (1, 1))
        cores = row["processes"] * row["threads"]
        row["scaling_efficiency"] = row["tokens_per_s"] / (cores * base["tokens_per_s"]) if "error" not in base \
            else None
        print(f"{row['method']:5} {row['processes']} proc x {row['threads']} thread: "
              f"{row['tokens_per_s']:8.0f} tokens/s ({row['seconds_per_step']:.3f} s/step), efficiency "
              f"{row['scaling_efficiency']:.2f}, all-reduce {row['allreduce_bytes_per_step'] / 2**20:.3f} MiB/step "
              f"({row['trainable_params']:,} trainable)")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"machine": machine_note(), "batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
