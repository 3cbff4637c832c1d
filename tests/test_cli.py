"""The deltatune command end to end on a tiny model and CSV, and its one-line errors (exit code 2)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import tiny
import torch


def run(*args, input_text=None):
    """The CLI in this process (fast; no re-import of torch): returncode, stdout, stderr."""
    from deltatune.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(input_text or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_process(*args):
    """The installed command in a child process, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("deltatune: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def trained(tiny_dir, toy_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "lora-delta"
    proc = run_process("train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "2",
               "--batch-size", "16", "--out", str(out), "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stderr  # the progress bar and epoch lines go to stderr; stdout is the JSON alone
    return out, json.loads(proc.stdout)


def test_train_writes_a_delta_with_metrics(trained):
    out, metrics = trained
    assert (out / "delta.safetensors").exists() and (out / "delta.json").exists()
    meta = json.loads((out / "delta.json").read_text())
    assert meta["method"] == "lora" and meta["task"]["label_names"] == ["neg", "pos"]
    for key in ("accuracy", "macro_f1", "trainable_params", "total_params", "trainable_pct", "peak_memory_mb",
                "train_seconds", "train_examples_per_second", "inference_ms_per_example", "delta_bytes"):
        assert key in metrics
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["backbone_ms_per_example"] > 0 and metrics["inference_overhead_pct"] > -100
    assert 0 < metrics["measured_memory_mb"] <= metrics["peak_memory_mb"]
    assert not list(out.parent.glob(".*tmp"))  # nothing half-written left behind


def test_eval_and_predict(trained, toy_csv):
    out, metrics = trained
    proc = run("eval", str(out), "--data", toy_csv, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(metrics["accuracy"])
    proc = run("predict", str(out), "a good film", "an awful film", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["text"] for r in results] == ["a good film", "an awful film"]
    for r in results:
        assert list(r["probabilities"]) == ["neg", "pos"]
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    stdin = run("predict", str(out), "--json", input_text="a good film\nan awful film\n")
    assert json.loads(stdin.stdout) == results


def test_export_to_peft_gives_the_same_logits(trained, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from deltatune.loading import load_delta

    out, _ = trained
    proc = run("export", "--format", "peft", str(out), str(tmp_path / "peft"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == tiny_dir("bert")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    ours = load_delta(out)
    inputs = dict(ours.task_model.tokenizer(["good movie", "the plot was awful"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        diff = (peft_model(**inputs).logits - ours.task_model.module(**inputs).logits).abs().max().item()
    assert diff <= 1e-4


def test_compare_writes_results_table_and_plot(tiny_dir, toy_csv, tmp_path):
    proc = run("compare", "--methods", "features,head,lora", "--model", tiny_dir("bert"), "--data", toy_csv,
               "--epochs", "1", "--out", str(tmp_path / "cmp"), "--pooling", "mean", "--no-progress",
               "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["features", "head", "lora"]
    required = {"method", "accuracy", "macro_f1", "trainable_params", "total_params", "trainable_pct",
                "peak_memory_mb", "train_seconds", "train_examples_per_second", "inference_ms_per_example",
                "delta_bytes"}
    assert all(required <= set(r) for r in rows)
    assert "| method |" in (tmp_path / "cmp" / "results.md").read_text()
    assert (tmp_path / "cmp" / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


# ---- bad input: one line, exit code 2, nothing half-written ----

def test_missing_data_file(tmp_path):
    assert_user_error(run("train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")), "nope.csv")
    assert not (tmp_path / "o").exists()


def test_unknown_column(tiny_dir, toy_csv, tmp_path):
    proc = run("train", "--model", tiny_dir("bert"), "--data", toy_csv, "--label-column", "stars",
               "--out", str(tmp_path / "o"))
    assert_user_error(proc, "stars")


def test_label_missing_from_train(tiny_dir, tmp_path):
    rows = tiny.toy_sentiment_rows(60) + [("a weird film", "meh")] * 30
    data = tiny.write_csv(tmp_path / "d.csv", rows)
    proc = run("train", "--model", tiny_dir("bert"), "--data", data, "--train-size", "2", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "never in train")


def test_eval_on_data_with_a_label_the_delta_never_saw(trained, tmp_path):
    out, _ = trained
    data = tiny.write_csv(tmp_path / "d.csv", tiny.toy_sentiment_rows(60) + [("a weird film", "meh")] * 30)
    assert_user_error(run("eval", str(out), "--data", data), "meh")


def test_model_folder_without_weights(tmp_path, toy_csv):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert_user_error(run("train", "--model", str(tmp_path / "m"), "--data", toy_csv, "--out", str(tmp_path / "o")),
                      "no weights")


def test_delta_for_another_backbone(trained, tiny_dir):
    out, _ = trained
    other = tiny_dir("bert", seed=7)
    assert_user_error(run("predict", str(out), "good", "--model", other), "different backbone")


def test_corrupt_delta_tensors(trained, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "delta.json").write_text((out / "delta.json").read_text())
    (broken / "delta.safetensors").write_bytes((out / "delta.safetensors").read_bytes()[:100])
    assert_user_error(run("predict", str(broken), "good"), "corrupt", "delta.safetensors")


def test_unknown_method_and_option(toy_csv, tmp_path):
    assert_user_error(run("train", "--method", "magic", "--data", toy_csv, "--out", str(tmp_path / "o")), "magic")
    assert_user_error(run("train", "--method", "lora", "--set", "rank=4", "--data", toy_csv,
                          "--out", str(tmp_path / "o")), "rank")


def test_a_failed_save_leaves_the_old_delta_intact(trained, tmp_path):
    from deltatune.io import atomic_directory

    target = tmp_path / "keep"
    target.mkdir()
    (target / "delta.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "delta.json").write_text("new")
        raise RuntimeError("disk full")
    assert (target / "delta.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_help_of_every_command():
    """--help never crashes (argparse %-formats help text: a bare "0.5%" once broke it)."""
    from deltatune.cli import COMMANDS, make_parser

    parser = make_parser()
    assert "train" in parser.format_help()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(COMMANDS) <= set(subparsers)
    for name, sub in subparsers.items():
        assert sub.format_help().startswith("usage: "), name


def test_predict_into_a_closed_pipe_prints_no_traceback(trained, tmp_path):
    """`deltatune predict DELTA < many | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    out, _ = trained
    lines = tmp_path / "many.txt"
    lines.write_text("".join(f"review number {i} was rather good\n" for i in range(4000)))  # > a pipe's 64 KB
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(lines) as stdin:
        proc = subprocess.Popen([sys.executable, "-m", "deltatune", "predict", str(out)],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does after its line
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=300)
    assert first.strip()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a process's children from /proc")
def test_sigterm_to_compare_stops_its_training_child_and_exits_143(tiny_dir, toy_csv, tmp_path):
    """`kill` (or a scheduler's time limit) on `deltatune compare`: the method it is training stops too,
    and no output folder is left half-written."""
    import signal
    import time

    out = tmp_path / "c"
    parent = subprocess.Popen([sys.executable, "-m", "deltatune", "compare", "--methods", "full", "--model",
                               tiny_dir("bert"), "--data", toy_csv, "--epochs", "500", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    children_file = f"/proc/{parent.pid}/task/{parent.pid}/children"
    deadline, children = time.monotonic() + 120, []
    while not children and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            children = [int(c) for c in open(children_file).read().split()]
    assert children, parent.communicate()[1]
    time.sleep(1.0)  # the child is training
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 143 and "deltatune: terminated" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{children[0]}") and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = os.path.exists(f"/proc/{children[0]}") and "zombie" not in open(f"/proc/{children[0]}/status").read()
    assert not alive, "the training child outlived compare"
    assert not (out / "results.json").exists()
