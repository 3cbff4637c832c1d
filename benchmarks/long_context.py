"""Long-sequence generation training: peak memory and tokens/s of deltatune against peft + autocast.

Each (method, length, variant) runs in its own child process: batch 1, a sequence of exactly `length`
tokens, labels on its second half (the shape of an instruction row), a few optimizer steps.

    deltatune   the default training path (bf16 frozen weights where the CPU runs bf16, deltatune's
                attention: blockwise above the size where P would be large, the chunked LM-head loss,
                SwiGLU and RMSNorm keeping only their inputs, the freed heap returned to the OS before
                each step's forward: deltatune/fast/)
    peer        peft's LoRA (r 8, alpha 16, q/v, as deltatune's defaults) on transformers' causal LM,
                SDPA, inside torch.autocast(bfloat16); for `full`, transformers alone + autocast

Peak memory is the resident set's peak above the child's baseline (after imports, before the model).

    .venv/bin/python benchmarks/long_context.py --model smollm2 --methods lora,full \
        --lengths 256,512,1024,2048,4096 --json OUT [--budget-mb 4000] [--steps 2] [--warmup 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def batch_of(length: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(100, vocab, (1, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt half is not scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def deltatune_step(model: str, method_name: str, length: int):
    from deltatune import fast
    from deltatune.backbone import load_task_model
    from deltatune.config import TrainConfig
    from deltatune.methods import resolve_method

    tm = load_task_model(model, num_labels=0, pooling="lm")
    method, config = resolve_method(method_name)
    method.apply(tm, config)
    fast.prepare_for_training(tm, TrainConfig())
    forward = fast.training_forward(tm)
    batch = batch_of(length, tm.module.config.vocab_size)
    params = [p for p in tm.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tm.module.train()

    def step() -> None:
        forward({**batch, "keys": None}).loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peer_step(model: str, method_name: str, length: int):
    from transformers import AutoModelForCausalLM

    from deltatune.backbone import resolve_model_path

    module = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), attn_implementation="sdpa")
    if method_name == "lora":
        import peft

        module = peft.get_peft_model(module, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                             target_modules=["q_proj", "v_proj"]))
    batch = batch_of(length, module.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    module.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def child(variant: str, model: str, method: str, length: int, steps: int, warmup: int = 1) -> dict:
    from deltatune.memory import PeakMemory

    build = deltatune_step if variant == "deltatune" else peer_step
    with PeakMemory() as peak:
        step = build(model, method, length)
        for _ in range(warmup):  # allocations, first-call costs
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    return {"mb": peak.increase_mb, "tokens_per_s": length / seconds, "seconds_per_step": seconds}


def run_child(variant: str, args, method: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--methods", method,
           "--lengths", str(length), "--steps", str(args.steps), "--threads", str(args.threads),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["failed"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (0: the first "
                        "step is timed, for long sequences whose step takes minutes)")
    parser.add_argument("--budget-mb", type=float, default=4000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.model, args.methods, lengths[0], args.steps, args.warmup)))
        return
    from fast_step import matmul_peak  # noqa: E402
    from harness import cpu_model, machine_note

    from deltatune.backbone import load_task_model

    hidden = load_task_model(args.model, num_labels=0, pooling="lm").module.config.hidden_size
    peaks = {d: matmul_peak(getattr(torch, d), hidden) for d in ("float32", "bfloat16")}
    cpu = cpu_model()
    print(f"# {cpu}; {machine_note()}; matmul peak fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    rows = []
    print(f"{'method':<6} {'length':>6} {'deltatune MB':>12} {'peer MB':>8} {'mem ratio':>9} "
          f"{'deltatune tok/s':>15} {'peer tok/s':>10} {'speed ratio':>11}")
    for method in args.methods.split(","):
        for length in lengths:
            ours, peer = run_child("deltatune", args, method, length), run_child("peer", args, method, length)
            row = {"method": method, "length": length, "deltatune_mb": ours.get("mb"), "peer_mb": peer.get("mb"),
                   "deltatune_tokens_per_s": ours.get("tokens_per_s"), "peer_tokens_per_s": peer.get("tokens_per_s"),
                   "errors": {k: v["error"] for k, v in (("deltatune", ours), ("peer", peer)) if "error" in v}}
            ok = row["deltatune_mb"] is not None and row["peer_mb"] is not None
            row["memory_ratio"] = row["deltatune_mb"] / row["peer_mb"] if ok else None
            row["speed_ratio"] = (row["deltatune_tokens_per_s"] / row["peer_tokens_per_s"]
                                  if row["deltatune_tokens_per_s"] and row["peer_tokens_per_s"] else None)
            rows.append(row)

            def f(x, spec):
                return format(x, spec) if x is not None else "-"

            print(f"{method:<6} {length:>6} {f(row['deltatune_mb'], '12.0f')} {f(row['peer_mb'], '8.0f')} "
                  f"{f(row['memory_ratio'], '9.2f')} {f(row['deltatune_tokens_per_s'], '15.1f')} "
                  f"{f(row['peer_tokens_per_s'], '10.1f')} {f(row['speed_ratio'], '11.2f')}"
                  + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
    for method in args.methods.split(","):
        for who in ("deltatune", "peer"):
            fits = [r["length"] for r in rows if r["method"] == method and r[f"{who}_mb"] is not None
                    and r[f"{who}_mb"] <= args.budget_mb]
            print(f"longest {method} length within {args.budget_mb:.0f} MB, {who}: {max(fits) if fits else 'none'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
