"""Train-step throughput and peak memory on all-MiniLM-L6-v2, batch 32 x sequence 128.

deltatune's full / lora / bitfit / head against the peers on the same batch, interleaved in one run:
peft's LoRA (same r, alpha, targets) and plain transformers full fine-tuning, same AdamW.

    .venv/bin/python benchmarks/train_step.py [--threads 2] [--rounds 5] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import machine_note, measure_memory_here, memory_in_child, time_interleaved  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402
from deltatune.train import build_optimizer  # noqa: E402

BATCH, SEQ, LR = 32, 128, 1e-4
PEERS = {"lora": "peft lora", "full": "transformers full"}


def fixed_batch(vocab_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def step_fn(module: torch.nn.Module, batch: dict, precision: str):
    optimizer = build_optimizer(module, LR, 0.01)
    module.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module(**batch).loss
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def deltatune_builder(method_name: str, precision: str):
    def build():
        tm = load_task_model("minilm", num_labels=2)
        method, config = resolve_method(method_name)
        method.apply(tm, config)
        return step_fn(tm.module, fixed_batch(tm.module.config.vocab_size), precision)
    return build


def peft_lora_builder(precision: str):
    def build():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                target_modules=["query", "value"]))
        return step_fn(model, fixed_batch(base.config.vocab_size), precision)
    return build


def hf_full_builder(precision: str):
    def build():
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
        return step_fn(model, fixed_batch(model.config.vocab_size), precision)
    return build


def builders(precision: str) -> dict:
    return {
        "deltatune full": deltatune_builder("full", precision),
        "transformers full": hf_full_builder(precision),
        "deltatune lora": deltatune_builder("lora", precision),
        "peft lora": peft_lora_builder(precision),
        "deltatune bitfit": deltatune_builder("bitfit", precision),
        "deltatune head": deltatune_builder("head", precision),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--memory-child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory_here(builders(args.precision)[args.memory_child])))
        return
    print(f"# train step, MiniLM, batch {BATCH} x seq {SEQ}, {args.precision}; {machine_note()}")
    memory = {name: memory_in_child(__file__, name, ["--threads", str(args.threads), "--precision", args.precision])
              for name in builders(args.precision)}
    seconds = time_interleaved(builders(args.precision), rounds=args.rounds, steps=args.steps)
    print("| variant | step ms | tokens/s | peak RSS MB (+ over baseline) | speed vs peer | memory vs peer |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in seconds.items():
        method = name.split()[-1]
        peer = PEERS.get(method) if name.startswith("deltatune") else None
        speed = f"{seconds[peer] / s:.2f}x" if peer else "–"
        mem = memory[name]
        mem_ratio = (f"{mem['increase_mb'] / memory[peer]['increase_mb']:.2f}x"
                     if peer and "error" not in mem and "error" not in memory[peer] else "–")
        mem_text = f"{mem['peak_mb']:.0f} (+{mem['increase_mb']:.0f})" if "error" not in mem else mem["error"]
        print(f"| {name} | {1000 * s:.0f} | {BATCH * SEQ / s:,.0f} | {mem_text} | {speed} | {mem_ratio} |")


if __name__ == "__main__":
    main()
