"""Many processes, one training run: torch.distributed under torchrun (no launcher or scheduler of our own).

    torchrun --nproc-per-node 2 -m deltatune train ...      # or: deltatune train --nproc 2 ...
    rank r of W:  global micro-batch b (batch_size x W rows, the same on every rank: same seed)
                  -> rows b[r::W] -> forward -> loss x (my labelled count / global count) -> backward
                  -> at the end of an accumulation window: all-reduce (sum) of the trainable gradients
                  -> the same clipped step on every rank

- Backend: gloo on the CPU, nccl on CUDA (each process on cuda:LOCAL_RANK).
- The loss is normalised by the global count of labelled examples (classification) or scored tokens
  (generation) over the ranks and the accumulation window, so W ranks step exactly as one process with the
  same global micro-batches: sum over ranks of (sum of my losses / global count) = the global mean.
- Only trainable tensors are all-reduced (what DDP does with `requires_grad`): a LoRA step sends its
  adapters' gradients, not the backbone's. The reduce runs once per optimizer step over one flat bucket
  per dtype, as DDP's `no_sync` accumulation does; it is not overlapped with backward (our forward goes
  through the frozen-prefix cache and method hooks, not a wrapped module).
- Full fine-tuning with --fsdp: FSDP2's `fully_shard` per transformer layer and at the root (parameters,
  gradients and AdamW state sharded); then FSDP reduces the gradients itself and no all-reduce runs here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from deltatune.errors import UserError
from deltatune.options import option

BUCKET_BYTES = 32 * 2**20
"""All-reduce gradients in flat buckets of at most this size (bounded extra memory for a full model)."""


@dataclass
class LaunchArgs:
    nproc: int | None = option(None, ge=1)
    """Processes on this machine: `deltatune train --nproc N` starts torchrun (torch.distributed.run) itself."""
    nnodes: int = option(1, ge=1)
    """Machines in the run (with --nproc): each runs the same command with its own --node-rank."""
    node_rank: int = option(0, ge=0)
    """This machine's index among --nnodes (0 hosts the rendezvous)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0 (multi-node runs)."""
    master_port: int = option(29500, ge=1, le=65535)
    """Port of node 0's rendezvous (multi-node runs; one machine picks a free port itself)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when torch.distributed is not in use."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes deltas, logs, checkpoints and progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_in_environment() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto") -> tuple[World, torch.device | None]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA); returns
    this process's World and its device (cuda:LOCAL_RANK on CUDA), or (SINGLE, None) outside torchrun."""
    if not under_torchrun():
        return SINGLE, None
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    picked = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(picked)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=picked if cuda else None)
    return world, picked


def current() -> World:
    if not dist.is_available() or not dist.is_initialized():
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().active:
        dist.barrier()


def comm_device() -> torch.device:
    """Where collectives' tensors must live: this rank's GPU under nccl, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over the ranks (float64, exact for counts)."""
    if not current().active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the ranks (moved to the collective's device and back)."""
    if current().active:
        moved = tensor.to(comm_device())
        dist.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's trainable tensors."""
    if current().active:
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params: list[torch.Tensor]) -> int:
    """Sum the trainable gradients over the ranks in flat buckets (a missing gradient counts as zeros);
    returns the bytes reduced."""
    if not current().active:
        return 0
    sent = 0
    for bucket in _buckets(params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for p, g in zip(bucket, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if p.grad is None else p.grad.copy_(
                flat[offset:offset + n].view_as(p))
            offset += n
    return sent


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = BUCKET_BYTES
    for p in params:
        nbytes = p.numel() * p.element_size()
        if size + nbytes > BUCKET_BYTES or buckets[-1][0].dtype != p.dtype or buckets[-1][0].device != p.device:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def gradient_bytes(params: list[torch.Tensor]) -> int:
    """Bytes one optimizer step all-reduces: every trainable tensor's gradient once."""
    return sum(p.numel() * p.element_size() for p in params)


def gather_objects(obj):
    """Every rank's `obj` on every rank (a list in rank order); [obj] in one process."""
    if not current().active:
        return [obj]
    out = [None] * current().size
    dist.all_gather_object(out, obj)
    return out


def launch(argv: list[str], launch_args: LaunchArgs, command: str) -> int:
    """Run `deltatune ARGV` (its command first) under torchrun with launch_args' processes and nodes; its exit code."""
    if under_torchrun():
        raise UserError(f"--nproc: this {command} already runs under torchrun; drop --nproc, or start "
                        f"`deltatune {command} --nproc N` without torchrun")
    if launch_args.nproc is None:
        raise UserError("--nnodes needs --nproc N: the processes to start on this machine")
    if launch_args.node_rank >= launch_args.nnodes:
        raise UserError(f"--node-rank must be below --nnodes ({launch_args.nnodes}), got {launch_args.node_rank}")
    return _torchrun([*torchrun_flags(launch_args.nproc, launch_args), "-m", "deltatune", *argv])


RANK_ERRORS = "DELTATUNE_RANK_ERRORS"
"""Set by `--nproc` for its ranks: a folder where a rank writes its UserError line (`rank-R`) instead of
printing it, so that the launcher prints it once and exits 2 (torchrun itself would exit 1)."""


def _torchrun(args: list[str]) -> int:
    """torchrun's agent in this process (torch.distributed.run); a rank's UserError is raised here."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")  # "failed (exitcode ...)"
    level = agent_log.level
    with tempfile.TemporaryDirectory(prefix="deltatune-ranks-") as folder:
        os.environ[RANK_ERRORS] = folder  # the ranks inherit it
        agent_log.setLevel(logging.CRITICAL)  # a failure is reported below: the rank's line or torchrun's report
        try:
            run(parse_args(args))
            return 0
        except ChildFailedError as exc:
            reported = sorted(Path(folder).glob("rank-*"), key=lambda f: int(f.name[5:]))
            if reported:  # the lowest rank's line
                raise UserError(reported[0].read_text().strip()) from None
            print(exc.format_msg(), file=sys.stderr)  # torchrun's report: which rank failed, how
            return 1
        except SignalException as exc:  # Ctrl-C or SIGTERM to the launcher: the ranks were stopped
            raise KeyboardInterrupt from exc
        finally:
            os.environ.pop(RANK_ERRORS, None)
            agent_log.setLevel(level)


def report_rank_error(message: str) -> bool:
    """In a rank started by `--nproc`: hand a UserError line to the launcher (True); else False."""
    folder = os.environ.get(RANK_ERRORS)
    if not folder or not under_torchrun() or not os.path.isdir(folder):
        return False
    Path(folder, f"rank-{rank_in_environment()}").write_text(message + "\n")
    return True


def torchrun_prefix(nproc: int, launch_args: LaunchArgs | None = None) -> list[str]:
    """`python -m torch.distributed.run` with N processes here; the module to run follows (`-m deltatune`)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(nproc, launch_args)]


def torchrun_flags(nproc: int, launch_args: LaunchArgs | None = None) -> list[str]:
    """torchrun's flags for N processes here (its own free port), or for one node of several (static
    rendezvous at node 0's address and port)."""
    run = ["--nproc-per-node", str(nproc)]
    if launch_args is not None and launch_args.nnodes > 1:
        return [*run, "--nnodes", str(launch_args.nnodes), "--node-rank", str(launch_args.node_rank),
                "--master-addr", launch_args.master_addr, "--master-port", str(launch_args.master_port)]
    return [*run, "--standalone"]


LAUNCH_FLAGS = {"--nproc": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1}


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without the launch flags (`--nproc 2`, `--nproc=2`, ...): what each rank runs."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = 0 if "=" in arg else LAUNCH_FLAGS[name]
            continue
        out.append(arg)
    return out
