"""Peak memory and speed of a LoRA step on SmolLM2-135M (generation) with the frozen backbone stored in
fp32, bf16, int8, nf4, q4_1 (the GGUF's own Q4_1 blocks) or 2 bits; against peft + transformers +
bitsandbytes (nf4, the QLoRA recipe).

Speed: every variant built once, then interleaved rounds in one process (harness.py). Memory: each
variant alone in a fresh child, RSS above the process's baseline: the peak while loading (the fp32
checkpoint is read, then quantised layer by layer), what stays resident after loading, and the peak
of two training steps; with the weights' share: the bytes the model's tensors and storages hold.

    .venv/bin/python benchmarks/qlora.py [--batch 8] [--seq 256] [--rounds 3] [--threads 2] [--no-peer]
        [--variants nf4,bf16] [--no-memory] [--rows synthetic|instruct|chatterbot] [--task-batches 4]

--rows: the default times one random batch with every position labelled (all the LM head's work, no
padding). A task name times a pass over real rows instead, the same collated tensors for both sides
(length-bucketed, padded to each batch's longest row, only the answers labelled): deltatune's chunked
loss runs the LM head on the labelled positions only, the peer on every position, as `train` and a
plain peft + transformers loop do on the same data.

The bf16 matmul peak (an (N x 576) x (576 x 2304) matmul, N = batch x seq: the FFN's shape) is printed at the
start and at the end: both variants' steps are mostly such matmuls, so a speed ratio is bounded by how much of
a step is not matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import cpu_model, machine_note, matmul_peak, memory_in_child, time_interleaved  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.memory import PeakMemory, rss_mb  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402
from deltatune.train import build_optimizer  # noqa: E402

VARIANTS = {"fp32": (None, "fp32"), "bf16": (None, "bf16"), "int8": ("int8", "bf16"), "nf4": ("nf4", "bf16"),
            "2bit": ("2bit", "bf16"), "q4_1": ("q4_1", "bf16"), "bf16-unfused": (None, "bf16")}
"""deltatune variant -> (--quantize, --precision); `-unfused`: without the fast path's fused q/k/v."""
DEFAULT_VARIANTS = "fp32,bf16,int8,nf4,q4_1,2bit"
PEER = "peft+bnb nf4"
LR = 1e-4


def bf16_peak(rows: int, hidden: int = 576, seconds: float = 2.0) -> float:
    return matmul_peak(torch.bfloat16, hidden, rows, seconds)


def fixed_batch(vocab: int, batch: int, seq: int) -> dict:
    ids = torch.randint(1000, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def task_batches(task_name: str, batch: int, seq: int, count: int) -> list[dict]:
    """`count` collated batches of `batch` real rows of a generation task (length-bucketed as `train` does,
    each padded to its longest row; labels -100 on prompts and padding): both sides get these same tensors."""
    from transformers import AutoTokenizer

    from deltatune.batching import collate, train_batches
    from deltatune.data import load_task
    from deltatune.generation import encode_lm

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    task = load_task(task_name, train_size=batch * count * 4)
    rows = encode_lm(tokenizer, task.train, seq, "train")
    groups = train_batches([len(r.input_ids) for r in rows], batch, seed=0)[:count]
    out = []
    for group in groups:
        collated = collate([rows[i] for i in group], tokenizer.pad_token_id)
        collated.pop("keys")
        out.append(collated)
    return out


def batches_for(args, vocab: int) -> list[dict]:
    """What one timed step trains on: the fixed random batch (every position labelled), or a pass over
    real task rows (--rows TASK)."""
    if args.rows == "synthetic":
        return [fixed_batch(vocab, args.batch, args.seq)]
    return task_batches(args.rows, args.batch, args.seq, args.task_batches)


def real_tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def stored_mb(module: torch.nn.Module) -> float:
    """Bytes the model's parameters, buffers and quantised storages hold (a tied tensor once)."""
    from deltatune.storage import QuantizedWeight

    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        kept = sub.__dict__.get("frozen_weight")
        if isinstance(kept, QuantizedWeight):
            tensors += [t for k, t in kept.tensors().items() if k != "packed"]
        state = getattr(getattr(sub, "weight", None), "quant_state", None)  # bitsandbytes' Params4bit
        if state is not None:
            tensors += [state.absmax] + ([state.state2.absmax] if state.nested else [])
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / 2**20


def deltatune_builder(name: str, args, report: dict):
    quantize, precision = VARIANTS[name]

    def build():
        from deltatune.fast import prepare, training_forward

        tm = load_task_model("smollm2", 0, pooling="lm", quantize=quantize, precision=precision)
        method, config = resolve_method("lora")
        method.apply(tm, config)
        prepare(tm, precision=precision, fuse=not name.endswith("-unfused"))  # as train does
        report[name] = {"weights_mb": stored_mb(tm.module), **({"quantization": tm.quantization} if quantize else {})}
        forward = training_forward(tm)
        optimizer = build_optimizer(tm.module, LR, 0.01)
        batches = batches_for(args, tm.module.config.vocab_size)
        tm.module.train()

        def step() -> None:
            for batch in batches:
                forward(batch).loss.float().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        report[name]["gflop"] = step_gflop(step)
        return step
    return build


def step_gflop(step) -> float:
    """FLOPs of one step (torch's counter: every matmul, the quantised ones' included), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def peer_builder(args, report: dict):
    def build():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), quantization_config=quant,
                                                     device_map="cpu", dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        report[PEER] = {"weights_mb": stored_mb(model)}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        batches = batches_for(args, model.config.vocab_size)
        model.train()

        def step() -> None:
            for batch in batches:
                model(**batch).loss.float().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step  # its FLOPs are not counted: bitsandbytes' 4-bit matmul is a custom op torch's counter misses
    return build


def builders(args, report: dict) -> dict:
    found = {name: deltatune_builder(name, args, report) for name in args.variants}
    if args.peer:
        found[PEER] = peer_builder(args, report)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="deltatune variants, comma-separated")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak memory of each variant in a child process (--no-memory: speed only)")
    parser.add_argument("--memory-child", default=None)
    parser.add_argument("--rows", default="synthetic",
                        help="synthetic: one random batch, every position labelled; or a generation task (instruct, "
                             "chatterbot): a step is a pass over --task-batches real batches, answers labelled only")
    parser.add_argument("--task-batches", type=int, default=4)
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    torch.set_num_threads(args.threads)
    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
             "--variants", ",".join(args.variants), "--rows", args.rows, "--task-batches", str(args.task_batches)]
    if args.memory_child:  # loading (fp32 weights read, then quantised) and the steps, apart
        report: dict = {}
        baseline = rss_mb()
        with PeakMemory() as load:
            step = builders(args, report)[args.memory_child]()
        loaded = rss_mb() - baseline
        with PeakMemory() as steps:
            for _ in range(2):
                step()
        print(json.dumps({"load_peak_mb": load.peak_mb - baseline, "loaded_mb": loaded,
                          "step_peak_mb": steps.peak_mb - baseline, **report[args.memory_child]}))
        return
    note = machine_note()
    peak = bf16_peak(args.batch * args.seq)
    report = {}
    memory = {name: memory_in_child(__file__, name, flags) if args.memory else {} for name in builders(args, report)}
    seconds = time_interleaved(builders(args, report), rounds=args.rounds, steps=1, warmup=1)
    tokens = args.batch * args.seq if args.rows == "synthetic" else real_tokens(batches_for(args, 0))
    end_peak = bf16_peak(args.batch * args.seq)
    rows = (f"batch {args.batch} x {args.seq}" if args.rows == "synthetic" else
            f"a step = {args.task_batches} batches of {args.batch} real {args.rows} rows (<= {args.seq} tokens, "
            f"{tokens:,} real tokens)")
    print(f"# LoRA step (r 8, q/v), SmolLM2-135M generation, {rows}; {note}; "
          f"{cpu_model()}; bf16 matmul peak {peak:.0f} GFLOP/s at the start, {end_peak:.0f} at the end, "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    print("| variant | step s | tokens/s | GFLOP/step | % of bf16 matmul peak | step peak MB | weights MB (share "
          "of step peak) | quantised layers MB (vs 16-bit) | resident after load MB | load peak MB | speed vs peer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    peer = seconds.get(PEER)
    mean_peak = (peak + end_peak) / 2
    for name, s in seconds.items():
        mem, gflop = memory[name], report.get(name, {}).get("gflop", 0.0)
        vs = f"{peer / s:.2f}x" if peer and name != PEER else "–"
        work = f"{gflop:.0f} | {gflop / s / mean_peak:.0%}" if gflop else "– | –"
        if not mem or "error" in mem:
            print(f"| {name} | {s:.2f} | {tokens / s:,.0f} | {work} | {mem.get('error', '–')} | | | | | {vs} |")
            continue
        q = mem.get("quantization")
        layers = f"{q['quantized_mb']:.1f} ({q['quantized_mb'] / q['bf16_mb']:.2f}x)" if q else "–"
        print(f"| {name} | {s:.2f} | {tokens / s:,.0f} | {work} | {mem['step_peak_mb']:.0f} | {mem['weights_mb']:.0f} "
              f"({mem['weights_mb'] / mem['step_peak_mb']:.0%}) | {layers} | {mem['loaded_mb']:.0f} "
              f"| {mem['load_peak_mb']:.0f} | {vs} |")

if __name__ == "__main__":
    main()
