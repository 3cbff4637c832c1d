"""Serving throughput: mixed-task batches vs one task alone, vs each task's rows as separate batches, vs peft.

    .venv/bin/python benchmarks/serve_engine.py [--tasks 1,4,16,64] [--kinds lora,prompt,mix]
    .venv/bin/python benchmarks/serve_engine.py --tasks 16 --kinds mix --mix lora,prompt,ia3,adapter,prefix,head,dora,vera
                                                [--batch-size 64] [--threads 1] [--rounds 5]

Backbone all-MiniLM-L6-v2 on the CPU; deltas are random (every trained tensor perturbed): LoRA (r=8 on
query+value), soft prompts (20 tokens), or a mix (LoRA, prompt, IA3, adapters, prefix, head in turn).
One batch = `batch-size` rotten-tomatoes test texts, row b for task b mod N. Rows/s of (tokenizing
included everywhere):

    single    the engine, every row for one task (same batch size); for a mix, each kind of delta
              timed so, combined by the kinds' shares of the mixed batch's rows
    alone     that task's own model (no engine), every row: what a one-task server runs (a mix: as single)
    mixed     the engine, rows of N tasks in one batch: shared passes (rows of similar length
              together, `pass_overhead_tokens`) + each task's head
    mixed1    the same forced into exactly one shared pass (everything padded to the longest row)
    separate  each task's rows as their own batch, through that task's own model (N passes)
    peft      LoRA only: one PeftModel with N adapters (+ N heads), forward(adapter_names=per row)

Variants take turns (round-robin, median of rounds), so background load hits them alike. With
`--clock cpu` (the default) a step is timed by the CPU time this process used (one torch thread:
the compute itself), which other processes on a shared machine barely disturb; `--clock wall` times
wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import machine_note  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path  # noqa: E402
from deltatune.batching import collate, encode  # noqa: E402
from deltatune.data import Example, load_task  # noqa: E402
from deltatune.delta import save_delta  # noqa: E402
from deltatune.methods import resolve_method  # noqa: E402
from deltatune.serve.engine import Engine  # noqa: E402

MIX = ["lora", "prompt", "ia3", "adapter", "prefix", "head"]
OPTIONS = {"lora": {"r": 8, "target_modules": "query,value"}, "dora": {"r": 8, "target_modules": "query,value"}, "prompt": {"num_virtual_tokens": 20, "init": "random"},
           "prefix": {"num_virtual_tokens": 20, "init": "random"}}
MAX_LENGTH = 128


def make_deltas(root: Path, methods: list[str], seed: int = 0) -> list[Path]:
    """One random delta per entry of `methods` (one task model per method, re-perturbed per delta)."""
    paths, models = [], {}
    for i, name in enumerate(methods):
        if name not in models:
            method, config = resolve_method(name, OPTIONS.get(name, {}))
            tm = load_task_model("minilm", num_labels=2)
            tm.label_names = ["neg", "pos"]
            method.apply(tm, config)
            start = {n: p.detach().clone() for n, p in tm.module.named_parameters() if p.requires_grad}
            models[name] = (tm, method, config, start)
        tm, method, config, start = models[name]
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for n, p in tm.module.named_parameters():
                if n in start:
                    p.copy_(start[n] + 0.05 * torch.randn(p.shape, generator=generator))
        meta = {"task": {"name": f"t{i}", "kind": "classification", "label_names": ["neg", "pos"]},
                "train_config": {"max_length": MAX_LENGTH}, "metrics": {}, "head_names": tm.head_names}
        paths.append(save_delta(root / f"{name}-{i}", tm, method, config, meta))
    return paths


def peft_step(n_tasks: int, texts: list[str]):
    """peft's mixed-adapter forward: N LoRA adapters (and N classifier copies), one per row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                        init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="t0")
    for i in range(1, n_tasks):
        model.add_adapter(f"t{i}", config)
    model.eval()
    names = [f"t{b % n_tasks}" for b in range(len(texts))]

    @torch.no_grad()
    def step():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        model(**batch, adapter_names=names)

    return step


def time_rounds(builders: dict, rounds: int, clock) -> dict[str, float]:
    """Median seconds per step of each variant, the variants taking turns (one warm-up step each)."""
    steps = {name: build() for name, build in builders.items()}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def one_pass(engine: Engine, items: list[tuple[str, str]]) -> None:
    overhead, engine.pass_overhead_tokens = engine.pass_overhead_tokens, None
    try:
        engine.classify(items)
    finally:
        engine.pass_overhead_tokens = overhead


def builders(engine: Engine, names: list[str], texts: list[str], kind: str) -> dict:
    n = len(names)
    tasks = [engine.tasks[name] for name in names]

    def own(task_rows):  # each task's rows through its own model, one batch per task
        for task, rows in task_rows:
            batch = collate(encode(task.tokenizer, [Example(text=t) for t in rows], MAX_LENGTH),
                            engine.shared.tokenizer.pad_token_id)
            batch.pop("keys")
            task.top(**batch)

    variants = {
        "single": lambda: lambda: engine.classify([(names[0], t) for t in texts]),
        "alone": lambda: torch.no_grad()(lambda: own([(tasks[0], texts)])),
        "mixed": lambda: lambda: engine.classify([(names[b % n], t) for b, t in enumerate(texts)]),
        "mixed1": lambda: lambda: one_pass(engine, [(names[b % n], t) for b, t in enumerate(texts)]),
        "separate": lambda: torch.no_grad()(lambda: own([(tasks[i], texts[i::n]) for i in range(min(n, len(texts)))])),
    }
    if kind == "mix":  # the single-task references, per kind of delta: combined by row share in `main`
        del variants["single"], variants["alone"]
        for task in {t.method: t for t in tasks}.values():
            variants[f"single:{task.method}"] = lambda task=task: lambda: engine.classify([(task.name, t) for t in texts])
            variants[f"alone:{task.method}"] = lambda task=task: torch.no_grad()(lambda: own([(task, texts)]))
    if kind == "lora":
        variants["peft"] = lambda: peft_step(n, texts)
    return variants


def combine_by_share(rate: dict[str, float], tasks: list, rows: int) -> None:
    """rate['single'] / rate['alone'] of a mix: what serving every row at its own task kind's single-task
    rate would give, 1 / sum_k(share_k / rate_k), share_k = the mixed batch's rows of kind k."""
    kinds = [tasks[b % len(tasks)].method for b in range(rows)]
    for reference in ("single", "alone"):
        rate[reference] = 1.0 / sum(kinds.count(k) / rows / rate[f"{reference}:{k}"] for k in set(kinds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="1,4,16,64")
    parser.add_argument("--kinds", default="lora,prompt,mix")
    parser.add_argument("--mix", default=",".join(MIX), help="the kinds of a `mix`, in turn (#20 adds dora,vera)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.tasks.split(",")]
    texts = [e.text for e in load_task("rotten-tomatoes", test_size=args.batch_size).test][:args.batch_size]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"# serve engine, MiniLM, batch {len(texts)} rotten-tomatoes texts, {args.clock} clock, median of "
          f"{args.rounds} rounds; {machine_note()}")
    print("| tasks | deltas | single rows/s | alone rows/s | mixed rows/s | mixed1 rows/s | mixed/single | "
          "mixed1/alone | separate rows/s | peft rows/s | mixed/peft | mixed1/peft |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            mix = args.mix.split(",")
            methods = [kind if kind != "mix" else mix[i % len(mix)] for i in range(max(counts))]
            paths = make_deltas(Path(tmp) / kind, methods)
            engine = Engine("minilm", device="cpu")
            for count in counts:
                names = [f"{kind}{i}" for i in range(count)]
                for name, path in zip(names, paths):
                    if name not in engine.tasks:
                        engine.add_task(name, path)
                seconds = time_rounds(builders(engine, names, texts, kind), args.rounds, clock)
                rate = {k: len(texts) / s for k, s in seconds.items()}
                if kind == "mix":
                    combine_by_share(rate, [engine.tasks[name] for name in names], len(texts))
                peft = f"{rate['peft']:.1f}" if "peft" in rate else "-"
                vs_peft = " | ".join(f"{rate[k] / rate['peft']:.2f}x" if "peft" in rate else "-"
                                     for k in ("mixed", "mixed1"))
                print(f"| {count} | {kind} | {rate['single']:.1f} | {rate['alone']:.1f} | {rate['mixed']:.1f} | "
                      f"{rate['mixed1']:.1f} | {rate['mixed'] / rate['single']:.2f}x | "
                      f"{rate['mixed1'] / rate['alone']:.2f}x | {rate['separate']:.1f} | {peft} | {vs_peft} |",
                      flush=True)


if __name__ == "__main__":
    main()
