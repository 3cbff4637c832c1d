"""Training checkpoints: everything the loop needs to continue a killed run as if it had never stopped.

    OUT/checkpoints/step-N/
        state.safetensors   trainable.NAME       the trainable tensors
                            optimizer.I.KEY      AdamW's per-parameter state (exp_avg, exp_avg_sq, step)
                            best.NAME            the best epoch's trainable tensors (best-epoch selection)
                            method.KEY           a method's own state (AdaLoRA: budget, EMAs, rank masks)
                            rng.R.torch|numpy|cuda.D   rank R's generator states
        checkpoint.json     the loop's position (epoch, micro-batch, optimizer step, loss sums, metric
                            history), optimizer param groups, scheduler state, python RNG, and `run`: what
                            the run was (method, options, data, backbone, settings, world size)

Safetensors + JSON only, never pickle. A checkpoint is written into a temporary sibling and renamed to
`step-N` last (`deltatune.io.atomic_directory`): a folder named step-N is complete; a kill mid-write leaves
a temporary that is never read (and removed by the next writer once its owner is dead). The newest K are
kept. In a distributed run the replicated state is written by rank 0 alone, with every rank's RNG states
gathered into it; checkpoints must sit on storage every node can read to resume a multi-node run.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deltatune.errors import UserError
from deltatune.io import atomic_directory, remove_stale_temporaries

FOLDER = "checkpoints"
TENSORS = "state.safetensors"
META = "checkpoint.json"
FORMAT = "deltatune.checkpoint"
STEP = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where the loop stands: resuming continues at micro-batch `batch` of epoch `epoch`."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 1
    batch: int = 0
    """Micro-batches of `epoch` already consumed (always the end of an accumulation window)."""
    epoch_loss: float = 0.0
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    train_clock: float = 0.0


# ---- generator states ------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA), numpy and python generator states as tensors + JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- optimizer state without pickle -----------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state dict split into tensors (`I.KEY`) and JSON (param groups, non-tensor entries)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        flat = {f"{key}/{k}": v for key, value in entries.items() if isinstance(value, dict)
                for k, v in value.items()}  # bitsandbytes' 8-bit state nests its quantisation maps one level
        for key, value in [*((k, v) for k, v in entries.items() if not isinstance(v, dict)), *flat.items()]:
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            elif value is None or isinstance(value, (bool, int, float, str)):
                scalars[f"{index}.{key}"] = value
            else:
                raise UserError(f"--save-steps: the optimizer's state '{key}' ({type(value).__name__}) cannot be "
                                f"written to a checkpoint (GaLore's projector): train without --save-steps")
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def named_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) as tensors (`NAME.KEY`) + JSON."""
    tensors, scalars = {}, {}
    for param, entries in state.get("state", {}).items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state.get("param_groups", []), "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        outer, nested, inner = key.partition("/")  # bitsandbytes' nested quantisation state
        entry = state.setdefault(int(index), {})
        if nested:
            entry.setdefault(outer, {})[inner] = value
        else:
            entry[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- folders -----------------------------------------------------------------------------------------

def folder(out: str | Path) -> Path:
    return Path(out) / FOLDER


def complete(path: Path) -> bool:
    """A step-N folder with its state and description (only a finished write gets that name)."""
    return STEP.match(path.name) is not None and (path / META).is_file() and (path / TENSORS).is_file()


def listing(out: str | Path) -> list[Path]:
    """The complete checkpoints under OUT/checkpoints, oldest first."""
    root = folder(out)
    found = [p for p in root.iterdir() if complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP.match(p.name).group(1)))


def resolve(path: str | Path) -> Path:
    """`--resume OUT` (its newest complete checkpoint) or `--resume OUT/checkpoints/step-N`."""
    path = Path(path)
    if complete(path):
        return path
    if STEP.match(path.name) and path.parent.name == FOLDER:
        raise UserError(f"--resume {path}: not a complete checkpoint (no {META} and {TENSORS})")
    found = listing(path)
    if not found:
        raise UserError(f"--resume {path}: no complete checkpoint in {folder(path)} (train with --save-steps N)")
    return found[-1]


def save(out: str | Path, position: Position, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
         keep: int) -> Path:
    """Write OUT/checkpoints/step-N atomically and keep only the newest `keep` complete ones."""
    target = folder(out) / f"step-{position.step}"
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / META).write_text(json.dumps({"format": FORMAT, "position": asdict(position), **meta}, indent=1))
    for old in listing(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clear(out: str | Path) -> None:
    """A fresh (not resumed) run: no earlier run's checkpoints stay to be mistaken for this run's."""
    root = folder(out)
    if root.is_dir():
        remove_stale_temporaries(root)
        for old in listing(out):
            shutil.rmtree(old, ignore_errors=True)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume {path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from exc
    if meta.get("format") != FORMAT:
        raise UserError(f"--resume {path}: {META} is not a deltatune checkpoint description")
    return tensors, meta


def load_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON alone (to refuse a mismatched resume before the model loads)."""
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume {path}: unreadable {META} ({str(exc).splitlines()[0]})") from exc


def check_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run with other settings: one line naming the first difference."""
    for key in current:
        if saved.get(key) != current[key]:
            was, now = _short(saved.get(key)), _short(current[key])
            raise UserError(f"--resume {path}: the checkpoint's {key} was {was}, this run's is {now}; resume "
                            f"with the same settings or train into a new folder")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# ---- the loop's whole state ----------------------------------------------------------------------------

@dataclass
class Plan:
    """What a training run does about checkpoints (train.train_model's `plan`)."""

    out: Path | None = None
    """Write OUT/checkpoints/step-N here (every config.save_steps steps and at each epoch end)."""
    resume: Path | None = None
    """A complete checkpoint to continue from."""
    run: dict[str, Any] = field(default_factory=dict)
    """What this run is (method, options, data, backbone, settings, world size): a resume must match."""


def capture(task_model, method, method_config, optimizer, scheduler, trainable: dict[str, torch.Tensor],
            best_state: dict[str, torch.Tensor] | None, run: dict[str, Any]) -> tuple[dict, dict]:
    """The tensors and JSON of a checkpoint (every rank's RNG gathered: a collective in a distributed run)."""
    from deltatune import fsdp
    from deltatune.distributed import gather_objects

    if fsdp.sharded(task_model.module):  # full tensors gathered to rank 0 (collectives on every rank)
        model_state, optim_state = fsdp.gathered_training_state(task_model.module, optimizer)
        trainable = {k: v for k, v in model_state.items() if k in trainable}
        optim_tensors, optim_meta = named_optimizer_state(optim_state)
        best_state = fsdp.gather(best_state) if best_state is not None else None
    else:
        optim_tensors, optim_meta = optimizer_state(optimizer)
    tensors = {**prefixed("trainable", trainable), **prefixed("optimizer", optim_tensors),
               **prefixed("method", method.checkpoint_state(task_model, method_config))}
    if best_state is not None:
        tensors.update(prefixed("best", best_state))
    rng = gather_objects(rng_state())
    for rank, (rng_tensors, _) in enumerate(rng):
        tensors.update(prefixed(f"rng.{rank}", rng_tensors))
    meta = {"run": run, "optimizer": optim_meta, "scheduler": scheduler.state_dict(),
            "rng": [m for _, m in rng]}
    return tensors, meta


def restore(path: Path, plan: Plan, task_model, method, method_config, optimizer, scheduler,
            rank: int) -> tuple[Position, dict[str, torch.Tensor] | None]:
    """Load a checkpoint into the model, optimizer, scheduler, method and generators; (position, best)."""
    from deltatune import fsdp

    tensors, meta = load(path)
    check_run(path, meta.get("run", {}), plan.run)
    module = task_model.module
    trainable = split(tensors, "trainable")
    missing = sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in trainable)
    if missing:
        raise UserError(f"--resume {path}: the checkpoint lacks trainable tensor {missing[0]}")
    if not fsdp.sharded(module):
        with torch.no_grad():
            params = dict(module.named_parameters())
            for name, value in trainable.items():
                params[name].copy_(value)
    best = split(tensors, "best") or None
    if fsdp.sharded(module):  # every rank reads the full tensors and keeps its shards
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]
        state: dict[str, dict[str, Any]] = {}
        for name, value in [*split(tensors, "optimizer").items(), *meta["optimizer"]["scalars"].items()]:
            param, key = name.rsplit(".", 1)
            state.setdefault(param, {})[key] = value
        fsdp.load_training_state(module, optimizer, trainable, {"state": state, "param_groups": groups})
        best = fsdp.scatter_like(module, best) if best is not None else None
    else:
        load_optimizer_state(optimizer, split(tensors, "optimizer"), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    method.load_checkpoint_state(task_model, method_config, split(tensors, "method"))
    saved_rank = rank % len(meta["rng"])  # a resume on other ranks with the same global micro-batch
    set_rng_state(split(tensors, f"rng.{saved_rank}"), meta["rng"][saved_rank])
    return Position(**meta["position"]), best
