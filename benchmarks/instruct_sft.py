"""deltatune against trl's SFTTrainer + peft LoRA on the same rows and hyper-parameters, packing on for both.

    .venv/bin/python benchmarks/instruct_sft.py --task chatterbot --train-size 940 --threads 2

Both train LoRA (r 8, alpha 16, q/v projections, fp32) on SmolLM2 for one epoch over the same
conversations with the loss on the answers only: deltatune through `run`'s training loop with
--packing; trl with `packing=True` (its best-fit-decreasing packing, padding-free) on prompt/completion
rows, whose loss covers the completion only. Reported: wall time of training, real (non-pad) tokens
per second, and both final validation losses computed the same way (deltatune's `evaluate_lm`: the mean
over answer tokens, on the same encoded rows). Needs the `bench` extra: `.venv/bin/pip install -e ".[bench]"` (trl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import cpu_model  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.config import TrainConfig  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.generation import encode_lm, evaluate_lm  # noqa: E402
from deltatune.workflow import TrainJob, run_train_job  # noqa: E402

HYPER = {"lr": 1e-3, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.06, "weight_decay": 0.01, "max_grad_norm": 1.0}


def run_trl(model_path: str, task, max_length: int, seed: int) -> tuple[object, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": e.text}], "completion": [{"role": "assistant", "content": e.target}]}
            for e in task.train]
    config = SFTConfig(output_dir="/tmp/trl-bench", packing=True, max_length=max_length, use_cpu=True, report_to=[],
                       per_device_train_batch_size=HYPER["batch_size"], learning_rate=HYPER["lr"],
                       num_train_epochs=HYPER["epochs"], warmup_ratio=HYPER["warmup_ratio"],
                       weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["max_grad_norm"],
                       lr_scheduler_type="linear", save_strategy="no", logging_steps=10, seed=seed,
                       bf16=False, fp16=False, dataloader_num_workers=0)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="chatterbot")
    parser.add_argument("--train-size", type=int, default=940)
    parser.add_argument("--val-size", type=int, default=118)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("deltatune", "trl", "both"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = str(resolve_model_path(args.model))
    task = load_task(args.task, train_size=args.train_size, val_size=args.val_size, test_size=16)
    base = load_task_model(model_path, 0, pooling="lm")
    val_rows = encode_lm(base.tokenizer, task.validation, args.max_length, "validation")
    train_tokens = sum(len(r.input_ids) for r in encode_lm(base.tokenizer, task.train, args.max_length, "train"))
    out = {"cpu": cpu_model(), "threads": args.threads, "train_rows": len(task.train), "train_tokens": train_tokens,
           "hyper": HYPER, "base_validation_loss": evaluate_lm(base, val_rows)["loss"]}
    if args.only in ("deltatune", "both"):
        config = TrainConfig(**HYPER, max_length=args.max_length, packing=True, precision="fp32", progress=False,
                             seed=0)
        load = os.getloadavg()
        metrics = run_train_job(TrainJob(method="lora", task=task, model=model_path, train=config,
                                         options={"target_modules": "query,value"}), "/tmp/deltatune-bench-delta")
        meta = json.loads((Path("/tmp/deltatune-bench-delta") / "delta.json").read_text())
        seconds = meta["history"][-1]["train_seconds"]  # the training steps only, as trainer.train() (no evaluation)
        out["deltatune"] = {"train_seconds": seconds, "validation_loss": metrics["validation_loss"],
                            "real_tokens_per_s": train_tokens / seconds, "load_average_before": load}
    if args.only in ("trl", "both"):
        load = os.getloadavg()
        model, seconds = run_trl(model_path, task, args.max_length, 0)
        model.eval()
        nll = tokens = 0.0
        from deltatune.batching import collate
        from deltatune.generation import token_nll

        with torch.no_grad():  # the same rows and the same token-weighted mean as evaluate_lm
            for i in range(0, len(val_rows), 8):
                batch = collate(val_rows[i:i + 8], base.tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s, n = token_nll(logits, batch["labels"], shift=True)
                nll, tokens = nll + s, tokens + n
        out["trl"] = {"train_seconds": seconds, "validation_loss": nll / tokens,
                      "real_tokens_per_s": train_tokens / seconds, "load_average_before": load}
    out["load_average_after"] = os.getloadavg()
    if "trl" in out and "deltatune" in out:
        out["speedup"] = out["deltatune"]["real_tokens_per_s"] / out["trl"]["real_tokens_per_s"]
    print(json.dumps(out, indent=2, default=lambda v: v if not isinstance(v, float) or math.isfinite(v) else None))


if __name__ == "__main__":
    main()
