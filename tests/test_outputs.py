"""Output paths (issue 14): deltatune replaces only what deltatune wrote; everything else is a one-line
refusal before any work, with nothing touched. Also: registry temporaries, exported labels, the umask."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import assert_user_error, run

from deltatune.io import MANIFEST, claim_run, run_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def delta(tiny_dir, toy_csv, tmp_path_factory):
    """A LoRA delta trained in this process, written into an existing EMPTY folder (allowed)."""
    out = tmp_path_factory.mktemp("outputs") / "lora"
    out.mkdir()
    proc = run("train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "1",
               "--batch-size", "32", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def one_line(proc, *fragments):
    assert_user_error(proc, *fragments)
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_a_users_folder_is_refused_before_any_work(delta, tiny_dir, toy_csv, tmp_path):
    """The issue's repro: `export runs/lora d`, `train --out d`, `index build --index d` kept thesis.txt? No."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    before = sorted(os.listdir(tmp_path))
    one_line(run("export", "--format", "peft", str(delta), str(folder)), str(folder), "did not write")
    start = time.perf_counter()
    proc = run("train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(folder))
    one_line(proc, str(folder))  # the only line: no task summary, no epoch: refused at argument time
    assert time.perf_counter() - start < 1.0
    docs = tmp_path / "docs.txt"
    docs.write_text("a document about central banks and rates")
    one_line(run("index", "build", "--docs", str(docs), "--index", str(folder)), str(folder))
    one_line(run("compare", "--methods", "head", "--out", str(folder)), str(folder))
    one_line(run("search", "--out", str(folder)), str(folder))
    one_line(run("intrinsic", "--out", str(folder)), str(folder))
    one_line(run("import", str(tmp_path / "no-such-peft"), str(folder)), str(folder))
    assert os.listdir(folder) == ["thesis.txt"] and (folder / "thesis.txt").read_text() == "three years of work"
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["docs.txt"])  # no temporary or .old left


def test_a_file_stays_a_file(delta, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("notes")
    one_line(run("export", "--format", "peft", str(delta), str(target)), "file.txt", "is a file")
    one_line(run("train", "--method", "head", "--out", str(target)), "file.txt")
    assert target.is_file() and target.read_text() == "notes"
    assert os.listdir(tmp_path) == ["file.txt"]  # no hidden .file.txt.old


def test_export_to_the_current_folder(delta, tmp_path, monkeypatch):
    """`export runs/lora .` was a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text("x")
    one_line(run("export", "--format", "peft", str(delta), "."), "refusing to write over .")
    assert os.listdir(tmp_path) == ["thesis.txt"]


def test_deltatunes_own_outputs_are_replaced_and_kinds_kept_apart(delta, tiny_dir, toy_csv, tmp_path):
    manifest = json.loads((delta / MANIFEST).read_text())
    assert manifest["kind"] == "delta" and manifest["deltatune_version"] and manifest["created_at"]
    peft = tmp_path / "peft"
    assert run("export", "--format", "peft", str(delta), str(peft)).returncode == 0
    (peft / "stale.bin").write_text("from an earlier export")  # inside deltatune's own folder
    assert run("export", "--format", "peft", str(delta), str(peft)).returncode == 0  # rerun: replaced atomically
    assert not (peft / "stale.bin").exists() and json.loads((peft / MANIFEST).read_text())["kind"] == "peft"
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]
    one_line(run("train", "--method", "head", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(peft)),
             "holds a deltatune peft export")
    one_line(run("compare", "--methods", "head", "--out", str(delta)), "holds a deltatune delta")
    assert (peft / "adapter_config.json").exists() and (delta / "delta.json").exists()


def test_compare_run_folder_and_its_deltas(delta, tmp_path):
    """compare rewrites OUT/deltas/NAME inside its own run folder; a foreign file there is refused up front."""
    out = tmp_path / "cmp"
    run_folder(out, "compare")
    (out / "deltas").mkdir()
    shutil.copytree(delta, out / "deltas" / "lora")
    claim_run(out, "compare", ["lora", "head"])  # a rerun is allowed
    (out / "deltas" / "head").mkdir()
    (out / "deltas" / "head" / "mine.txt").write_text("x")
    one_line(run("compare", "--methods", "lora,head", "--out", str(out)), "head")
    assert (out / "deltas" / "head" / "mine.txt").exists()


WRITER = """import os, signal, sys; from deltatune.io import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / 'delta.safetensors').write_bytes(b'0' * 4096)
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL) if sys.argv[2] == 'die' else sys.stdin.read()
"""
"""A process writing `sys.argv[1]` atomically that is killed mid-write (die) or waits for stdin (wait)."""


def writer(target: Path, mode: str):
    import deltatune

    env = {**os.environ, "PYTHONPATH": str(Path(deltatune.__file__).parents[1])}
    argv = [sys.executable, "-c", WRITER, str(target), mode]
    if mode == "die":
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert proc.returncode == -signal.SIGKILL
        return proc.stdout.strip()
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def test_a_rerun_removes_what_a_killed_run_left(delta, tmp_path):
    left = writer(tmp_path / "peft", "die")
    assert os.path.isdir(left)
    assert run("export", "--format", "peft", str(delta), str(tmp_path / "peft")).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]


def test_registry_removes_only_a_dead_processs_temporaries(tmp_path):
    """A registration killed mid-copy leaves `.NAME@host@pid@start@rand.tmp`; a restart removes it, never the
    copy of a live process (replicas may share a registry), another host's, or a name deltatune did not make."""
    from deltatune.serve.registry import Registry

    deltas = tmp_path / "reg" / "deltas"
    deltas.mkdir(parents=True)
    dead_tmp = writer(deltas / "sentiment", "die")
    live = writer(deltas / "topic", "wait")
    try:
        live_tmp = live.stdout.readline().strip()
        dead_pid = Path(dead_tmp).name.split("@")[2]
        other_host = deltas / f".x@not-{socket.gethostname()}@{dead_pid}@0@ab-cd.tmp"
        other_host.mkdir()
        users = deltas / ".notes.tmp"
        users.write_text("not deltatune's")
        assert os.path.isdir(dead_tmp) and os.path.isdir(live_tmp)
        registry = Registry(tmp_path / "reg")
        assert [str(p) for p in registry.removed_temporaries] == [dead_tmp]
        assert not os.path.exists(dead_tmp)
        assert os.path.isdir(live_tmp) and other_host.is_dir() and users.is_file()
    finally:
        live.communicate("", timeout=30)  # it finishes its copy: renamed into place
    assert (deltas / "topic" / "delta.safetensors").exists() and not os.path.exists(live_tmp)


def test_export_writes_label_names_that_import_reads(delta, tiny_dir, tmp_path):
    assert run("export", "--format", "peft", str(delta), str(tmp_path / "peft")).returncode == 0
    config = json.loads((tmp_path / "peft" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["model_type"] == "bert"  # the base model's transformers config, with the labels
    proc = run("import", str(tmp_path / "peft"), str(tmp_path / "imported"))  # no --labels
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "imported" / "delta.json").read_text())
    assert meta["task"]["label_names"] == ["neg", "pos"]
    proc = run("predict", str(tmp_path / "imported"), "a good film", "--json")
    assert set(json.loads(proc.stdout)[0]["probabilities"]) == {"neg", "pos"}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_respect_the_umask(delta, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert run("export", "--format", "peft", str(delta), str(tmp_path / "peft")).returncode == 0
    finally:
        os.umask(old)
    for item in [tmp_path / "peft", *(tmp_path / "peft").iterdir()]:
        want = (0o777 if item.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(item.stat().st_mode) == want, item


def test_claim_refuses_a_path_under_a_file(delta, tmp_path):
    (tmp_path / "f").write_text("x")
    one_line(run("export", "--format", "peft", str(delta), str(tmp_path / "f" / "out")), "is a file")


@pytest.mark.slow
def test_rerunning_compare_into_its_own_folder(tiny_dir, toy_csv, tmp_path):
    """The README's main job twice: the second run replaces OUT/deltas/head inside its own run folder."""
    argv = ("compare", "--methods", "head", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "1",
            "--out", str(tmp_path / "cmp"), "--no-progress", "--threads", "1")
    assert run(*argv).returncode == 0
    first = json.loads((tmp_path / "cmp" / "deltas" / "head" / "delta.json").read_text())["created_at"]
    time.sleep(1.1)
    proc = run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cmp" / "deltas" / "head" / "delta.json").read_text())["created_at"] != first
    assert json.loads((tmp_path / "cmp" / MANIFEST).read_text())["kind"] == "compare"
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        MANIFEST, "accuracy_vs_params.png", "deltas", "results.json", "results.md"]


def test_an_output_written_before_manifests_existed_is_replaced(tiny_dir, toy_csv, tmp_path):
    """A delta an earlier version wrote (no manifest, its delta.json format marker) is ours: a rerun replaces it."""
    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "legacy" / "bert-lora", old)
    assert not (old / MANIFEST).exists()
    proc = run("train", "--method", "bitfit", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "1",
               "--train-size", "32", "--no-progress", "--out", str(old))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((old / "delta.json").read_text())["method"] == "bitfit" and (old / MANIFEST).exists()
