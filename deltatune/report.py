"""The comparison table (Markdown) and plot (accuracy against trainable parameters, log scale)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
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
    return fmt.format(value)


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


def plot_accuracy_vs_params(rows: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        if row.get("accuracy") is None or not row.get("trainable_params"):
            continue
        ax.scatter(row["trainable_params"], row["accuracy"], s=50)
        ax.annotate(row["method"], (row["trainable_params"], row["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.rename(path)
