"""Checkpoints and --resume: a run killed with SIGKILL and resumed writes the same delta, bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cli import assert_user_error, run

from deltatune import checkpoint

EPOCHS = "3"


def train_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    # every projection adapted, mean pooling, large steps: the tensors move at every step
    return ["train", "--method", "lora", "--model", model, "--data", data, "--out", str(out), "--epochs", EPOCHS,
            "--batch-size", "16", "--lr", "0.01", "--pooling", "mean", "--threads", "1", "--no-progress",
            "--set", "target_modules=query,value,ffn_out", "--set", "r=4", "--save-steps", "2", *extra]


@pytest.fixture(scope="module")
def reference(tiny_dir, toy_csv, tmp_path_factory):
    """An uninterrupted run (in this process) with checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("resume") / "whole"
    proc = run(*train_args(tiny_dir("bert"), toy_csv, out, "--keep-checkpoints", "100"))
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_run_killed_mid_training_resumes_to_the_same_bytes(reference, tiny_dir, toy_csv, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "deltatune", *train_args(tiny_dir("bert"), toy_csv, out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint.listing(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    assert not (out / "delta.safetensors").exists()  # killed mid-run
    taken = checkpoint.resolve(out)
    assert taken.name.startswith("step-") and checkpoint.complete(taken)
    proc = run(*train_args(tiny_dir("bert"), toy_csv, out, "--resume", str(out)))
    assert proc.returncode == 0, proc.stderr
    assert (out / "delta.safetensors").read_bytes() == (reference / "delta.safetensors").read_bytes()
    whole, resumed = load_file(str(reference / "delta.safetensors")), load_file(str(out / "delta.safetensors"))
    assert whole.keys() == resumed.keys() and all(whole[k].equal(resumed[k]) for k in whole)


@pytest.mark.parametrize("step", ["step-4", "step-24"])  # mid-epoch; the end of epoch 2 (12 steps an epoch)
def test_resume_from_a_named_checkpoint_gives_the_same_delta(reference, tiny_dir, toy_csv, tmp_path, step):
    out = tmp_path / "again"
    proc = run(*train_args(tiny_dir("bert"), toy_csv, out, "--resume", str(reference / "checkpoints" / step)))
    assert proc.returncode == 0, proc.stderr
    assert (out / "delta.safetensors").read_bytes() == (reference / "delta.safetensors").read_bytes()


def test_a_checkpoint_cut_short_is_never_taken(reference, tmp_path):
    out = tmp_path / "cut"
    newest = checkpoint.listing(reference)[-1]
    number = int(newest.name.split("-")[1])
    root = out / "checkpoints"
    root.mkdir(parents=True)
    os.symlink(newest, root / newest.name)
    # a write a kill cut short: its temporary sibling (never renamed), and a step folder without its JSON
    partial = root / f".step-{number + 2}@host@1@0@abcd-x.tmp"
    partial.mkdir()
    (partial / checkpoint.TENSORS).write_bytes((newest / checkpoint.TENSORS).read_bytes()[:100])
    (root / f"step-{number + 4}").mkdir()
    (root / f"step-{number + 4}" / checkpoint.TENSORS).write_bytes(b"")
    assert checkpoint.resolve(out).name == newest.name


def test_resume_with_another_method_or_data_is_refused(reference, tiny_dir, toy_csv, tmp_path):
    args = train_args(tiny_dir("bert"), toy_csv, tmp_path / "x", "--resume", str(reference))
    other = ["train", "--method", "bitfit", *args[3:args.index("--set")], "--resume", str(reference)]
    assert_user_error(run(*other), "--resume", "method was \"lora\"", "\"bitfit\"")
    changed = tmp_path / Path(toy_csv).name  # the same task name, one word changed
    changed.write_text(Path(toy_csv).read_text().replace("good", "fine", 1))
    args = [a if a != toy_csv else str(changed) for a in args]
    assert_user_error(run(*args), "--resume", "data")
    assert not (tmp_path / "x").exists()  # refused before any training or writing


def test_resume_without_a_checkpoint_says_so(tiny_dir, toy_csv, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run(*train_args(tiny_dir("bert"), toy_csv, tmp_path / "y", "--resume", str(tmp_path / "empty")))
    assert_user_error(proc, "no complete checkpoint")


def test_adalora_budget_state_survives_a_resume(tiny_dir, toy_csv, tmp_path):
    # AdaLoRA's rank masks, EMAs and budget schedule live outside its tensors (checkpoint_state)
    args = ["train", "--method", "adalora", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "2",
            "--batch-size", "32", "--pooling", "mean", "--threads", "1", "--no-progress", "--save-steps", "2",
            "--keep-checkpoints", "20", "--set", "target_r=2", "--set", "init_r=4"]
    whole = tmp_path / "whole"
    assert run(*args, "--out", str(whole)).returncode == 0
    state = checkpoint.load(whole / "checkpoints" / "step-4")[0]
    assert any(k.startswith("method.") for k in state)
    again = tmp_path / "again"
    proc = run(*args, "--out", str(again), "--resume", str(whole / "checkpoints" / "step-4"))
    assert proc.returncode == 0, proc.stderr
    assert (again / "delta.safetensors").read_bytes() == (whole / "delta.safetensors").read_bytes()
