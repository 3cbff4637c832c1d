"""Per-row deltas: one pass of the frozen backbone in which every row carries its own task's delta.

The engine keeps a *mixed* copy of the backbone's module tree (sharing every weight) and puts a row
router wherever a served task's method acts. Before a batch runs, each router is told which task each
row belongs to and gathers that task's tensors per row; rows whose task has nothing there pass through.

    row tasks    [sentiment, q&a, sentiment, translate]                            B = 4
    LoRA         h = W0 x + s_b · (x A_bᵀ) B_bᵀ       A_b, B_b gathered per row, zero-padded ranks,
                                                     batched matmuls (Punica / S-LoRA)
    AdaLoRA      the same with A_b = λ_b ⊙ Q_b
    IA³          k' = l_b ⊙ W_k x  (or W_2 (l_b ⊙ x))  l_b gathered per row (ones: no IA³ here)
    adapters     y + s_b · Up_b f(Down_b y)           per-row bottleneck weights, zero-padded
    soft tokens  [x_<at ; P_b ; x_≥at ; pad]          inputs_embeds, each row right-padded, mask
    (prompt, P-tuning)                               marks its n_b + T_b positions
    prefixes     K = [pad ; P_K,b ; W_K h]            one cache of n_max slots, a row's own n_b unmasked,
    (prefix, MAM)                                    position ids n_b + t as if the row ran alone

ROUTING says, per method, which modules it adds (by class name), which hook objects it installs and
which per-row input it needs. A task shares the pass only when everything its delta changed is
explained that way (`unexplained`); otherwise (BitFit biases, unfrozen layers, full fine-tuning, a
method without a router) it runs alone, as its own group.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.adapter import ACTIVATIONS, AdapterLayer, bottleneck_update
from deltatune.methods.ia3 import rescale


@dataclass(frozen=True)
class Routing:
    """What one method changes, in terms the engine can route per row."""

    sites: tuple[str, ...] = ()
    """Class names of the modules the method puts inside the backbone (each gets a row router)."""
    inputs: str | None = None
    """'soft_tokens' or 'prefix': a per-row input the engine builds before the pass."""
    hooks: tuple[str, ...] = ()
    """Attributes of the task model holding the hook objects the method installs (explained by `inputs`)."""
    top_modules: tuple[str, ...] = ()
    """Children the method adds to the task model outside the backbone (its prompt encoder)."""


SOFT_TOKENS = Routing(inputs="soft_tokens", hooks=("prompt_hooks",), top_modules=("prompt_encoder",))
PREFIX = Routing(inputs="prefix", hooks=("prefix_hooks",), top_modules=("prompt_encoder",))
ROUTING: dict[str, Routing] = {
    "features": Routing(),
    "head": Routing(),  # with unfreeze_last > 0 its layers are private copies: `unexplained` says so
    "lora": Routing(sites=("LoRALinear",)),
    "adalora": Routing(sites=("SVDLinear",)),
    "ia3": Routing(sites=("IA3Linear",)),
    "adapter": Routing(sites=("AdapterLayer",)),
    "prompt": SOFT_TOKENS,
    "ptuning": SOFT_TOKENS,
    "prefix": PREFIX,
    "mam": Routing(sites=("AdapterLayer",), inputs="prefix", hooks=PREFIX.hooks, top_modules=PREFIX.top_modules),
}
"""Method name -> what its row router handles. bitfit and full are absent: they change shared weights."""


def structural_clone(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def find_sites(clone: nn.Module, routing: Routing) -> dict[str, nn.Module]:
    """The method's modules inside the (cloned) backbone, by path; nested sites count once."""
    sites: dict[str, nn.Module] = {}
    for path, module in clone.named_modules():
        if type(module).__name__ in routing.sites and not under(path, set(sites)):
            sites[path] = module
    return sites


def _hook_owners(module: nn.Module) -> list[Any]:
    hooks = itertools.chain(module._forward_pre_hooks.values(), module._forward_hooks.values(),
                            module._backward_hooks.values())
    owners = [getattr(h, "__self__", h) for h in hooks]
    return owners + (["forward override"] if "forward" in module.__dict__ else [])


def unexplained(top: nn.Module, base_name: str, backbone: nn.Module, routing: Routing | None,
                vanilla_children: set[str]) -> str | None:
    """Why a task cannot share the mixed pass (a change its routing does not cover), or None."""
    clone = top.get_submodule(base_name)
    shared = {id(t) for t in itertools.chain(backbone.parameters(), backbone.buffers())}
    own = {id(t) for t in itertools.chain(clone.parameters(), clone.buffers())}
    if not shared <= own:
        return "its delta changes backbone weights"
    if routing is None:
        return "no row router for this method"
    sites = set(find_sites(clone, routing))
    for path, tensor in itertools.chain(clone.named_parameters(), clone.named_buffers()):
        if id(tensor) not in shared and not under(path.rpartition(".")[0], sites):
            return f"its delta adds '{path}', which no row router applies"
    types = {path: type(m) for path, m in backbone.named_modules()}
    for path, module in clone.named_modules():
        if not under(path, sites) and types.get(path) is not type(module):
            return f"its method changes module '{path or base_name}'"
    allowed = [getattr(top, name) for name in routing.hooks if getattr(top, name, None) is not None]
    for module in [top, *clone.modules()]:
        if any(owner not in allowed for owner in _hook_owners(module)):
            return "its method hooks the backbone in a way no row router applies"
    extra = set(top._modules) - vanilla_children - set(routing.top_modules)
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
    """A module of the mixed tree plus, per task, that task's delta tensors at this place.

    Each task's payload is a tuple of tensors; they are stacked once into tables (rebuilt only when a
    task comes or goes), and a batch gathers its rows from them with one index."""

    FILL: tuple[float, ...] = ()
    """Per payload tensor: the value of rows whose task has no delta here (the identity)."""

    def __init__(self, inner: nn.Module, key: str):
        super().__init__()
        self.inner = inner
        self.key = key
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}
        self.tables: list[torch.Tensor] | None = None
        self.index: dict[str, int] = {}
        self.active = False
        self.single: Any = None  # every row has the same task here: its unbatched payload
        self.rows: Any = None  # per-row tensors for this batch (of the `hit` rows only)
        self.hit: torch.Tensor | None = None
        """Indices of the rows whose task has a delta here, when some have none (None: every row has one);
        only those rows are computed: the others pass through, so a mixed batch pays for a kind of delta
        in proportion to its rows."""

    def add(self, task: str, site: nn.Module) -> None:
        self.entries[task] = self.payload(site)
        self.tables = None

    def remove(self, task: str) -> None:
        self.entries.pop(task, None)
        self.tables = None

    def begin(self, row_tasks: list[str]) -> None:
        """Prepare a batch whose row b belongs to task row_tasks[b]."""
        present = [t for t in dict.fromkeys(row_tasks) if t in self.entries]
        self.active = bool(present)
        if not present:
            return
        if len(present) == 1 and len(set(row_tasks)) == 1:
            self.single = self.entries[present[0]]
            return
        if self.tables is None:
            self.index = {t: i for i, t in enumerate(self.entries, 1)}
            columns = zip(*self.entries.values())
            self.tables = [stack_padded(list(c), fill) for c, fill in zip(columns, self.FILL)]
        rows = torch.tensor([self.index.get(t, 0) for t in row_tasks], device=self.tables[0].device)
        if any(t not in self.entries for t in row_tasks):
            self.hit = rows.nonzero().flatten()  # (H,)
            rows = rows[self.hit]
        self.rows = self.finish([table[rows] for table in self.tables])

    def end(self) -> None:
        self.active, self.single, self.rows, self.hit = False, None, None, None

    def hit_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> the rows with a delta here (H, ...)."""
        return x if self.hit is None else x.index_select(0, self.hit)

    def scatter(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """full (B, ...) with the hit rows replaced by part (H, ...)."""
        return part if self.hit is None else full.index_copy(0, self.hit, part)

    def payload(self, site: nn.Module) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def finish(self, gathered: list[torch.Tensor]) -> Any:
        """Per-row tensors (B, ...) gathered from the tables -> what forward uses."""
        return gathered


class LoRARouter(RowRouter):
    """h = W0 x + s_b (x A_bᵀ) B_bᵀ per row (LoRA; AdaLoRA with A = λ ⊙ Q)."""

    FILL = (0.0, 0.0, 0.0)

    def payload(self, site: nn.Module) -> tuple[torch.Tensor, ...]:
        name = site.active_adapter
        if type(site).__name__ == "SVDLinear":  # AdaLoRA: P Λ Q, dropped triplets masked
            a, b = site.lora_A[name] * (site.lora_E[name] * site.rank_mask(name)), site.lora_B[name]  # (r, k)
        else:
            a, b = site.lora_A[name].weight, site.lora_B[name].weight
        return a.detach(), b.detach(), a.new_tensor(site.scaling[name])

    def finish(self, gathered):
        a, b, scale = gathered  # (B, r_max, k), (B, d, r_max), (B,)
        return a, b, scale.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if not self.active:
            return out
        if self.single is not None:
            a, b, scale = self.single
            return out + (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(out.dtype)
        a, b, scale = self.rows
        update = (self.hit_rows(x).to(a.dtype) @ a.transpose(1, 2)) @ b.transpose(1, 2)  # (H, T, r) -> (H, T, d)
        update = (update * scale).to(out.dtype)
        return out + update if self.hit is None else out.index_add(0, self.hit, update)


class IA3Router(RowRouter):
    """Rescale a projection's output (key 'ia3:out') or input ('ia3:in') by the row's vector."""

    FILL = (1.0,)

    def payload(self, site: nn.Module) -> tuple[torch.Tensor]:
        vector = site.ia3_l[site.active_adapter].detach().flatten()
        if site.is_feedforward:
            return (vector,)  # (in,)
        full = vector.new_ones(site.out_features)  # (out,): ones outside the scaled span
        full[site.span[0]:site.span[1]] = vector
        return (full,)

    def finish(self, gathered):
        return gathered[0].unsqueeze(1)  # (B, 1, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.inner(x)
        if self.key == "ia3:in":
            return self.inner(self.scaled(x))
        return self.scaled(self.inner(x))

    def scaled(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, n) times each row's vector; only the rows with IA3 here are touched."""
        if self.single is not None:
            return rescale(h, self.single[0], 0, h.shape[-1])
        return self.scatter(h, rescale(self.hit_rows(h), self.rows, 0, h.shape[-1]))  # rows: (H, 1, n)


class AdapterRouter(RowRouter):
    """Bottleneck adapters per row; the serial / parallel / residual wiring is AdapterLayer's own."""

    FILL = (0.0,) * 5  # zero rows add nothing: f(0) = 0 for every activation, Up = 0

    def __init__(self, inner: nn.Module, key: str):
        super().__init__(inner, key)
        _, self.mode, self.activation_name = key.split(":")
        self.active_adapter = "rows"

    @property
    def base_layer(self) -> nn.Module:
        return self.inner

    def payload(self, site: nn.Module) -> tuple[torch.Tensor, ...]:
        name = site.active_adapter
        down, up = site.adapter_down[name], site.adapter_up[name]
        return (down.weight.detach(), down.bias.detach(), up.weight.detach(), up.bias.detach(),
                down.weight.new_tensor(site.scaling[name]))

    def finish(self, gathered):
        down_w, down_b, up_w, up_b, scale = gathered  # (B, m, d), (B, m), (B, d, m), (B, d), (B,)
        return down_w, down_b.unsqueeze(1), up_w, up_b.unsqueeze(1), scale.view(-1, 1, 1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        if self.single is not None:
            down_w, down_b, up_w, up_b, scale = self.single
            out = bottleneck_update(x.to(down_w.dtype), down_w, down_b, up_w, up_b, ACTIVATIONS[self.activation_name])
            return (out * scale).to(x.dtype)
        down_w, down_b, up_w, up_b, scale = self.rows  # the hit rows' weights: (H, m, d), ...
        part = self.hit_rows(x)
        out = bottleneck_update(part.to(down_w.dtype), down_w, down_b, up_w, up_b, ACTIVATIONS[self.activation_name])
        out = (out * scale).to(x.dtype)  # (H, T, d)
        return out if self.hit is None else x.new_zeros(x.shape).index_copy(0, self.hit, out)

    def forward(self, *args, **kwargs):
        if not self.active:
            return self.inner(*args, **kwargs)
        return AdapterLayer.forward(self, *args, **kwargs)


def router_key(site: nn.Module) -> str:
    """Which router applies a site: one router per (place, key) handles every task's delta there."""
    kind = type(site).__name__
    if kind == "IA3Linear":
        return "ia3:in" if site.is_feedforward else "ia3:out"
    if kind == "AdapterLayer":
        return f"adapter:{site.mode}:{site.activation[site.active_adapter]}"
    return "lora"


ROUTERS: dict[str, type[RowRouter]] = {"lora": LoRARouter, "ia3": IA3Router, "adapter": AdapterRouter}
"""Router key prefix -> router class."""


def locate(root: nn.Module, path: str) -> nn.Module:
    """The module at a backbone path in the mixed tree, looking through routers already installed."""
    module = root
    for part in path.split(".") if path else []:
        while part not in module._modules and isinstance(module, RowRouter):
            module = module.inner
        module = module._modules[part]
    return module


def install_router(root: nn.Module, path: str, key: str) -> RowRouter:
    """Wrap the module at `path` (or the router already there) in a new router for `key`."""
    parent_path, _, name = path.rpartition(".")
    parent = locate(root, parent_path)
    while name not in parent._modules and isinstance(parent, RowRouter):
        parent = parent.inner
    router = ROUTERS[key.split(":")[0]](parent._modules[name], key)
    setattr(parent, name, router)
    return router


# ---- per-row inputs: soft tokens and prefixes -----------------------------------------------------------

def splice_soft_tokens(embeds: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                       soft: list[tuple[torch.Tensor, int] | None]):
    """Each row as it would enter the backbone alone: [x_<at ; P ; x_≥at], right-padded to the longest.

    embeds (B, T, H), mask (B, T), soft[b] = (P (n_b, H), at) or None -> (B, W, H), (B, W), types."""
    lengths = mask.sum(1).tolist()
    sizes = [s[0].shape[0] if s is not None else 0 for s in soft]
    width = max(t + n for t, n in zip(lengths, sizes))
    out = embeds.new_zeros(embeds.shape[0], width, embeds.shape[2])  # (B, W, H)
    out_mask = mask.new_zeros(mask.shape[0], width)
    out_types = types.new_zeros(types.shape[0], width) if types is not None else None
    for b, (t, n, s) in enumerate(zip(lengths, sizes, soft)):
        at = min(s[1], embeds.shape[1]) if s is not None else t
        out[b, :at] = embeds[b, :at]
        out[b, at + n:t + n] = embeds[b, at:t]
        out_mask[b, :t + n] = 1
        if s is not None:
            out[b, at:at + n] = s[0].to(embeds.dtype)
        if out_types is not None:
            out_types[b, :at] = types[b, :at]
            out_types[b, at + n:t + n] = types[b, at:t]
            if n and at:  # the hooks give soft tokens the type of the token they follow
                out_types[b, at:at + n] = types[b, at]
    return out, out_mask, out_types


def prefix_inputs(config, prefixes: list[torch.Tensor | None], mask: torch.Tensor):
    """One cache for a batch: row b's prefix (L, 2, n_b, kv_dim) in the last n_b of n_max slots.

    -> (PrefixCache, attention mask (B, n_max + W), position ids (B, W): n_b + t, as alone)."""
    from deltatune.methods.prefix import PrefixCache, kv_shape

    shape = kv_shape(config)
    sizes = [p.shape[2] if p is not None else 0 for p in prefixes]
    n_max, (batch, width) = max(sizes), mask.shape
    first = next(p for p in prefixes if p is not None)
    kv = first.new_zeros(batch, shape.layers, 2, n_max, shape.kv_dim)  # (B, L, 2, n_max, kv_dim)
    prefix_mask = mask.new_zeros(batch, n_max)
    for b, (n, p) in enumerate(zip(sizes, prefixes)):
        if p is not None:
            kv[b, :, :, n_max - n:] = p
            prefix_mask[b, n_max - n:] = 1
    positions = torch.tensor(sizes, device=mask.device)[:, None] + torch.arange(width, device=mask.device)
    return PrefixCache(kv, shape), torch.cat([prefix_mask, mask], dim=1), positions
