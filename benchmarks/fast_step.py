"""Train-step throughput of deltatune's fast path against peft's default recipes, batch 32 x sequence 128.

For each method, three variants are built and timed round-robin in one process (`harness.py`):

    deltatune   the default training path (precision auto -> bf16 frozen weights + fp32 trainable,
                explicit attention, dropout auto -> 0, fused frozen q/k/v; --compile adds torch.compile)
    peer        peft's default config for the method (lora, prompt, prefix, ia3) or plain transformers
                (full: every weight trains; bitfit: the biases train), fp32, the model's dropout, SDPA
    peer+amp    the same peer inside torch.autocast(bfloat16)

The fp32 and bf16 matmul peaks are measured in the same run (a (4096 x H) x (H x 4H) matmul, the
FFN's shape), and each variant's executed FLOPs per step are counted (torch FlopCounterMode), so
the table shows the share of the bf16 peak each variant reaches.

    .venv/bin/python benchmarks/fast_step.py --model minilm [--methods lora,prompt] [--threads 2]
        [--rounds 3] [--memory lora] [--compile] [--together --relative-to lora]

    # #20: DoRA, VeRA, LoHa, LoKr against LoRA, deltatune's and peft's, all interleaved in one set
    .venv/bin/python benchmarks/fast_step.py --methods lora,dora,vera,loha,lokr --together --relative-to lora \
        --memory lora,dora,vera,loha,lokr --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import harness  # noqa: E402
from harness import machine_note, measure_memory_here, memory_in_child, time_interleaved  # noqa: E402
from train_step import step_fn  # noqa: E402

from deltatune import fast  # noqa: E402
from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.config import TrainConfig  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402

BATCH, SEQ = 32, 128
METHODS = ("lora", "adalora", "prompt", "ptuning", "prefix", "ia3", "bitfit", "full")
PREFIX_TOKENS = 10  # deltatune's prefix default; peft's PrefixTuningConfig has no default


def fixed_batch(vocab_size: int, pad_id: int | None) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (BATCH, SEQ), generator=g)
    if pad_id is not None:
        input_ids[input_ids == pad_id] = pad_id + 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def deltatune_builder(model: str, method_name: str, compile_: bool):
    def build():
        tm = load_task_model(model, num_labels=2)
        method, config = resolve_method(method_name)
        method.apply(tm, config)
        fast.prepare_for_training(tm, TrainConfig(compile=compile_))
        batch = fixed_batch(tm.module.config.vocab_size, tm.tokenizer.pad_token_id)
        if not compile_:
            return step_fn(tm.module, batch, "fp32")  # fp32 here means: no autocast on top
        forward = fast.training_forward(tm)
        optimizer = torch.optim.AdamW([p for p in tm.module.parameters() if p.requires_grad], lr=1e-4)
        tm.module.train()

        def step() -> None:
            forward({**batch, "keys": None}).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    return build


def peer_model(model: str, method_name: str):
    """The peer for a method: peft's default config on the transformers model, or transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=pad_id)
    if method_name == "full":
        return base, pad_id
    if method_name == "bitfit":  # peft has no BitFit: biases (and the head) train
        for name, p in base.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.startswith(("classifier", "score")))
        return base, pad_id
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS"),
        "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=PREFIX_TOKENS),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
        "adalora": lambda: peft.AdaLoraConfig(task_type="SEQ_CLS", total_step=1000),  # peft requires total_step
        "ptuning": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
        # the LoRA variants (#20): peft's defaults, on the layers peft's LoRA picks by default (q, v)
        "dora": lambda: peft.LoraConfig(task_type="SEQ_CLS", use_dora=True),
        "vera": lambda: peft.VeraConfig(task_type="SEQ_CLS"),
        "loha": lambda: peft.LoHaConfig(task_type="SEQ_CLS", target_modules=peft_default_targets(base)),
        "lokr": lambda: peft.LoKrConfig(task_type="SEQ_CLS", target_modules=peft_default_targets(base)),
    }
    return peft.get_peft_model(base, configs[method_name]()), pad_id


def peft_default_targets(base) -> list[str]:
    """The module names peft's LoRA adapts by default for this architecture (LoHa/LoKr have no default)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[base.config.model_type])


def peer_builder(model: str, method_name: str, precision: str):
    def build():
        module, pad_id = peer_model(model, method_name)
        return step_fn(module, fixed_batch(module.config.vocab_size, pad_id), precision)
    return build


def builders(model: str, method_name: str, compile_: bool = False) -> dict:
    return {
        f"{method_name} deltatune": deltatune_builder(model, method_name, compile_),
        f"{method_name} peer": peer_builder(model, method_name, "fp32"),
        f"{method_name} peer+amp": peer_builder(model, method_name, "bf16"),
    }


def matmul_peak(dtype: torch.dtype, hidden: int, seconds: float = 2.0) -> float:
    return harness.matmul_peak(dtype, hidden, BATCH * SEQ, seconds)


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--memory", default="lora", help="methods whose peak memory is measured (child processes)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--together", action="store_true", help="interleave every method's variants in one set")
    parser.add_argument("--relative-to", help="also print each method's step time against this method's")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        method_name = args.memory_child.split()[0]
        print(json.dumps(measure_memory_here(builders(args.model, method_name, args.compile)[args.memory_child])))
        return
    hidden = load_task_model(args.model, num_labels=2).module.config.hidden_size
    peaks = {"fp32": matmul_peak(torch.float32, hidden), "bf16": matmul_peak(torch.bfloat16, hidden)}
    print(f"# fast path step, {args.model}, batch {BATCH} x seq {SEQ}; {machine_note()}; matmul peak "
          f"fp32 {peaks['fp32']:.0f} / bf16 {peaks['bf16']:.0f} GFLOP/s")
    print("| variant | step ms | tokens/s | GFLOP/step | % bf16 peak | vs peer | vs peer+amp | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    methods = args.methods.split(",")
    all_variants = {name: (m, build) for m in methods for name, build in builders(args.model, m, args.compile).items()}
    memory = {}
    for name in all_variants:
        if name.split()[0] in args.memory.split(","):
            extra = ["--model", args.model, "--threads", str(args.threads)] + (["--compile"] if args.compile else [])
            memory[name] = memory_in_child(__file__, name, extra)
    flops = {name: step_flops(build()) for name, (_, build) in all_variants.items()}
    if args.together:  # every method's variants in one round-robin: ratios across methods are fair too
        seconds = time_interleaved({n: b for n, (_, b) in all_variants.items()}, rounds=args.rounds,
                                   steps=args.steps, warmup=1)
    else:
        seconds = {}
        for m in methods:
            seconds.update(time_interleaved({n: b for n, (mm, b) in all_variants.items() if mm == m},
                                            rounds=args.rounds, steps=args.steps, warmup=1))
    for name, (method_name, _) in all_variants.items():
        s = seconds[name]
        peer, amp = seconds[f"{method_name} peer"], seconds[f"{method_name} peer+amp"]
        mem = memory.get(name, {})
        row = {"variant": name, "step_s": s, "tokens_per_s": BATCH * SEQ / s, "gflop": flops[name] / 1e9,
               "bf16_peak_pct": 100 * flops[name] / s / 1e9 / peaks["bf16"], "vs_peer": peer / s,
               "vs_peer_amp": amp / s, "peak_increase_mb": mem.get("increase_mb")}
        rows.append(row)
        mem_text = f"+{mem['increase_mb']:.0f}" if "increase_mb" in mem else mem.get("error", "–")
        print(f"| {name} | {1000 * s:.0f} | {row['tokens_per_s']:,.0f} | {row['gflop']:.0f} | "
              f"{row['bf16_peak_pct']:.0f}% | {row['vs_peer']:.2f}x | {row['vs_peer_amp']:.2f}x | {mem_text} |",
              flush=True)
    if args.relative_to:  # e.g. --relative-to lora: each method's step against that method's, per variant kind
        base = args.relative_to
        print(f"\n| step time against {base} | deltatune | peer | peer+amp |\n|---|---:|---:|---:|")
        for m in methods:
            cells = [seconds[f"{m} {kind}"] / seconds[f"{base} {kind}"] for kind in ("deltatune", "peer", "peer+amp")]
            print(f"| {m} | " + " | ".join(f"{c:.2f}x" for c in cells) + " |")
    peaks_end = {"fp32": matmul_peak(torch.float32, hidden), "bf16": matmul_peak(torch.bfloat16, hidden)}
    print(f"\nmatmul peak at the end: fp32 {peaks_end['fp32']:.0f} / bf16 {peaks_end['bf16']:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "peaks": [peaks, peaks_end], "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
