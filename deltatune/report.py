"""The comparison table (Markdown) and plot (accuracy against trainable parameters, log scale)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("loss", "test loss", "{:.4f}"),  # generation tasks: the answer tokens' loss and the decoded replies' scores
    ("perplexity", "perplexity", "{:.2f}"),
    ("exact_match", "exact match", "{:.4f}"),
    ("rouge_l", "ROUGE-L", "{:.4f}"),
    ("chrf", "chrF", "{:.1f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_pct", "trainable %", "{:.3f}"),
    ("peak_memory_mb", "peak RSS MB", "{:.0f}"),
    ("measured_memory_mb", "model+train MB", "{:.0f}"),  # peak RSS in training minus the runtime before the model
    ("estimated_memory_mb", "estimated MB", "{:.0f}"),  # detailed estimate of one step (deltatune estimate)
    ("train_seconds", "train s", "{:.1f}"),
    ("train_examples_per_second", "train ex/s", "{:.1f}"),
    ("inference_ms_per_example", "infer ms/ex", "{:.2f}"),
    ("inference_overhead_pct", "infer overhead %", "{:+.1f}"),
    ("delta_bytes", "delta size", "{}"),
    ("shots_used", "shots", "{:.1f}"),  # no-tuning strategies (icl): demonstrations that fit the prompt
    ("prompt_tokens", "prompt tokens", "{:.0f}"),
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key == "delta_bytes":
        return human_bytes(value)
    std = row.get(f"{key}_std")  # compare --seeds: mean ± sample standard deviation
    return fmt.format(value) if std is None else f"{fmt.format(value)} ± {fmt.format(std)}"


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    present = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in present) + " |",
             "|" + "|".join("---" if c[0] == "method" else "---:" for c in present) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in present) + " |")
    return "\n".join(lines) + "\n"


def add_inference_overhead(rows: list[dict]) -> None:
    """Inference time relative to the unchanged architecture, for rows that did not measure it against
    the bare backbone in their own process (which `deltatune train` does for classifiers): against full
    fine-tuning's, else head's, time in its process (noisier: another process, another moment)."""
    reference = next((r for name in ("full", "head") for r in rows if r.get("method") == name), None)
    if reference is None or not reference.get("inference_ms_per_example"):
        return
    base = reference["inference_ms_per_example"]
    for row in rows:
        if row.get("inference_ms_per_example") is not None and row.get("inference_overhead_pct") is None:
            row["inference_overhead_pct"] = 100.0 * (row["inference_ms_per_example"] / base - 1.0)


def plot_accuracy_vs_params(rows: list[dict], path: str | Path, title: str = "", metric: str = "accuracy") -> None:
    """`metric` (test accuracy; ROUGE-L for a generation task) against trainable parameters; a row with none
    (the 0-shot base model) is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    label = dict((k, name) for k, name, _ in COLUMNS).get(metric, metric)
    for row in rows:
        if row.get(metric) is None:
            continue
        if not row.get("trainable_params"):
            ax.axhline(row[metric], linestyle="--", color="gray", label=row["method"])
            continue
        ax.errorbar(row["trainable_params"], row[metric], yerr=row.get(f"{metric}_std"), fmt="o", markersize=7,
                    capsize=4)  # compare --seeds: ± one standard deviation
        ax.annotate(row["method"], (row["trainable_params"], row[metric]), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {label}")
    ax.set_title(title or f"{label} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.rename(path)
