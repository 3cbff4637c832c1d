"""Generation throughput on SmolLM2: 8 rows of 4 kinds of delta decoding together, new loop vs old code.

    .venv/bin/python benchmarks/decode_mixed.py [--threads 1] [--rounds 3] [--new-tokens 64] [--base /work/base]

Rows: 2 LoRA, 2 prompt-tuning (20 soft tokens), 2 prefix-tuning (20 slots), 2 IA3 deltas, random (every
trained tensor moved off its start, created through each method's `apply` and saved with the OLD
code's `save_delta`, so both codes load them), prompts of about 100 tokens, greedy, `--new-tokens`
each (a row stops early only at EOS). Generated tokens/s of:

    new       this checkout's serve path: `decode_mixed` over all 8 rows (deltatune's decode loop, one
              batch, one KV-cache row per sequence, prefixes in the cache)
    old       the pre-session code (`--base`, run with PYTHONPATH=BASE): `decode_mixed` for LoRA, prompt
              and IA3 rows (transformers' DynamicCache) + `decode_alone` for each prefix row (no cache:
              the whole sequence recomputed every step), what its `Engine.generate` ran
    hf1       reference: transformers' `generate` (greedy, its cache) of one LoRA row, the delta loaded
              the ordinary way (this checkout)
    new1      the new loop on that same single row

Each variant lives in its own worker process (loaded once, warmed up); the variants take turns,
`--rounds` times, and the median round counts. Prints the ratio new / old, the CPU model and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = ["lora", "lora", "prompt", "prompt", "prefix", "prefix", "ia3", "ia3"]
OPTIONS = {"lora": {"r": 8}, "prompt": {"num_virtual_tokens": 20, "init": "random"},
           "prefix": {"num_virtual_tokens": 20, "init": "random"}, "ia3": {}}
MODEL = "smollm2"


# ---- child side --------------------------------------------------------------------------------------

def make_deltas(root: Path) -> None:
    """8 random deltas (run under the OLD code: its format is the one both codes read)."""
    from harness import random_generation_delta

    for i, kind in enumerate(KINDS):
        random_generation_delta(MODEL, kind, OPTIONS[kind], f"{kind}{i}", i, root / f"{kind}{i}")


def prompts(tokenizer) -> list[list[int]]:
    text = ("The committee met on Tuesday to review the budget for the coming year, and after a long "
            "discussion about schools, roads, parks and the new library, the members agreed that ")
    ids = tokenizer(text * 8, add_special_tokens=False)["input_ids"]
    return [ids[i * 3:i * 3 + 94 + 2 * i] for i in range(len(KINDS))]  # 94..108 tokens, different starts


def worker(variant: str, root: Path, new_tokens: int, threads: int) -> None:
    """Load once, then one timed round per 'go' line on stdin: prints {"seconds", "tokens"}."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deltatune.serve import generate as gen
    from deltatune.serve.engine import Engine

    engine = Engine(MODEL, device="cpu")
    names = [f"{kind}{i}" for i, kind in enumerate(KINDS)]
    for name in names:
        engine.add_task(name, root / name)
    rows = prompts(engine.shared.tokenizer)
    tasks = [engine.tasks[n] for n in names]

    if variant == "new":
        def run(limit: int) -> int:
            return sum(map(len, gen.decode_mixed(engine, tasks, rows, [limit] * len(rows))))
    elif variant == "old":
        def run(limit: int) -> int:
            shared = [b for b, t in enumerate(tasks) if t.group == "shared" and t.prefix is None]
            out = gen.decode_mixed(engine, [tasks[b] for b in shared], [rows[b] for b in shared],
                                   [limit] * len(shared))
            alone = [gen.decode_alone(engine, t, rows[b], limit) for b, t in enumerate(tasks) if b not in shared]
            return sum(map(len, out)) + sum(map(len, alone))
    elif variant == "new1":
        def run(limit: int) -> int:
            return len(gen.decode_mixed(engine, tasks[:1], rows[:1], [limit])[0])
    else:  # hf1
        try:
            from deltatune.loading import load_delta
        except ImportError:  # the pre-session layout
            from deltatune.delta import load_delta

        module = load_delta(root / names[0], model=MODEL).task_model.module.eval()
        ids = torch.tensor([rows[0]])

        def run(limit: int) -> int:
            with torch.no_grad():
                out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=engine.shared.tokenizer.pad_token_id)
            return out.shape[1] - ids.shape[1]

    run(4)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        tokens = run(new_tokens)
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}), flush=True)


# ---- parent side -------------------------------------------------------------------------------------

def spawn(variant: str, root: Path, args, pythonpath: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", variant, "--root", str(root),
                             "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=pythonpath)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"worker {variant} failed to start")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--base", default="/work/base", help="a checkout of the pre-session code")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        return make_deltas(Path(args.make))
    if args.worker:
        return worker(args.worker, Path(args.root), args.new_tokens, args.threads)

    base = Path(args.base)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", str(root)], check=True, cwd=base,
                       env={**os.environ, "PYTHONPATH": str(base), "HF_HUB_OFFLINE": "1",
                            "TRANSFORMERS_VERBOSITY": "error"})
        paths = {"new": ROOT, "old": base, "hf1": ROOT, "new1": ROOT}
        workers = {v: spawn(v, root, args, p) for v, p in paths.items()}
        rates: dict[str, list[float]] = {v: [] for v in workers}
        try:
            for _ in range(args.rounds):
                for variant, proc in workers.items():  # alternating: background load hits all alike
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    result = json.loads(proc.stdout.readline())
                    rates[variant].append(result["tokens"] / result["seconds"])
        finally:
            for proc in workers.values():
                proc.stdin.close()
                proc.wait()
    median = {v: statistics.median(r) for v, r in rates.items()}
    print(f"decode_mixed: SmolLM2, 8 rows (2 LoRA, 2 prompt, 2 prefix, 2 IA3), ~100-token prompts, "
          f"{args.new_tokens} new tokens, greedy, threads {args.threads}, {args.rounds} rounds (median)")
    for variant, rate in median.items():
        print(f"  {variant:5s} {rate:8.1f} generated tokens/s   rounds: "
              + ", ".join(f"{r:.1f}" for r in rates[variant]))
    print(f"  new / old = {median['new'] / median['old']:.2f}x   new1 / hf1 = {median['new1'] / median['hf1']:.2f}x")
    print(f"  CPU: {cpu_model()}, load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
