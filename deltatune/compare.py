"""`deltatune compare`: every strategy on the same task and split, side by side.

Each method trains in its own child process (`deltatune train --json`), so its peak memory is its
own and not what earlier methods left behind. Results: DIR/results.json, DIR/results.md (also
printed) and DIR/accuracy_vs_params.png; each method's delta stays in DIR/deltas/METHOD.

`--seeds 0,1,2` trains each method once per seed (deltas in DIR/deltas/METHOD/seed-S): each row holds
the means over the seeds, `KEY_std` (sample standard deviation) for the quality metrics and `runs` (each
seed's own row); the table shows mean ± std and the plot error bars. One test set's standard error is
about ±1.4 points at 1000 examples, so a single seed rarely separates two methods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deltatune.backbone import resolve_pooling
from deltatune.cliargs import to_argv
from deltatune.commands import parse_options
from deltatune.config import TrainConfig
from deltatune.data import GENERATION, TaskArgs
from deltatune.data.templates import PromptArgs, prompt_argv, split_prompt_args
from deltatune.errors import UserError
from deltatune.io import claim_run, run_folder, write_json_atomic, write_text_atomic
from deltatune.methods import REGISTRY, method_names, resolve_method
from deltatune.options import AtLeastOne
from deltatune.report import add_inference_overhead, markdown_table, plot_accuracy_vs_params
from deltatune.runtime import set_threads

DEFAULT_METHODS = "features,head,last2,full,lora,bitfit"
DEFAULT_TASK = "rotten-tomatoes"
DEFAULT_SIZES = {"train_size": 2000, "val_size": 500, "test_size": 1000}


QUALITY = ("accuracy", "macro_f1", "loss", "perplexity", "exact_match", "rouge_l", "chrf")
"""The metrics a multi-seed row reports with a standard deviation."""


def run_child(argv: list[str]) -> subprocess.CompletedProcess:
    """One method's `deltatune train` child, its stdout captured; stopped if compare itself stops (Ctrl-C,
    SIGTERM through cli.Terminated, an error), so no training keeps running orphaned."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        out, _ = child.communicate()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return subprocess.CompletedProcess(argv, child.returncode, out)


def seed_list(seeds: str | None) -> list[int] | None:
    """`--seeds 0,1,2` as integers (None: one run at --seed)."""
    if seeds is None:
        return None
    try:
        values = list(dict.fromkeys(int(s) for s in seeds.split(",") if s.strip()))
    except ValueError as exc:
        raise UserError(f"--seeds must be comma-separated integers, got '{seeds}'") from exc
    if not values or min(values) < 0:
        raise UserError(f"--seeds must be comma-separated integers >= 0, got '{seeds}'")
    return values


def aggregate(runs: list[dict]) -> dict:
    """One method's row over its seeds: numbers averaged, QUALITY metrics with `KEY_std`, each run kept."""
    import statistics

    row: dict = {}
    for key, value in runs[0].items():
        if key == "seed":
            continue
        values = [r.get(key) for r in runs]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        row[key] = statistics.fmean(values) if numeric and key != "trainable_params" else value
        if numeric and key in QUALITY and len(values) > 1:  # one seed has no spread to report (not "± 0")
            row[f"{key}_std"] = statistics.stdev(values)
    return {**row, "seeds": [r.get("seed") for r in runs], "runs": runs}


def options_for(method: str, pairs: list[str] | None) -> list[str]:
    """`--set` pairs that apply to this method: `lora.r=16` (one method) or `r=16` (all that have r)."""
    module, config = resolve_method(method)
    fields = set(vars(config)) if not hasattr(config, "__dataclass_fields__") else set(config.__dataclass_fields__)
    chosen = []
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        scope, dot, name = key.rpartition(".")
        if dot and scope != method and scope != module.NAME:
            continue
        if name in fields or (dot and name):
            chosen.append(f"{name}={value}")
    return chosen


def check_options(name: str, pairs: list[str] | None, prompt: PromptArgs) -> None:
    """Resolve a method with the options its `train` child would get: a bad one is a UserError naming it."""
    method, _ = resolve_method(name)
    options = {**split_prompt_args(method, prompt)[0], **parse_options(options_for(name, pairs))}
    try:
        resolve_method(name, options)
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from exc


def compare(*, methods: str = DEFAULT_METHODS, out: str = "runs/compare", data: TaskArgs, training: TrainConfig,
            prompt: PromptArgs, model: str | None = None, pooling: str = "auto", set_: list[str] | None = None,
            threads: AtLeastOne | None = None, nproc: AtLeastOne | None = None, seeds: str | None = None) -> int:
    """Train several methods on the same task and split; print and plot the comparison.

    Args:
        methods: Comma-separated methods, or 'all'.
        out: Output folder for results.json, results.md, the plot and each method's delta (DIR/deltas/METHOD,
            replaced atomically): a new path, an empty folder, or a compare run deltatune wrote; a file or
            any other folder is refused before training.
        model: Hugging Face model folder or alias (default: the packaged all-MiniLM-L6-v2).
        pooling: auto (the model's sentence-transformers pooling if it declares one, else hf), hf
            (transformers' own head), mean, cls or last.
        set_: Method option, `METHOD.KEY=VALUE` for one method or `KEY=VALUE` for every method that has it.
        threads: torch intra-op threads per child process (and for this process's own measurements:
            the base model's row, the inference overhead).
        nproc: Train each method on N processes of this machine (each child runs under torchrun).
        seeds: Comma-separated seeds (0,1,2): train each method once per seed and report mean ± std.
    """
    from deltatune.distributed import torchrun_prefix, under_torchrun

    if under_torchrun():
        raise UserError("compare starts one `deltatune train` per method: run it without torchrun and give "
                        "--nproc N to train each method on N processes")
    names = method_names() if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:  # unknown names, bad options or flags: refused before any training starts
        check_options(name, set_, prompt)
    training.validate()
    set_threads(threads)  # the base row and the inference timings run here, on the children's thread count
    seed_values = seed_list(seeds)
    claim_run(out, "compare", names)  # and an output path deltatune may not write over
    if not (data.task or data.data):
        data.task = DEFAULT_TASK
        for key, value in DEFAULT_SIZES.items():
            if getattr(data, key) is None:
                setattr(data, key, value)
    task = data.load(training.seed)  # validates the data once, in this process
    if pooling == "auto" and task.kind == GENERATION:
        pooling = "hf"  # train uses the LM head for generation tasks whatever --pooling says
    pooling = resolve_pooling(model, pooling)
    print(f"compare: {task.summary()}; methods: {', '.join(names)}", file=sys.stderr)
    out_dir = run_folder(out, "compare")
    rows: list[dict] = []
    for name, seed in [(n, s) for n in names for s in seed_values or [None]]:
        launcher = torchrun_prefix(nproc) if nproc else [sys.executable]
        folder = out_dir / "deltas" / name / (f"seed-{seed}" if seed is not None else "")
        argv = [*launcher, "-m", "deltatune", "train", "--method", name, "--out", str(folder), "--pooling", pooling,
                "--json", *to_argv(data), *to_argv(training), *(["--seed", str(seed)] if seed is not None else [])]
        if model:
            argv += ["--model", model]
        if threads:
            argv += ["--threads", str(threads)]
        for pair in options_for(name, set_):
            argv += ["--set", pair]
        argv += prompt_argv(resolve_method(name)[0], prompt)  # --shots etc. to icl, --objective to tuned methods
        print(f"\n== {name}{f' (seed {seed})' if seed is not None else ''} ==", file=sys.stderr)
        proc = run_child(argv)
        if proc.returncode != 0:
            print(f"compare: {name} failed (exit {proc.returncode}); continuing", file=sys.stderr)
            rows.append({"method": name, "error": f"exit {proc.returncode}"})
            continue
        try:
            row = json.loads(proc.stdout)
        except ValueError:
            print(f"compare: {name} printed no JSON result; continuing", file=sys.stderr)
            rows.append({"method": name, "error": "no JSON result"})
            continue
        rows.append({**row, "seed": seed} if seed is not None else row)
        quality = (f"accuracy {row['accuracy']:.4f}" if "accuracy" in row
                   else f"loss {row.get('loss', float('nan')):.4f}")
        print(f"{name}: {quality} in {row.get('train_seconds', 0.0):.1f} s", file=sys.stderr)
    if seed_values:  # one row per method: the means over its seeds (a failed seed fails the method)
        rows = [next((r for r in group if "error" in r), None) or aggregate(group)
                for group in ([r for r in rows if r["method"] == n] for n in names)]
    done = [r for r in rows if "error" not in r]
    if not done:
        raise UserError("every method failed; see the messages above")
    add_inference_overhead(done)
    from deltatune.estimate.measure import add_memory_estimates

    add_memory_estimates(done, model, task, training, {n: dict(o.split("=", 1) for o in options_for(n, set_))
                                                        for n in names})
    if task.kind == GENERATION:  # the gain of each method over the untuned model with the same prompts
        rows.insert(0, zero_shot_row(model, task, training))
        done.insert(0, rows[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", rows)
    used = ", ".join(sorted({str(r["precision"]) for r in done if r.get("precision")})) or training.precision
    header = (f"# deltatune compare: {task.summary()}\n\nmodel: {model or 'all-MiniLM-L6-v2 (packaged)'}, "
              f"pooling: {pooling}, epochs: {training.epochs}, batch: {training.batch_size}, "
              f"precision: {used} (--precision {training.precision}), "
              f"{f'seeds: {seeds} (mean ± std)' if seed_values else f'seed: {training.seed}'}\n\n")
    table = markdown_table(rows)
    write_text_atomic(out_dir / "results.md", header + table)
    metric = "accuracy" if any("accuracy" in r for r in done) else "rouge_l"
    plot_accuracy_vs_params(done, out_dir / "accuracy_vs_params.png", metric=metric,
                            title=f"{task.name}: {metric.replace('_', '-')} vs trainable parameters")
    print(table)
    print(f"precision used: {used} (--precision {training.precision}); "
          f"results: {out_dir}/results.json, results.md, accuracy_vs_params.png")
    return 0


def zero_shot_row(model: str | None, task, training: TrainConfig) -> dict:
    """The base model with its own LM head, no tuning, on the test split: loss and decoded-reply scores."""
    import time

    from deltatune.backbone import load_task_model, pick_device
    from deltatune.generation import encode_lm, evaluate_lm, is_seq2seq
    from deltatune.generation_metrics import generation_metrics

    print("\n== base (0-shot) ==", file=sys.stderr)
    base = load_task_model(model, 0, pooling="lm", device=pick_device(training.device), seed=training.seed)
    rows = encode_lm(base.tokenizer, task.test, training.length_for(task.kind), "test", seq2seq=is_seq2seq(base))
    start = time.perf_counter()
    metrics = evaluate_lm(base, rows, training.eval_batch_size)
    metrics.update(generation_metrics(base, task.test))
    metrics.pop("answer_tokens", None)
    print(f"base (0-shot): loss {metrics['loss']:.4f} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {"method": "base (0-shot)", "trainable_params": 0, "trainable_pct": 0.0, "train_seconds": 0.0, **metrics}


__all__ = ["compare", "REGISTRY"]
