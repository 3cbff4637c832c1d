"""torch.distributed: 2 processes over gloo train the same LoRA as one process at the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, run, run_process

from deltatune import distributed
from deltatune.backbone import load_task_model
from deltatune.batching import encode
from deltatune.config import TrainConfig
from deltatune.data import load_task
from deltatune.loading import load_delta
from deltatune.methods import resolve_method
from deltatune.methods.base import trainable_state
from deltatune.train import train_model
from deltatune.workflow import TrainJob, run_train_job

OPTIONS = {"target_modules": "query,value,ffn_out", "r": "4"}
PER_RANK = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_lora(model: str, data: str, batch_size: int, grad_accum: int = 1) -> dict[str, torch.Tensor]:
    """LoRA on the toy task in this process (in whatever process group it has joined)."""
    task = load_task(data=data)
    tm = load_task_model(model, num_labels=2, pooling="mean", seed=0)
    method, config = resolve_method("lora", OPTIONS)
    method.apply(tm, config)
    for module in tm.module.modules():  # no dropout (train's default): the same masks cannot fall on other rows
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows = {s: encode(tm.tokenizer, getattr(task, s), 32, s) for s in ("train", "validation")}
    result = train_model(tm, method, config, rows["train"], rows["validation"],
                         TrainConfig(epochs=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                                     progress=False, cache="off"))
    assert result.global_batch == batch_size * distributed.current().size * grad_accum
    return trainable_state(tm.module)


def _rank(rank: int, world: int, ports: tuple[int, int], model: str, data: str, folder: str) -> None:
    port = ports[0]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        assert distributed.setup("cpu")[0] == distributed.World(rank, world, rank)
        save_file(train_lora(model, data, PER_RANK, grad_accum=2), os.path.join(folder, f"rank{rank}.safetensors"))
        run_train_job(full_job(model, data, PER_RANK, fsdp=True, save_steps=4), os.path.join(folder, "fsdp"))
        resumed = full_job(model, data, PER_RANK, fsdp=True, save_steps=4)  # from the middle of epoch 1
        resumed.resume = os.path.join(folder, "fsdp", "checkpoints", "step-4")
        os.environ["MASTER_PORT"] = str(ports[1])  # a new process group: a fresh rendezvous port
        run_train_job(resumed, os.path.join(folder, "fsdp-resumed"))  # each job joins and leaves the group
    finally:
        distributed.teardown()


def full_job(model: str, data: str, batch_size: int, fsdp: bool, save_steps: int = 0) -> TrainJob:
    # 21 validation rows in batches of 5: 11 rows (3 batches) on rank 0, 10 (2 batches) on rank 1 unless
    # padded; FSDP's all-gathers would wait forever for rank 1's missing third pass
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=3e-3, progress=False, cache="off", fsdp=fsdp,
                         save_steps=save_steps, keep_checkpoints=10, eval_batch_size=5)
    return TrainJob(method="full", task=load_task(data=data, val_size=21), model=model, pooling="mean",
                    train=config)


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, toy_csv, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(2, (free_port(), free_port()), tiny_dir("bert"), toy_csv, str(folder)), nprocs=2)
    return [load_file(str(folder / f"rank{r}.safetensors")) for r in range(2)] + [folder / "fsdp",
                                                                                  folder / "fsdp-resumed"]


def test_ranks_hold_equal_weights_after_training(two_ranks):
    first, second = two_ranks[:2]
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)  # the same summed gradients, the same steps


def test_two_ranks_train_as_one_process_at_the_same_global_batch(two_ranks, tiny_dir, toy_csv):
    start = trainable_state(_fresh(tiny_dir("bert")))
    one = train_lora(tiny_dir("bert"), toy_csv, 2 * PER_RANK, grad_accum=2)
    ddp = two_ranks[0]  # rank 0's
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-2  # training changed the tensors
    for k in one:  # fp32 sums in another order, through 6 AdamW steps (one epoch: no best-epoch choice between near ties)
        torch.testing.assert_close(ddp[k], one[k], atol=1e-3, rtol=1e-3)


def test_fsdp_full_fine_tuning_runs_and_its_delta_reloads(two_ranks, tiny_dir, toy_csv, tmp_path):
    sharded = two_ranks[2]
    assert (sharded / "checkpoints" / "step-4").is_dir()
    meta = json.loads((sharded / "delta.json").read_text())
    assert meta["train_config"]["fsdp"] and meta["metrics"]["world_size"] == 2
    one = tmp_path / "one"
    run_train_job(full_job(tiny_dir("bert"), toy_csv, 2 * PER_RANK, fsdp=False), one)
    reloaded, single = load_delta(sharded), load_delta(one)
    whole = dict(single.task_model.module.named_parameters())
    start = dict(load_task_model(tiny_dir("bert"), num_labels=2, pooling="mean", seed=0).module.named_parameters())
    gathered = dict(reloaded.task_model.module.named_parameters())  # every tensor, from 2 shards
    assert gathered.keys() == whole.keys()
    # AdamW moves an element whose gradient is ~0 by +-lr on noise alone: compare whole updates
    update = torch.cat([(whole[k] - start[k]).reshape(-1) for k in whole]).detach()
    apart = torch.cat([(gathered[k] - whole[k]).reshape(-1) for k in whole]).detach()
    assert update.norm() > 0.1  # training moved the tensors
    assert apart.norm() < 0.02 * update.norm(), (apart.norm(), update.norm())


def _fresh(model: str):
    tm = load_task_model(model, num_labels=2, pooling="mean", seed=0)
    method, config = resolve_method("lora", OPTIONS)
    method.apply(tm, config)
    return tm.module


def test_each_rank_evaluates_as_many_rows_and_padding_scores_nothing():
    from deltatune.batching import Encoded
    from deltatune.train import even_share

    rows = [Encoded(key=str(i), input_ids=[5, i], token_type_ids=None, label=None, token_labels=[-100, i])
            for i in range(7)]
    shares = [even_share(rows, rank, 3) for rank in range(3)]
    assert [len(mine) for mine, _ in shares] == [3, 3, 3] and [pads for _, pads in shares] == [0, 1, 1]
    assert [r.key for r in shares[1][0][:2]] == ["1", "4"]  # rows[rank::world] first, then the padding
    assert shares[1][0][2].token_labels == [-100, -100] and rows[0].token_labels == [-100, 0]


def test_bucketed_all_reduce_splits_by_size_and_dtype():
    params = [torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(5)]
    assert [len(b) for b in distributed._buckets(params)] == [1, 1, 1]
    assert [len(b) for b in distributed._buckets([torch.zeros(4)] * 3)] == [3]


def test_launch_flags_are_stripped_for_the_ranks():
    argv = ["train", "--nproc", "2", "--out", "o", "--nnodes=2", "--node-rank", "1", "--master-addr", "h", "-x"]
    assert distributed.strip_launch_flags(argv) == ["train", "--out", "o", "-x"]


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    proc = run("train", "--nproc", "2", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "already runs under torchrun" in proc.stderr


def test_compare_under_torchrun_says_to_use_nproc(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    proc = run("compare", "--methods", "lora", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "--nproc N" in proc.stderr and not (tmp_path / "c").exists()


def test_train_nproc_2_starts_torchrun_and_rank_0_writes(tiny_dir, toy_csv, tmp_path):
    out = tmp_path / "ddp"
    proc = run_process("train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--out", str(out),
                       "--epochs", "1", "--batch-size", "8", "--grad-accum", "2", "--pooling", "mean", "--no-progress",
                       "--nproc", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 32
    assert proc.stderr.count("global batch 32 = 8 rows per rank x 2 rank(s) x 2 accumulation step(s)") == 1
    meta = json.loads((out / "delta.json").read_text())
    assert meta["metrics"]["allreduce_bytes_per_step"] == 4 * meta["metrics"]["trainable_params"]


def test_a_user_error_in_the_ranks_exits_2_with_its_one_line(tiny_dir, tmp_path):
    missing = tmp_path / "missing.csv"  # found missing by the ranks (the launcher does not read the data)
    proc = run_process("train", "--method", "lora", "--model", tiny_dir("bert"), "--data", str(missing),
                       "--out", str(tmp_path / "o"), "--no-progress", "--nproc", "2")
    assert_user_error(proc, "missing.csv")  # not torchrun's exit 1 and its ChildFailedError report
    assert proc.stderr.count("deltatune: error:") == 1  # the launcher prints the ranks' line once
    assert "exitcode" not in proc.stderr  # nor torchrun's report of the failed rank
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_two_nodes_on_localhost_write_the_same_delta_as_two_processes(tiny_dir, toy_csv, tmp_path):
    common = ["train", "--method", "lora", "--model", tiny_dir("bert"), "--data", toy_csv, "--epochs", "1",
              "--batch-size", "8", "--pooling", "mean", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "deltatune", *common, "--out", str(tmp_path / "nodes"),
                               "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                               "127.0.0.1", "--master-port", port], env=env, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    proc = run_process(*common, "--out", str(tmp_path / "procs"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "nodes" / "checkpoints").exists()
    nodes_delta = load_file(str(tmp_path / "nodes" / "delta.safetensors"))
    procs_delta = load_file(str(tmp_path / "procs" / "delta.safetensors"))
    assert nodes_delta.keys() == procs_delta.keys()
    assert all(torch.equal(nodes_delta[k], procs_delta[k]) for k in nodes_delta)


def test_fsdp_resumes_from_a_gathered_checkpoint_to_the_same_delta(two_ranks):
    whole, resumed = (load_file(str(path / "delta.safetensors")) for path in two_ranks[2:4])
    assert whole.keys() == resumed.keys()
    for name in whole:  # the same gloo reductions in the same order: equal
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=1e-6)
