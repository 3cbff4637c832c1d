"""`compare --seeds`: each method trained once per seed, reported as mean ± sample std (table, JSON, plot)."""

from __future__ import annotations

import json
import statistics

import pytest

from deltatune.cli import main
from deltatune.compare import aggregate, seed_list
from deltatune.errors import UserError
from deltatune.report import markdown_table, plot_accuracy_vs_params

RUNS = [{"method": "lora", "accuracy": a, "trainable_params": 100, "train_seconds": t, "precision": "fp32",
         "seed": s} for a, t, s in ((0.80, 2.0, 0), (0.84, 4.0, 1), (0.85, 3.0, 2))]


def test_a_row_over_seeds_holds_means_stds_and_each_run():
    row = aggregate(RUNS)
    assert row["accuracy"] == pytest.approx(statistics.fmean([0.80, 0.84, 0.85]))
    assert row["accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.84, 0.85]))
    assert row["train_seconds"] == pytest.approx(3.0) and "train_seconds_std" not in row
    assert row["trainable_params"] == 100 and row["precision"] == "fp32" and "seed" not in row
    assert row["seeds"] == [0, 1, 2] and row["runs"] == RUNS
    assert "| 0.8300 ± 0.0265 |" in markdown_table([row])
    one = aggregate(RUNS[:1])  # one seed: its value, no "± 0"
    assert "accuracy_std" not in one and "| 0.8000 |" in markdown_table([one])


def test_seeds_are_checked():
    assert seed_list("0, 1,2,1") == [0, 1, 2] and seed_list(None) is None
    for bad in ("a,b", "-1", ","):
        with pytest.raises(UserError, match="--seeds"):
            seed_list(bad)


def test_the_plot_draws_error_bars(tmp_path):
    plot_accuracy_vs_params([aggregate(RUNS)], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_with_seeds_end_to_end(tiny_dir, toy_csv, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--methods", "head,lora", "--seeds", "0,1", "--model", tiny_dir("bert"), "--data", toy_csv,
              "--epochs", "1", "--out", str(tmp_path / "c"), "--no-progress", "--threads", "1"])
    assert exit_info.value.code == 0
    rows = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["head", "lora"] and all(r["seeds"] == [0, 1] for r in rows)
    assert all(len(r["runs"]) == 2 and "accuracy_std" in r for r in rows)
    assert (tmp_path / "c" / "deltas" / "lora" / "seed-1" / "delta.json").exists()
    assert "±" in (tmp_path / "c" / "results.md").read_text()
