"""deltatune against trl's SFTTrainer + peft LoRA on the same rows and hyper-parameters, packing on for both.

    .venv/bin/python benchmarks/instruct_sft.py --task instruct --train-size 48 --val-size 32 \
        --max-length 256 --threads 1 --interleave-rounds 2 --interleave-steps 1 --json /tmp/instruct_sft.json

Both train LoRA (r 8, alpha 16, q/v projections, no dropout, fp32) on SmolLM2 for one epoch over the
same conversations (the same chat template, SmolLM2's default system prompt included) with the loss on
the answers only: deltatune through `run`'s training loop with --packing (rows of <= 256 tokens, about
--batch-size examples per step); trl with `packing=True` (best-fit decreasing, padding-free: a batch is
one flattened sequence with position restarts) on prompt/completion rows (loss on the completion), its
packed length and rows per step set to deltatune's, so both take about the same examples per step.

Two phases, in one process:
1. Quality: each trains the whole budget (one after the other, load average printed before and after);
   both final validation losses are computed the same way (deltatune's `evaluate_lm`: the mean over
   answer tokens, on the same encoded rows), with the base model's as a reference. trl's gradient
   checkpointing (on by default in SFTConfig) is turned off, as deltatune's is by default. The linear
   warm-up differs: transformers' first step has lr 0, deltatune's lr/warmup (felt on short runs only).
2. Speed: fresh models, the two training steps taking turns (--interleave-rounds rounds, each running
   --interleave-steps steps of each on the same batches), so both see the same machine load; the median
   round gives seconds per step and real (non-pad) tokens per second. trl's step is its own
   `training_step` (its loss plus the token-accuracy/entropy metrics it logs) + clipping + AdamW.
   `--only speed` runs this phase alone (`--only deltatune|trl` the first phase for one side).
Needs the `bench` extra: `.venv/bin/pip install -e ".[bench]"` (trl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import cpu_model, matmul_peak  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.batching import collate, train_batches  # noqa: E402
from deltatune.config import TrainConfig  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.generation import encode_lm, evaluate_lm, token_nll  # noqa: E402
from deltatune.packing import ROW_TOKENS, pack_rows, packed_batch_size  # noqa: E402
from deltatune.workflow import TrainJob, run_train_job  # noqa: E402

HYPER = {"lr": 1e-3, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.06, "weight_decay": 0.01, "max_grad_norm": 1.0}
DELTA_DIR = "/tmp/deltatune-bench-delta"


def peaks() -> dict:
    """fp32 and bf16 matmul GFLOP/s of SmolLM2's FFN shape on this run's threads."""
    return {d: round(matmul_peak(getattr(torch, d), 576), 1) for d in ("float32", "bfloat16")}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_trl(model_path: str, task, row_tokens: int, rows_per_step: int, seed: int, max_steps: int = -1,
             precision: str = "fp32"):
    """An SFTTrainer + peft LoRA on the task's conversations (prompt = every turn but the last)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = []
    for example in task.train:
        turns = [{"role": role, "content": content} for role, content in example.turns()]
        rows.append({"prompt": turns[:-1], "completion": turns[-1:]})
    config = SFTConfig(output_dir="/tmp/trl-bench", packing=True, max_length=row_tokens, use_cpu=True, report_to=[],
                       per_device_train_batch_size=rows_per_step, learning_rate=HYPER["lr"],
                       num_train_epochs=HYPER["epochs"], max_steps=max_steps,
                       warmup_steps=HYPER["warmup_ratio"],  # transformers 5: a float < 1 is a ratio of the steps
                       weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["max_grad_norm"],
                       lr_scheduler_type="linear", save_strategy="no", logging_steps=1, seed=seed,
                       bf16=precision == "bf16", fp16=False, dataloader_num_workers=0, disable_tqdm=True,
                       gradient_checkpointing=False)  # trl's default is on; deltatune's is off: the same work
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config)


def lm_loss(model, rows, pad_id: int) -> float:
    """evaluate_lm's number for a plain transformers model: mean NLL per answer token of the encoded rows."""
    model.eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = collate(rows[i:i + 8], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, n = token_nll(logits, batch["labels"], shift=True)
            nll, tokens = nll + s, tokens + n
    return nll / tokens


def deltatune_steps(model_path: str, train_rows, seed: int, precision: str = "fp32"):
    """(step functions over deltatune's packed batches, real tokens per batch): run_train_job's loop body."""
    from deltatune.evaluate import autocast_for
    from deltatune.fast import autocast_precision, prepare, training_forward
    from deltatune.methods import resolve_method

    tm = load_task_model(model_path, 0, pooling="lm", seed=seed)
    method, config = resolve_method("lora")  # r 8, alpha 16, query + value, no dropout
    method.apply(tm, config)
    prepare(tm, precision, "auto", "auto")
    amp = autocast_precision(tm, precision)
    packed = pack_rows(train_rows, ROW_TOKENS)
    per_step = packed_batch_size(train_rows, packed, HYPER["batch_size"])
    batches = [[packed[i] for i in b] for b in train_batches([len(r.input_ids) for r in packed], per_step, seed)]
    params = [p for p in tm.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    forward, pad = training_forward(tm), tm.tokenizer.pad_token_id
    tm.module.train()

    def step(rows) -> None:
        with autocast_for(tm.device(), amp):
            loss = forward(collate(rows, pad)).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    real = [sum(len(r.input_ids) for r in b) for b in batches]  # packed rows hold no padding
    return step, batches, real


def trl_steps(model_path: str, task, rows_per_step: int, seed: int, precision: str = "fp32"):
    """(trl's training step, its batches, real tokens per batch): Trainer.training_step + clip + AdamW."""
    trainer = make_trl(model_path, task, ROW_TOKENS, rows_per_step, seed, max_steps=1000, precision=precision)
    batches = list(trainer.get_train_dataloader())
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    model = trainer.accelerator.prepare_model(trainer.model)  # as train() does: bf16 wraps forward in autocast
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch) -> None:
        inputs = trainer._prepare_inputs(batch)
        items = (inputs["labels"] != -100).sum()
        trainer.training_step(model, inputs, items)
        torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    real = [int(b["input_ids"].numel()) for b in batches]  # padding-free: one sequence, no pad
    return step, batches, real


def time_to_loss(curve: list[dict], target: float, peer_seconds: float) -> dict:
    """deltatune's training seconds at its first validation with a loss <= the peer's final one."""
    reached = next((h for h in curve if h["loss"] <= target), None)
    if reached is None:
        return {"reached": False, "target": target}
    return {"reached": True, "target": target, "step": reached["step"], "seconds": reached["train_seconds"],
            "ratio_to_peer_time": reached["train_seconds"] / peer_seconds}


def interleaved(variants: dict, rounds: int, steps: int) -> dict:
    """Each variant runs its first `steps` batches once to warm up, then the variants take turns."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step, batches, _ in variants.values():
        for b in batches[:steps]:
            step(b)
    for r in range(rounds):
        for name, (step, batches, _) in variants.items():
            start = time.perf_counter()
            for b in batches[:steps]:
                step(b)
            times[name].append(time.perf_counter() - start)
            print(f"round {r} {name}: {times[name][-1]:.1f} s, load {load()}", file=sys.stderr, flush=True)
    out = {}
    for name, (_, _, real) in variants.items():
        seconds = statistics.median(times[name])
        tokens = sum(real[:steps])
        out[name] = {"round_seconds": times[name], "seconds_per_step": seconds / steps,
                     "real_tokens_per_step": tokens / steps, "real_tokens_per_s": tokens / seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="instruct")
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: deltatune's --precision bf16, trl's bf16=True (autocast)")
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed (LoRA init, data order)")
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="deltatune validates every N steps (outside its clock): the time to reach trl's final loss")
    parser.add_argument("--only", choices=("deltatune", "trl", "both", "speed"), default="both",
                        help="whole runs of one side, of both, or none (speed: the interleaved steps only)")
    parser.add_argument("--interleave-rounds", type=int, default=3, help="0 skips the speed phase")
    parser.add_argument("--interleave-steps", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = str(resolve_model_path(args.model))
    task = load_task(args.task, train_size=args.train_size, val_size=args.val_size, test_size=6)  # run_train_job
    # tests (and decodes) this split after training: outside train_seconds, kept small
    base = load_task_model(model_path, 0, pooling="lm")
    pad = base.tokenizer.pad_token_id
    val_rows = encode_lm(base.tokenizer, task.validation, args.max_length, "validation")
    train_rows = encode_lm(base.tokenizer, task.train, args.max_length, "train")
    train_tokens = sum(len(r.input_ids) for r in train_rows)
    packed = pack_rows(train_rows, args.max_length)
    rows_per_step = packed_batch_size(train_rows, packed, HYPER["batch_size"])
    out = {"command": " ".join(sys.argv), "cpu": cpu_model(), "threads": args.threads, "train_rows": len(task.train),
           "train_tokens": train_tokens, "longest_row": max(len(r.input_ids) for r in train_rows),
           "packed_rows": len(packed), "rows_per_step": rows_per_step, "hyper": HYPER,
           "base_validation_loss": evaluate_lm(base, val_rows)["loss"], "precision": args.precision,
           "matmul_peak_gflops_start": peaks()}
    del base
    if args.only in ("deltatune", "both"):
        config = TrainConfig(**HYPER, max_length=args.max_length, packing=True, precision=args.precision,
                             progress=False, seed=args.seed, eval_steps=args.eval_steps)
        before, start = load(), time.perf_counter()
        metrics = run_train_job(TrainJob(method="lora", task=task, model=model_path, train=config,
                                         options={"target_modules": "query,value"}), DELTA_DIR)
        wall = time.perf_counter() - start
        meta = json.loads((Path(DELTA_DIR) / "delta.json").read_text())
        seconds = meta["history"][-1]["train_seconds"]  # the training steps only, as trainer.train() (no evaluation)
        steps = math.ceil(len(packed) / rows_per_step) * HYPER["epochs"]
        out["deltatune"] = {"train_seconds": seconds, "steps": steps, "seconds_per_step": seconds / steps,
                            "validation_loss": metrics["validation_loss"], "real_tokens_per_s": train_tokens / seconds,
                            "wall_seconds_incl_test": wall, "load_before": before, "load_after": load(),
                            "curve": [{k: h[k] for k in ("step", "loss", "train_seconds")} for h in meta["history"]]}
        print(f"deltatune: {json.dumps(out['deltatune'])}", file=sys.stderr, flush=True)
    if args.only in ("trl", "both"):
        trainer = make_trl(model_path, task, min(args.max_length, ROW_TOKENS), rows_per_step, args.seed,
                           precision=args.precision)
        trl_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        before, start = load(), time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        steps = trainer.state.global_step
        out["trl"] = {"train_seconds": seconds, "steps": steps, "seconds_per_step": seconds / steps,
                      "validation_loss": lm_loss(trainer.model, val_rows, pad), "train_tokens_trl": trl_tokens,
                      "packed_sequences": len(trainer.train_dataset), "real_tokens_per_s": trl_tokens / seconds,
                      "final_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
                                                None),
                      "load_before": before, "load_after": load()}
        print(f"trl: {json.dumps(out['trl'])}", file=sys.stderr, flush=True)
        del trainer
    if args.only in ("both", "speed") and args.interleave_rounds > 0:
        variants = {"deltatune": deltatune_steps(model_path, train_rows, 0, args.precision),
                    "trl": trl_steps(model_path, task, rows_per_step, 0, args.precision)}
        before = load()
        out["interleaved"] = interleaved(variants, args.interleave_rounds, args.interleave_steps)
        out["interleaved"]["load_before"], out["interleaved"]["load_after"] = before, load()
        out["interleaved"]["speedup_tokens_per_s"] = (out["interleaved"]["deltatune"]["real_tokens_per_s"]
                                                      / out["interleaved"]["trl"]["real_tokens_per_s"])
    if "deltatune" in out and "trl" in out:
        out["time_to_trl_loss"] = time_to_loss(out["deltatune"]["curve"], out["trl"]["validation_loss"],
                                               out["trl"]["train_seconds"])
    out["load_average_end"], out["matmul_peak_gflops_end"] = load(), peaks()
    text = json.dumps(out, indent=2, default=lambda v: v if not isinstance(v, float) or math.isfinite(v) else None)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
