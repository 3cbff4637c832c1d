"""--fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) for full fine-tuning of a backbone too large to
replicate on every rank.

    fully_shard(layer) for each transformer layer, then fully_shard(root)
      parameters    each rank keeps 1/W of every tensor (a DTensor); a layer's full weights exist only
                    while it runs (all-gathered before its forward and its backward, freed after)
      gradients     reduce-scattered after backward: each rank keeps the sum of its 1/W shard
      AdamW state   built over the sharded parameters: 1/W per rank
      precision     bf16 compute with fp32 gradient reduction where the device runs bf16 (CUDA); fp32 else
      activations   --gradient-checkpointing recomputes each layer in backward (composes with sharding)

The loop's loss is already normalised by the global count and FSDP averages over the W ranks, so the
loop scales its loss by W (exact for a power of two; a divide factor of 1 would need PREMUL_SUM, which gloo
lacks). Gradients are synchronised only on an accumulation window's last micro-batch.
Memory per rank: the best epoch's copy is kept as local shards; validation is sharded (each rank scores
its rows, metrics all-reduced); after training rank 0 rebuilds a plain model and the trained tensors are
gathered one at a time straight into it (never a second full copy), which is tested and saved like any
other. On the CPU glibc's heap is kept from fragmenting under the all-gathers (`return_freed_memory`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltatune.errors import UserError
from deltatune.fast import heap


def shard(task_model, world) -> None:
    """Shard the task model across the ranks of the process group (every rank calls this)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not world.active:
        raise UserError("--fsdp shards a model across processes: run under torchrun or with --nproc N (N >= 2)")
    device = task_model.device()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    if device.type == "cpu":
        return_freed_memory(fix_threshold=True)  # before the all-gathers start churning the heap
    for layer in task_model.layers():
        fully_shard(layer, mp_policy=policy)
    fully_shard(task_model.module, mp_policy=policy)
    return_freed_memory()  # the full weights the shards were cut from


MMAP_THRESHOLD = 1 << 20
"""glibc serves blocks of at least this many bytes with their own mmap, given back to the OS when freed."""


def return_freed_memory(fix_threshold: bool = False) -> None:
    """glibc only (a no-op elsewhere): hand freed heap pages back to the OS (`fast.heap`); `fix_threshold`:
    from now on serve every block >= MMAP_THRESHOLD with its own mmap.

    Sharding on the CPU all-gathers and frees each layer's full weights and gradients at every step (a
    few MB to ~100 MB each). glibc's default threshold rises to the size of any mmapped block freed (up to
    32 MB), after which these blocks come from the heap, which fragments and never shrinks: measured on
    SmolLM2 with 2 ranks, the resident memory per rank grew past a 1-process run's."""
    if fix_threshold:
        heap.fix_mmap_threshold(MMAP_THRESHOLD)
    heap.release_freed()


def sharded(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def sync_gradients(module: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter this backward's gradients (the window's last micro-batch) or keep accumulating."""
    module.set_requires_gradient_sync(sync)


def sharded_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of this rank's shards of the trainable tensors (the best epoch's), resharded first: after a
    forward the root's parameters may still be whole."""
    for sub in module.modules():
        if sharded(sub):
            sub.reshard()
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def unsharded(task_model, rebuild: Callable[[], object], world):
    """Rank 0: a plain task model (rebuilt) holding the trained tensors; the other ranks: None. The tensors
    are gathered one at a time straight into the plain model (a collective per tensor), so rank 0 never
    holds a second full copy of the weights."""
    from torch.distributed.tensor import DTensor

    plain = rebuild() if world.main else None
    target = dict(plain.module.named_parameters()) if plain is not None else {}
    with torch.no_grad():
        for name, param in task_model.module.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param  # all-gather (every rank)
            if plain is not None and name not in target:
                raise RuntimeError(f"--fsdp: the rebuilt model has no parameter {name}")
            if plain is not None and full.dtype == target[name].dtype:  # not a frozen bf16 copy (fast path)
                target[name].copy_(full)
            del full
    return_freed_memory()
    return plain


# ---- checkpoints: the sharded state gathered to full tensors (rank 0 writes them, every rank reloads) ----

def gathered_training_state(module: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model tensors, optimizer state keyed by parameter name) as full tensors on rank 0's CPU, via
    torch.distributed.checkpoint's state-dict API; empty on the other ranks (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_training_state(module: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every rank passes the full tensors; each keeps its shards of the parameters and AdamW state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def gather(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU copies of sharded tensors (a collective)."""
    return {name: t.full_tensor().cpu() for name, t in tensors.items()}


def scatter_like(module: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors cut into this rank's shards, placed as the module's parameters of the same names."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(module.named_parameters())
    return {name: distribute_tensor(t.to(params[name].device), params[name].device_mesh, params[name].placements)
            for name, t in full.items()}
