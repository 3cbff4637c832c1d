"""`deltatune intrinsic`: train in random subspaces of growing dimension d and find d90.

    for d in dims:  deltatune train --method intrinsic --set dim=d   (a child process each, as compare does)
    reference:      deltatune train --method full                    (or --full-accuracy A)
    floor:          deltatune train --method head                    (d = 0: the head alone trains)
    d90 = the smallest d whose test accuracy reaches 90% of full fine-tuning's (Li et al. 2018)
    cost:           a few training steps of full and of the largest d, timed and measured (peak RSS)

Writes DIR/intrinsic.json, DIR/intrinsic.md (printed) and DIR/accuracy_vs_d.png (with the 90% line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deltatune.backbone import resolve_pooling
from deltatune.cliargs import to_argv
from deltatune.config import TrainConfig
from deltatune.data import TaskArgs
from deltatune.errors import UserError
from deltatune.io import claim_run, run_folder, write_json_atomic, write_text_atomic

DEFAULT_TASK = "rotten-tomatoes"
DEFAULT_SIZES = {"train_size": 1000, "val_size": 200, "test_size": 500}
THRESHOLD = 0.9


def parse_dims(dims: str) -> list[int]:
    try:
        values = sorted({int(d) for d in dims.split(",") if d.strip()})
    except ValueError as exc:
        raise UserError(f"--dims expects comma-separated integers, got '{dims}'") from exc
    if not values or values[0] < 1:
        raise UserError(f"--dims needs positive dimensions, got '{dims}'")
    return values


def train_child(method: str, options: list[str], out: Path, data: TaskArgs, training: TrainConfig,
                model: str | None, pooling: str, threads: int | None) -> dict:
    """One `deltatune train --json` in its own process; its metrics row, or {"error": ...}."""
    argv = [sys.executable, "-m", "deltatune", "train", "--method", method, "--out", str(out), "--pooling", pooling,
            "--json", *to_argv(data), *to_argv(training)]
    argv += ["--model", model] if model else []
    argv += ["--threads", str(threads)] if threads else []
    for pair in options:
        argv += ["--set", pair]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env={**os.environ})
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout)


def find_d90(rows: list[dict], full_accuracy: float, threshold: float = THRESHOLD) -> int | None:
    """The smallest d whose accuracy reaches threshold · full accuracy (None: no d does)."""
    reached = [r["dim"] for r in rows if r.get("accuracy") is not None and r["accuracy"] >= threshold * full_accuracy]
    return min(reached) if reached else None


def markdown(rows: list[dict], full: dict, d90: int | None, costs: list[dict]) -> str:
    lines = ["| d | test accuracy | % of full | validation accuracy | trainable params | train s | peak RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows + [full]:
        if r.get("error"):
            lines.append(f"| {r.get('dim', 'full')} | failed ({r['error']}) | | | | | |")
            continue
        share = 100 * r["accuracy"] / full["accuracy"] if full.get("accuracy") else float("nan")
        lines.append(f"| {r.get('dim', 'full (D)') or '0 (head only)'} | {r['accuracy']:.4f} | {share:.1f} | "
                     f"{r.get('validation_accuracy') or float('nan'):.4f} | {r.get('trainable_params', 0):,} | "
                     f"{r.get('train_seconds', float('nan')):.0f} | {r.get('peak_memory_mb', float('nan')):.0f} |")
    lines.append("")
    lines.append(f"d90 = {d90 if d90 is not None else 'not reached'} (the smallest d with at least "
                 f"{100 * THRESHOLD:.0f}% of full fine-tuning's test accuracy, {THRESHOLD * full['accuracy']:.4f})")
    if costs:
        lines += ["", "| cost per training step | s/step | peak RSS above the runtime, MB |", "|---|---:|---:|"]
        lines += [f"| {c['label']} | {c['seconds_per_step']:.2f} | {c['measured_mb']:.0f} |" for c in costs]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], full_accuracy: float, d90: int | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("accuracy") is not None and r["dim"] > 0]
    head = next((r for r in rows if r["dim"] == 0 and r.get("accuracy") is not None), None)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot([r["dim"] for r in done], [r["accuracy"] for r in done], "o-", label="subspace (intrinsic)")
    ax.axhline(full_accuracy, color="gray", linestyle="--", label=f"full fine-tuning {full_accuracy:.3f}")
    ax.axhline(THRESHOLD * full_accuracy, color="red", linestyle=":", label=f"90% of full {THRESHOLD * full_accuracy:.3f}")
    if head is not None:
        ax.axhline(head["accuracy"], color="green", linestyle="-.", label=f"head only (d = 0) {head['accuracy']:.3f}")
    if d90 is not None:
        ax.axvline(d90, color="red", alpha=0.3, label=f"d90 = {d90}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.rename(path)


def step_costs(model: str | None, dims: list[int], options: list[str], training: TrainConfig,
               threads: int | None, steps: int) -> list[dict]:
    """Seconds and peak memory of a few steps of full fine-tuning and of the largest d (random tokens)."""
    from deltatune.backbone import resolve_model_path
    from deltatune.estimate.measure import measure_in_child

    path = resolve_model_path(model)
    extra = dict(pair.split("=", 1) for pair in options)
    runs = [("full", {}, "full fine-tuning"), ("intrinsic", {**extra, "dim": dims[-1]}, f"intrinsic d={dims[-1]}")]
    costs = []
    for method, opts, label in runs:
        row = measure_in_child(path, method, batch_size=training.batch_size, seq_len=min(training.length_for("classification"), 128),
                               steps=steps, threads=threads or 1, options=opts, label=label)
        if row.error is None:
            costs.append({"label": label, "seconds_per_step": row.seconds_per_step, "measured_mb": row.measured_mb,
                          "batch_size": row.batch_size, "seq_len": row.seq_len})
    return costs


def intrinsic(*, dims: str = "10,30,100,300,1000,3000", out: str = "runs/intrinsic", data: TaskArgs,
              training: TrainConfig, model: str | None = None, pooling: str = "auto", said: bool = False,
              projection: str = "auto", exclude: str | None = None, full_accuracy: float | None = None,
              with_head: bool = True, cost_steps: int = 3, threads: int | None = None) -> int:
    """Train in random subspaces of each dimension d; find d90, the smallest d reaching 90% of full fine-tuning.

    Args:
        dims: Comma-separated subspace dimensions d.
        out: Output folder for intrinsic.json, intrinsic.md, accuracy_vs_d.png and the deltas: a new path,
            an empty folder, or an intrinsic run deltatune wrote; a file or any other folder is refused.
        model: Hugging Face model folder or alias (default: the packaged all-MiniLM-L6-v2).
        pooling: auto (the model's sentence-transformers pooling if it declares one, else hf), hf
            (transformers' own head), mean, cls or last.
        said: Structure-aware intrinsic dimension (one trainable scale per weight tensor).
        projection: dense, fastfood or auto.
        exclude: Comma-separated parameter-name suffixes kept out of the subspace (frozen).
        full_accuracy: Full fine-tuning's test accuracy, if known (skips training it).
        with_head: Also train the head alone (d = 0), the floor every d starts from.
        cost_steps: Training steps timed per cost measurement (0 skips it).
        threads: torch intra-op threads per child process.
    """
    values = parse_dims(dims)
    claim_run(out, "intrinsic", [f"d{d}" for d in values] + ["full"] * (full_accuracy is None) + ["head"] * with_head)
    data.default_to(DEFAULT_TASK, DEFAULT_SIZES)
    task = data.load(training.seed)
    pooling = resolve_pooling(model, pooling)  # MiniLM: mean (its BERT pooler was never trained)
    print(f"intrinsic: {task.summary()}; d in {values}", file=sys.stderr)
    out_dir = run_folder(out, "intrinsic")
    options = [f"said={said}", f"projection={projection}"] + ([f"exclude={exclude}"] if exclude else [])
    rows = []
    for d in values:
        print(f"\n== d = {d} ==", file=sys.stderr)
        row = train_child("intrinsic", [f"dim={d}", *options], out_dir / "deltas" / f"d{d}", data, training,
                          model, pooling, threads)
        rows.append({"dim": d, **row})
    if full_accuracy is None:
        print("\n== full fine-tuning ==", file=sys.stderr)
        full = train_child("full", [], out_dir / "deltas" / "full", data, training, model, pooling, threads)
        if "error" in full:
            raise UserError("full fine-tuning failed: pass --full-accuracy to compare against a known value")
    else:
        full = {"method": "full", "accuracy": full_accuracy, "given": True}
    if with_head:
        print("\n== head only (d = 0) ==", file=sys.stderr)
        rows.insert(0, {"dim": 0, **train_child("head", [], out_dir / "deltas" / "head", data, training, model,
                                                pooling, threads)})
    d90 = find_d90([r for r in rows if r["dim"] > 0], full["accuracy"])
    costs = step_costs(model, values, options, training, threads, cost_steps) if cost_steps > 0 else []
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "intrinsic.json", {"task": task.name, "dims": rows, "full": full, "d90": d90,
                                                   "threshold": THRESHOLD, "step_costs": costs})
    table = markdown(rows, full, d90, costs)
    write_text_atomic(out_dir / "intrinsic.md", f"# deltatune intrinsic: {task.summary()}\n\n" + table)
    plot(rows, full["accuracy"], d90, out_dir / "accuracy_vs_d.png", f"{task.name}: accuracy vs subspace dimension")
    print(table)
    print(f"results: {out_dir}/intrinsic.json, intrinsic.md, accuracy_vs_d.png")
    return 0
