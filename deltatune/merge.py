"""`deltatune merge`: combine LoRA-family deltas of one backbone into one LoRA delta (delta arithmetic).

Per adapted module, with ΔW_i = s_i · B_i A_i the i-th delta's update (VeRA's Λ_b B Λ_d A, LoHa's
(B1A1) ⊙ (B2A2), LoKr's C ⊗ BA likewise) and w_i its weight:

    linear       ΔW = Σ w_i ΔW_i, exactly: A = [A_1; A_2; ...], B = [c_1 B_1, c_2 B_2, ...], c_i = w_i s_i / s
                 (the sources' common scale s, else 1); a weight 0 drops its delta. LoKr sources (no
                 low-rank factors) go through the SVD below.
    svd          ΔW = Σ w_i ΔW_i, then the top `rank` singular triplets: B = U_R √S_R, A = √S_R V_Rᵀ, s = 1
    ties         TIES-merging (Yadav et al. 2023, arXiv:2306.01708): keep each ΔW_i's `density` largest
                 magnitudes, elect each entry's sign by the sum, average the w_i-weighted entries that
                 agree with it; then the SVD to `rank`
    dare_linear  DARE (Yu et al. 2023, arXiv:2311.03099): drop entries at random (keep `density`), rescale
                 by 1 / density, then Σ w_i; then the SVD. dare_ties: DARE's drop, then TIES' election.

The weights apply to ΔW itself, so `--weights 1,-1` is task arithmetic as written. peft's
`add_weighted_adapter` scales A and B by sqrt(w) each for its linear / cat modes: not the same thing.
Only deltas of one backbone and one method are merged (DoRA's magnitude is not a sum of low-rank
terms, so it is refused); a delta holds one task head: when the sources' heads differ, `head_from` picks
whose is kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.delta import META, TENSORS, read_meta, read_tensors
from deltatune.errors import UserError
from deltatune.io import atomic_directory, claim_output, write_json_atomic
from deltatune.methods.base import config_dict
from deltatune.methods.lokr import LoKrLinear
from deltatune.methods.lora import Config as LoRAConfig
from deltatune.methods.lora import LowRankSite

MERGEABLE = ("lora", "vera", "loha", "lokr")
HOWS = ("linear", "svd", "ties", "dare_linear", "dare_ties")
Update = tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor
"""A module's ΔW: low-rank (A (r, k), B (d, r), s), or dense (d, k)."""


def module_updates(path: str) -> tuple[dict[str, Update], set[str]]:
    """Each adapted module's ΔW in a delta (loaded on its backbone), and the module names."""
    from deltatune.loading import load_delta  # the backbone is loaded only once the deltas are checked

    task_model = load_delta(path).task_model
    updates: dict[str, Update] = {}
    with torch.no_grad():
        for name, layer in task_model.module.named_modules():
            if isinstance(layer, LoKrLinear):
                updates[name] = layer.delta_weight("default").float()
            elif isinstance(layer, LowRankSite):  # LoRA, VeRA, LoHa: s · B A
                a, b = layer.factors("default")  # (r, k), (d, r)
                updates[name] = (a.float().clone(), b.float().clone(), layer.scaling["default"])
    return updates, set(updates)


def dense(update: Update) -> torch.Tensor:
    return update if isinstance(update, torch.Tensor) else update[2] * update[1] @ update[0]  # (d, k)


def ties_combine(deltas: list[torch.Tensor], weights: list[float], density: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """TIES (generator None: keep the largest magnitudes) or DARE-TIES (random keep, rescaled), as peft's."""
    kept = torch.stack([trim(d, density, generator) for d in deltas])  # (N, d, k)
    sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0)  # the elected sign per entry
    agree = kept.sign() == sign  # (N, d, k)
    weighted = kept * torch.tensor(weights).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def trim(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """The `density` largest-magnitude entries (generator None), or a random `density` of them rescaled."""
    if generator is not None:
        keep = torch.rand(delta.shape, generator=generator) < density
        return delta * keep / density
    count = max(1, int(density * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - count + 1).values
    return delta * (delta.abs() >= threshold)


def to_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, k), B (d, R)) with B A the best rank-R approximation of delta (d, k); R <= min(d, k)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (d, m), (m,), (m, k)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def combine(updates: list[dict[str, Update]], weights: list[float], how: str, rank: int, density: float,
            seed: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Per module the merged (A, B) and the scale s of the result (the sources' common s when linear keeps
    their factors, so a weight of 1 keeps A and B exactly)."""
    names = sorted(set().union(*updates))
    low_rank = how == "linear" and all(not isinstance(u, torch.Tensor) for src in updates for u in src.values())
    scales = {u[2] for src in updates for u in src.values()} if low_rank else {1.0}
    common = scales.pop() if len(scales) == 1 else 1.0
    generator = torch.Generator().manual_seed(seed) if how.startswith("dare") else None
    merged = {}
    for name in names:
        parts = [(src[name], w) for src, w in zip(updates, weights) if name in src and w != 0]
        if low_rank:
            merged[name] = (torch.cat([u[0] for u, _ in parts]),
                            torch.cat([u[1] if w * u[2] == common else u[1] * (w * u[2] / common) for u, w in parts], 1))
            continue
        full = [dense(src[name]) if name in src else None for src in updates]
        shape = next(f for f in full if f is not None).shape
        full = [torch.zeros(shape) if f is None else f for f in full]
        if how in ("ties", "dare_ties"):
            delta = ties_combine(full, weights, density, generator)
        elif how == "dare_linear":
            delta = sum(w * trim(f, density, generator) for f, w in zip(full, weights))
        else:
            delta = sum(w * f for f, w in zip(full, weights))
        merged[name] = to_rank(delta, min(rank, *shape))
    return merged, common


def check_sources(deltas: list[str], weights: list[float]) -> list[dict]:
    """The sources' metadata, refused with one line unless they are mergeable deltas of one backbone and method."""
    if len(deltas) < 2:
        raise UserError("merge needs at least two deltas")
    if len(weights) != len(deltas):
        raise UserError(f"--weights gives {len(weights)} numbers for {len(deltas)} deltas")
    metas = [read_meta(d) for d in deltas]
    for path, meta in zip(deltas, metas):
        if meta["method"] not in MERGEABLE:
            raise UserError(f"{path}: a {meta['method']} delta cannot be merged (merge takes {', '.join(MERGEABLE)})")
        if meta.get("method_config", {}).get("bias", "none") != "none":
            raise UserError(f"{path}: trained with bias={meta['method_config']['bias']}: merge takes bias=none deltas")
        if meta["backbone"]["fingerprint"] != metas[0]["backbone"]["fingerprint"]:
            raise UserError(f"{path} was trained on a different backbone ({meta['backbone']['path']}) than "
                            f"{deltas[0]} ({metas[0]['backbone']['path']}): deltas of one backbone only")
        if meta["method"] != metas[0]["method"]:
            raise UserError(f"{path} is a {meta['method']} delta, {deltas[0]} a {metas[0]['method']} delta: "
                            "merge deltas of one kind")
    return metas


def merge_deltas(deltas: list[str], weights: list[float], how: str, out: str, rank: int | None = None,
                 density: float = 0.2, seed: int = 0, head_from: str | None = None) -> Path:
    """Write the merged delta at `out` (a LoRA delta on the sources' backbone); see the module docstring."""
    if how not in HOWS:
        raise UserError(f"unknown --how '{how}': choose from {', '.join(HOWS)}")
    if not 0 < density <= 1:
        raise UserError(f"--density must be in (0, 1], got {density}")
    claim_output(out, "delta")
    metas = check_sources(deltas, weights)
    sources = [module_updates(d) for d in deltas]
    tensors = [read_tensors(d) for d in deltas]
    heads = [{k: v for k, v in t.items() if not any(k.startswith(m + ".") for m in names)}
             for t, (_, names) in zip(tensors, sources)]
    same = all(h.keys() == heads[0].keys() and all(torch.equal(v, heads[0][k]) for k, v in h.items())
               for h in heads)
    if head_from is None and not same:
        raise UserError("the deltas' task heads differ: pick the one to keep with --head-from DELTA")
    resolved = [Path(d).resolve() for d in deltas]
    if head_from is not None and Path(head_from).resolve() not in resolved:
        raise UserError(f"--head-from {head_from} is not one of the deltas being merged")
    chosen = 0 if head_from is None else resolved.index(Path(head_from).resolve())
    updates = [u for u, _ in sources]
    if rank is None:
        rank = max(int(m["method_config"].get("r", 8)) for m in metas)
    merged, scale = combine(updates, weights, how, rank, density, seed)
    r_out = max(a.shape[0] for a, _ in merged.values())
    state = dict(heads[chosen])
    for name, (a, b) in merged.items():  # zero-padded to one rank: padded rows and columns add nothing
        state[f"{name}.lora_A.default.weight"] = torch.nn.functional.pad(a, (0, 0, 0, r_out - a.shape[0])).contiguous()
        state[f"{name}.lora_B.default.weight"] = torch.nn.functional.pad(b, (0, r_out - b.shape[1])).contiguous()
    config = LoRAConfig(r=r_out, alpha=scale * r_out, target_modules=tuple(sorted(merged)))
    meta = {k: v for k, v in metas[chosen].items() if k not in ("metrics", "history", "train_config")}
    meta.update(method="lora", method_config=config_dict(config), created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                merged_from={"deltas": [str(d) for d in deltas], "weights": weights, "how": how, "rank": rank,
                             "density": density, "seed": seed, "head_from": str(deltas[chosen])})
    with atomic_directory(out, "delta") as tmp:
        save_file(state, str(tmp / TENSORS), metadata={"format": meta["format"]})
        write_json_atomic(tmp / META, meta)
    return Path(out)


def merge(deltas: list[str], *, out: str, weights: str | None = None, how: str = "linear", rank: int | None = None,
          density: float = 0.2, seed: int = 0, head_from: str | None = None) -> int:
    """Merge LoRA-family deltas of one backbone into one LoRA delta (linear, svd, ties, dare_linear, dare_ties).

    Args:
        deltas: Delta directories (lora, vera, loha or lokr; all of one method and one backbone).
        out: Output delta folder (a new path, an empty folder or a delta deltatune wrote).
        weights: Comma-separated weight per delta, applied to each module's ΔW (1,-1: task arithmetic);
            default equal weights summing to 1 (an average: a model soup).
        how: linear (exact: the factors concatenated), svd, ties, dare_linear or dare_ties.
        rank: Rank of the result for svd / ties / dare (default: the largest source rank).
        density: ties / dare: the fraction of each ΔW's entries kept.
        seed: dare: the seed of the random drop.
        head_from: The delta whose task head is kept, when the sources' heads differ.
    """
    try:
        values = [float(w) for w in weights.split(",")] if weights else [1.0 / len(deltas)] * len(deltas)
    except ValueError as exc:
        raise UserError(f"--weights must be comma-separated numbers, got '{weights}'") from exc
    merge_deltas(deltas, values, how, out, rank, density, seed, head_from)
    print(f"wrote {out} (lora delta: {how} merge of {len(deltas)} deltas)")
    return 0
