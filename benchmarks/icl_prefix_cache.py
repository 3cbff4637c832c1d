"""ICL prefix cache: examples/s of k-shot prompting with the shared prefix's K/V computed once vs the full prompt.

    python benchmarks/icl_prefix_cache.py --examples 64 --shots 0,1,8,16 --precision bf16 --threads 2

For each k: the same random demonstrations (seed 0), the same rotten-tomatoes test examples, scored
by deltatune.notune.icl.ICL with use_cache=True (prefix K/V computed once, each row = the example)
and use_cache=False (each row = the whole prompt). Prints a Markdown table: prompt and prefix tokens,
examples/s both ways, the speedup, the largest |difference| of the label log-probabilities and
whether the predictions agree.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deltatune.data import load_task
from deltatune.data.templates import prompt_spec
from deltatune.methods.icl import Config
from deltatune.notune.icl import ICL
from deltatune.notune.scoring import load_language_model


def run(examples: int, shots: list[int], precision: str, batch_size: int, model: str) -> list[dict]:
    task = load_task("rotten-tomatoes", train_size=2000, test_size=examples)
    lm = load_language_model(model)
    spec = prompt_spec(task.name, task.label_names, task.description)
    rows = []
    for k in shots:
        timings, scores = {}, {}
        for cached in (True, False):
            icl = ICL(lm, spec, Config(shots=k), batch_size=batch_size, precision=precision, use_cache=cached)
            icl.fit(task.train, seed=0)
            icl.scores(task.test[:2])  # warm-up (allocator, kernels)
            start = time.perf_counter()
            scores[cached] = icl.scores(task.test)
            timings[cached] = time.perf_counter() - start
        row = {"shots": k, "shots_used": icl.stats["shots_used"], "prefix_tokens": icl.stats["prefix_tokens"],
               "prompt_tokens": icl.stats["prompt_tokens"],
               "cached_examples_per_s": examples / timings[True], "full_examples_per_s": examples / timings[False],
               "speedup": timings[False] / timings[True],
               "max_abs_diff": float((scores[True] - scores[False]).abs().max()),
               "same_predictions": bool(torch.equal(scores[True].argmax(-1), scores[False].argmax(-1)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shots | prefix tokens | prompt tokens | cached ex/s | full prompt ex/s | speedup | max abs Δ log p | same predictions |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shots']} | {r['prefix_tokens']:.0f} | {r['prompt_tokens']:.0f} | "
                     f"{r['cached_examples_per_s']:.2f} | {r['full_examples_per_s']:.2f} | {r['speedup']:.1f}× | "
                     f"{r['max_abs_diff']:.1e} | {'yes' if r['same_predictions'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--shots", default="0,1,8,16")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.examples, [int(s) for s in args.shots.split(",")], args.precision, args.batch_size, args.model)
    print(table(rows))
    if args.json:
        from deltatune.io import write_json_atomic

        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
