"""Per-row deltas: one pass of the frozen backbone in which every row carries its own task's delta.

The engine keeps a *mixed* copy of the backbone's module tree (sharing every weight) and puts a row
router wherever a served task's method put a row site (`methods.rows.RowSite`: LoRA, AdaLoRA, IA³,
adapters, or any method's module that offers the protocol). Before a batch runs, each router is told
which task each row belongs to and gathers that task's tensors per row; rows whose task has nothing
there pass through. The math is the site's own (`row_forward` in its method file); here is only what is
the same for every method:

    row tasks    [sentiment, q&a, sentiment, translate]                            B = 4
    tables       per router: one (1 + N, ...) table per payload tensor, row 0 the site's identity
                 (ROW_FILL), row i task i's tensor zero-padded (`stack_padded`); rebuilt when a task
                 comes or goes; a tensor whose ROW_FILL is None is the same for every task of the
                 key (VeRA's shared projections) and is passed once, never stacked
    gather       table[index of each row's task], only for the rows with a delta here (`Rows.hit`)
    soft tokens  [x_<at ; P_b ; x_≥at ; pad]          inputs_embeds, each row right-padded, mask
    (ROW_INPUT 'soft_tokens')                        marks its n_b + T_b positions
    prefixes     K = [pad ; P_K,b ; W_K h]            one cache of n_max slots, a row's own n_b unmasked,
    (ROW_INPUT 'prefix')                             position ids n_b + t as if the row ran alone

A task shares the pass only when everything its delta changed is explained by its row sites and its
method's ROW_INPUT / ROW_HOOKS / ROW_TOP_MODULES (`unexplained`); otherwise (BitFit biases, unfrozen
layers, full fine-tuning, a module that is no row site) it runs alone, as its own group.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import Method
from deltatune.methods.rows import Rows, RowSite


def structural_clone(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def find_sites(clone: nn.Module) -> dict[str, RowSite]:
    """The row sites inside a task's (cloned) backbone, by path."""
    return {path: module for path, module in clone.named_modules() if isinstance(module, RowSite)}


def _hook_owners(module: nn.Module) -> list[Any]:
    hooks = itertools.chain(module._forward_pre_hooks.values(), module._forward_hooks.values(),
                            module._backward_hooks.values())
    owners = [getattr(h, "__self__", h) for h in hooks]
    storage = "frozen_weight" in module.__dict__  # a frozen-weight storage's forward (--quantize): not a hook
    return owners + (["forward override"] if "forward" in module.__dict__ and not storage else [])


def unexplained(top: nn.Module, base_name: str, backbone: nn.Module, method: Method,
                vanilla_children: set[str]) -> str | None:
    """Why a task cannot share the mixed pass (a change its row sites and row input do not cover), or None."""
    clone = top.get_submodule(base_name)
    shared = {id(t) for t in itertools.chain(backbone.parameters(), backbone.buffers())}
    own = {id(t) for t in itertools.chain(clone.parameters(), clone.buffers())}
    if not shared <= own:
        return "its delta changes backbone weights"
    sites = find_sites(clone)
    nested = next((p for p in sites if under(p.rpartition(".")[0], set(sites))), None)
    if nested is not None:
        return f"its delta puts the row site '{nested}' inside another one"
    for path, tensor in itertools.chain(clone.named_parameters(), clone.named_buffers()):
        if id(tensor) not in shared and not under(path.rpartition(".")[0], set(sites)):
            return f"its delta adds '{path}', which no row site applies"
    types = {path: type(m) for path, m in backbone.named_modules()}
    for path, module in clone.named_modules():
        if not under(path, set(sites)) and types.get(path) is not type(module):
            return f"its method changes module '{path or base_name}'"
    allowed = [getattr(top, name) for name in method.ROW_HOOKS if getattr(top, name, None) is not None]
    for module in [top, *clone.modules()]:
        if any(owner not in allowed for owner in _hook_owners(module)):
            return "its method hooks the backbone in a way no row input applies"
    extra = set(top._modules) - vanilla_children - set(method.ROW_TOP_MODULES)
    if extra:
        return f"its method adds '{sorted(extra)[0]}' to the model"
    return None


# ---- per-row tables ------------------------------------------------------------------------------------

def stack_padded(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """(1 + N, *shape): entry 0 is `fill` (rows without a delta), entry i is tensors[i - 1] zero-padded
    to the largest shape (zero-padded LoRA ranks and adapter bottlenecks add exactly nothing)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    table = tensors[0].new_zeros((len(tensors) + 1, *shape))
    table[0] = fill
    for i, t in enumerate(tensors, 1):
        table[(i, *(slice(0, s) for s in t.shape))] = t
    return table


class RowRouter(nn.Module):
    """A module of the mixed tree plus, per task, that task's payload at this place (one row key).

    The site class that created the router (`kind`) does the math: its `row_forward` gets the frozen
    `inner` module and the batch's `Rows`: one task's payload unbatched when a single task has a delta
    here, else the tables gathered per row; only the rows with a delta here are computed."""

    def __init__(self, inner: nn.Module, key: str, kind: type[RowSite]):
        super().__init__()
        self.inner = inner
        self.key = key
        self.kind = kind
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}
        self.tables: list[torch.Tensor | None] | None = None
        self.index: dict[str, int] = {}
        self.rows: Rows | None = None
        """This batch's tensors (None: no row has a delta here, the inner module runs alone)."""

    def add(self, task: str, site: RowSite) -> None:
        self.entries[task] = tuple(t.detach() for t in site.row_payload())
        self.tables = None

    def remove(self, task: str) -> None:
        self.entries.pop(task, None)
        self.tables = None

    def begin(self, row_tasks: list[str]) -> None:
        """Prepare a batch whose row b belongs to task row_tasks[b]."""
        self.rows = None  # nothing from an earlier batch survives: rows with no delta here pass through
        present = [t for t in dict.fromkeys(row_tasks) if t in self.entries]
        if not present:
            return
        device = self.entries[present[0]][0].device
        if len(present) == 1:  # one task's payload as it is, on its rows (all of them, or some)
            hit = [b for b, t in enumerate(row_tasks) if t == present[0]]
            self.rows = Rows(self.entries[present[0]],
                             None if len(hit) == len(row_tasks) else torch.tensor(hit, device=device))
            return
        if self.tables is None:
            self.index = {t: i for i, t in enumerate(self.entries, 1)}
            columns = zip(*self.entries.values())
            self.tables = [None if fill is None else stack_padded(list(c), fill)  # None: one tensor for all
                           for c, fill in zip(columns, self.kind.ROW_FILL)]
        rows = torch.tensor([self.index.get(t, 0) for t in row_tasks], device=device)  # (B,)
        hit = None
        if any(t not in self.entries for t in row_tasks):
            hit = rows.nonzero().flatten()  # (H,)
            rows = rows[hit]
        first = self.entries[present[0]]
        self.rows = Rows(tuple(first[i] if table is None else table[rows] for i, table in enumerate(self.tables)),
                         hit, batched=True)

    def end(self) -> None:
        self.rows = None

    def forward(self, *args, **kwargs):
        if self.rows is None:
            return self.inner(*args, **kwargs)
        return self.kind.row_forward(self.key, self.inner, self.rows, *args, **kwargs)


def locate(root: nn.Module, path: str) -> nn.Module:
    """The module at a backbone path in the mixed tree, looking through routers already installed."""
    module = root
    for part in path.split(".") if path else []:
        while part not in module._modules and isinstance(module, RowRouter):
            module = module.inner
        module = module._modules[part]
    return module


def install_router(root: nn.Module, path: str, site: RowSite) -> RowRouter:
    """Wrap the module at `path` (or the router already there) in a new router for `site`'s row key."""
    parent_path, _, name = path.rpartition(".")
    parent = locate(root, parent_path)
    while name not in parent._modules and isinstance(parent, RowRouter):
        parent = parent.inner
    router = RowRouter(parent._modules[name], site.row_key(), type(site))
    setattr(parent, name, router)
    return router
