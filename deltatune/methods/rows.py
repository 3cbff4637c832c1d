"""Row sites: one pass of the frozen backbone in which every row carries its own task's delta (the serve
engine). A module a method inserts meets `RowSite`; `Rows` is what its `row_forward` receives."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Rows:
    """The tensors of a batch at one site: one task's payload unbatched (every row has that delta), or
    gathered per row, (H, ...) for the rows whose task has a delta here, `hit` (H,) indices into the
    batch (None: every row). Rows without a delta here are not computed: they pass through."""

    tensors: tuple[torch.Tensor, ...]
    hit: torch.Tensor | None = None
    batched: bool = False
    """True: tensors are gathered per row (first dimension H; but a site's shared tensors, ROW_FILL None, come
    once, as they are); False: one task's, for each hit row."""

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> the hit rows (H, ...)."""
        return x if self.hit is None else x.index_select(0, self.hit)

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """full (B, ...) with the hit rows replaced by part (H, ...)."""
        return part if self.hit is None else full.index_copy(0, self.hit, part)

    def add(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """full (B, ...) plus part (H, ...) at the hit rows."""
        return full + part if self.hit is None else full.index_add(0, self.hit, part)

    def per_row(self, i: int, fill: float, batch: int) -> torch.Tensor:
        """Payload tensor i for every row of a batch of `batch` rows: (B, ...), `fill` for the rows without
        a delta here; when every row has one, as it is (one task's (...) or every row's (B, ...))."""
        tensor = self.tensors[i]
        if self.hit is None:
            return tensor
        part = tensor if self.batched else tensor.expand(len(self.hit), *tensor.shape)  # (H, ...)
        return part.new_full((batch, *part.shape[1:]), fill).index_copy(0, self.hit, part)


@typing.runtime_checkable
class RowSite(typing.Protocol):
    """A module a method inserts into the backbone (LoRALinear, SVDLinear, IA3Linear, AdapterLayer) that
    can also run a batch whose rows carry different tasks' deltas, or none. Its class offers, beside
    its training forward:

        ROW_FILL      per payload tensor, the value of a row without this delta (the identity); None: the
                      tensor is the same for every task of this row key (passed once, never stacked)
        row_key()     sites with equal keys batch together: same payload layout and row_forward
        row_payload() this task's tensors here, detached; the engine stacks them per key (zero-padded)
        row_forward(key, inner, rows, *args, **kwargs)   (a staticmethod) the frozen `inner` module's
                      call with the deltas of `rows` applied: the same math as the training forward
    """

    ROW_FILL: tuple[float | None, ...]

    def row_key(self) -> str: ...

    def row_payload(self) -> tuple[torch.Tensor, ...]: ...

    def row_forward(self, key: str, inner: nn.Module, rows: Rows, *args: Any, **kwargs: Any) -> Any: ...
