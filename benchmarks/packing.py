"""--packing against length-bucketed batches: real (non-pad) training tokens per second, SmolLM2 + LoRA.

    .venv/bin/python benchmarks/packing.py --task chatterbot --examples 256 --batch-size 16 --rounds 3

Both variants train on the same examples (one pass = one round; the rounds interleave, the median
counts) with the same optimizer and the chunked LM loss: bucketed = deltatune's default batches (length-
sorted pools, each batch padded to its longest row); packed = the same examples packed into rows of
N tokens for each N of --row-tokens (default packing.ROW_TOKENS), about --batch-size examples per batch (packing.py).
tokens/s = the examples' real tokens / seconds per pass. The first pass's loss per answer token is
printed for both (the steps group different examples, so it agrees within noise, not exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from harness import cpu_model, matmul_peak  # noqa: E402

from deltatune.backbone import load_task_model, resolve_model_path
from deltatune.batching import collate, train_batches
from deltatune.data import load_task
from deltatune.fast import prepare, training_forward
from deltatune.generation import encode_lm
from deltatune.methods import resolve_method
from deltatune.packing import ROW_TOKENS, pack_rows, packed_batch_size
from deltatune.train import labelled_count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="chatterbot")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--row-tokens", default=str(ROW_TOKENS),
                        help="packed row lengths to compare (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = load_task(args.task, train_size=args.examples)
    tm = load_task_model(resolve_model_path(args.model), 0, pooling="lm", seed=0)
    method, config = resolve_method("lora")
    method.apply(tm, config)
    prepare(tm, args.precision, "auto", "auto")
    rows = encode_lm(tm.tokenizer, task.train, args.max_length, "train")
    variants = {
        "bucketed": [[rows[i] for i in b] for b in train_batches([len(r.input_ids) for r in rows], args.batch_size, 0)]}
    for n in (int(x) for x in args.row_tokens.split(",")):
        packed = pack_rows(rows, n, row_tokens=n)
        variants[f"packed-{n}"] = [[packed[i] for i in b] for b in train_batches(
            [len(r.input_ids) for r in packed], packed_batch_size(rows, packed, args.batch_size), 0)]
    pad = tm.tokenizer.pad_token_id
    forward = training_forward(tm)
    state = {k: v.clone() for k, v in tm.module.state_dict().items() if "lora" in k or "lm_head" in k}

    def one_pass(batches) -> tuple[float, float]:
        tm.module.train()
        optimizer = torch.optim.AdamW([p for p in tm.module.parameters() if p.requires_grad], lr=1e-4)
        nll, tokens, start = 0.0, 0, time.perf_counter()
        for batch_rows in batches:
            loss = forward(collate(batch_rows, pad)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = sum(labelled_count(r, causal=True) for r in batch_rows)
            nll, tokens = nll + loss.item() * n, tokens + n
        return time.perf_counter() - start, nll / tokens  # the pass's loss per answer token

    real = sum(len(r.input_ids) for r in rows)
    padded = {name: sum(max(len(r.input_ids) for r in b) * len(b) for b in batches) for name, batches in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    first_loss = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and gives each variant's first-pass loss)
        for name, batches in variants.items():
            tm.module.load_state_dict(state, strict=False)  # every pass starts from the same weights
            seconds, loss = one_pass(batches)
            print(f"round {round_} {name}: {seconds:.1f} s, mean loss {loss:.4f}", file=sys.stderr, flush=True)
            if round_ == 0:
                first_loss[name] = loss
            else:
                times[name].append(seconds)
    result = {
        "command": "benchmarks/packing.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "cpu": cpu_model(), "load_average": os.getloadavg(), "matmul_peak_gflops": {"fp32": matmul_peak(torch.float32, 576), "bf16": matmul_peak(torch.bfloat16, 576)}, "examples": len(rows), "real_tokens": real,
        **{name: {"batches": len(variants[name]), "positions_computed": padded[name],
                  "seconds_per_pass": statistics.median(times[name]),
                  "real_tokens_per_s": real / statistics.median(times[name]), "first_pass_mean_loss": first_loss[name]}
           for name in variants},
    }
    result["speedup"] = {name: result[name]["real_tokens_per_s"] / result["bucketed"]["real_tokens_per_s"]
                         for name in variants if name != "bucketed"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
