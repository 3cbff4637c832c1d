"""Row sites (methods/rows.py `RowSite`): the serve engine batches any method's modules per row through the
site's own math, found by the protocol; serve/ knows no method.

A method defined only in this file (a learned shift of the FFN output projections) is served per row
with one registry entry; LoRA, AdaLoRA, IA3 and adapter rows mixed with bare rows (a head-only task) give
each row the logits its task gives alone.
"""

from __future__ import annotations

import dataclasses
import random
import re
import types
from pathlib import Path

import pytest
import torch
from test_serve_engine import TEXTS, TOL, make_delta, reference_logits
from torch import nn

from deltatune.methods import REGISTRY, adalora, adapter, ia3, lora
from deltatune.methods.base import AdaptedLayer, Method, replace_module, resolve_targets, train_head
from deltatune.methods.rows import Rows, RowSite
from deltatune.serve.engine import Engine
from deltatune.serve.routing import RowRouter

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a method as one file: h = W x + c_b on the FFN output projections (a bias delta kept beside the
# frozen layer, so that rows can carry different ones), served per row -----------------------------------

class ShiftLinear(AdaptedLayer):
    def __init__(self, base: nn.Module):
        super().__init__(base, "default")
        self.shift = nn.Parameter(torch.zeros(self.out_features))  # trainable; the backbone is frozen

    def forward(self, x):  # (B, T, k) -> (B, T, d)
        return self.base_layer(x) + self.shift

    ROW_FILL = (0.0,)

    def row_key(self) -> str:
        return "shift"

    def row_payload(self) -> tuple[torch.Tensor]:
        return (self.shift.detach(),)  # (d,)

    @staticmethod
    def row_forward(key, inner, rows: Rows, x):
        out = inner(x)  # (B, T, d)
        return rows.put(out, rows.take(out) + rows.tensors[0].unsqueeze(-2))  # + (1, d) or (H, 1, d)


@dataclasses.dataclass
class ShiftConfig:
    roles: tuple[str, ...] = ("ffn_out",)


def shift_apply(task_model, config):
    module = task_model.module
    for name in resolve_targets(task_model, config.roles):
        replace_module(module, name, ShiftLinear(module.get_submodule(name)))
    train_head(task_model)


SHIFT = types.ModuleType("shift")
SHIFT.__dict__.update(NAME="shift", Config=ShiftConfig, DEFAULT_LR=1e-2, apply=shift_apply)

METHODS = ["lora", "adalora", "ia3", "adapter", "head", "shift"]


class Served:
    def __init__(self, root: Path, model: str):
        self.paths = {m: make_delta(root / m, model, m, seed=i) for i, m in enumerate(METHODS)}
        self.engine = Engine(model, device="cpu")
        for name, path in self.paths.items():
            self.engine.add_task(name, path)
        self.reference = {name: reference_logits(path, model, TEXTS) for name, path in self.paths.items()}

    def worst(self, names: list[str], seed: int) -> dict[str, float]:
        """One classify call over every text of each task, rows shuffled: worst |logit - alone| per task."""
        items = [(name, i) for name in names for i in range(len(TEXTS))]
        random.Random(seed).shuffle(items)
        results = self.engine.classify([(name, TEXTS[i]) for name, i in items])
        worst: dict[str, float] = {}
        for (name, i), result in zip(items, results):
            diff = (torch.tensor(result["logits"]) - self.reference[name][i]).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
        assert {g for g, _ in self.engine.stats.last.groups} == {"shared"}  # mixed passes, nobody alone
        return worst


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(REGISTRY, "shift", Method.of(SHIFT))  # the one registry line
        yield Served(tmp_path_factory.mktemp("row-sites"), tiny_dir("bert"))


def test_a_site_class_defined_in_a_test_file_is_served_per_row(served):
    task = served.engine.tasks["shift"]
    assert task.group == "shared" and task.sites and all(isinstance(s, ShiftLinear) for s in task.sites.values())
    kinds = {router.key: router.kind for router in served.engine.routers.values()}
    assert kinds["shift"] is ShiftLinear
    worst = served.worst(["shift", "lora", "head"], seed=1)
    assert max(worst.values()) <= TOL, worst
    assert max(served.worst(["shift", "head"], seed=2).values()) <= TOL  # one task's payload, some rows bare


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "adapter"])
def test_rows_of_a_method_mixed_with_bare_rows_equal_each_alone(served, method):
    worst = served.worst([method, "head"], seed=len(method))
    assert max(worst.values()) <= TOL, worst


def test_every_site_kind_and_bare_rows_in_one_pass(served):
    worst = served.worst(METHODS, seed=3)
    assert max(worst.values()) <= TOL, worst
    lora_routers = [r for r in served.engine.routers.values() if r.key == "lora"]
    assert lora_routers and all(set(r.entries) == {"lora", "adalora"} for r in lora_routers)  # one table each


def test_sites_are_found_by_the_protocol_and_serve_names_no_method():
    assert all(issubclass(kind, nn.Module) and hasattr(kind, "row_forward") for kind in
               (lora.LoRALinear, adalora.SVDLinear, ia3.IA3Linear, adapter.AdapterLayer))
    site = lora.LoRALinear(nn.Linear(4, 3), r=2, alpha=4.0, dropout=0.0)
    assert isinstance(site, RowSite) and not isinstance(nn.Linear(4, 3), RowSite)
    serve = Path(lora.__file__).parents[1] / "serve"
    pattern = re.compile(r"__name__ ==|SVDLinear|LoRALinear|IA3|Adapter|\"(lora|adalora|ia3|adapter)\"")
    hits = [f"{p.name}:{i}" for p in serve.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_router_computes_only_the_rows_with_a_delta():
    """LoRALinear.row_forward on gathered per-row tensors: the hit rows get their own task's update, the
    other rows exactly the frozen layer's output."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    sites = [lora.LoRALinear(base, r=r, alpha=2.0 * r, dropout=0.0) for r in (2, 3)]
    for site in sites:
        nn.init.normal_(site.lora_B["default"].weight)
    router = RowRouter(base, "lora", lora.LoRALinear)
    for name, site in zip(("a", "b"), sites):
        router.add(name, site)
    x = torch.randn(4, 7, 6)  # (B, T, k)
    router.begin(["b", None, "a", None])
    with torch.no_grad():
        out = router(x)
        router.end()
        expected = [sites[1](x[0]), base(x[1]), sites[0](x[2]), base(x[3])]
    for row, want in enumerate(expected):
        torch.testing.assert_close(out[row], want)
    assert torch.equal(out[1], base(x[1]).detach())


def test_a_router_forgets_the_last_batch_when_no_row_is_its_own():
    """begin() with rows of other tasks only: the router passes them through (no stale per-row tensors)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    site = lora.LoRALinear(base, r=2, alpha=4.0, dropout=0.0)
    nn.init.normal_(site.lora_B["default"].weight)
    router = RowRouter(base, "lora", lora.LoRALinear)
    router.add("a", site)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        router.begin(["a", "a"])
        assert not torch.equal(router(x), base(x))
        router.begin(["b", "b"])  # no end() in between: a new batch of other tasks' rows
        torch.testing.assert_close(router(x), base(x))
