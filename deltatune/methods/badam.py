"""BAdam (Luo et al., NeurIPS 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for
Large Language Models"): block coordinate descent with Adam as the inner solver.

    θ = (θ_1, ..., θ_D)       one block per transformer layer (the head trains all along)
    for each block π (in `order`), K = `switch_every` optimizer steps:
        θ_π ← θ_π − η · AdamW(∂L/∂θ_π)          the other blocks frozen: no gradient, no optimizer state
        then the block's Adam moments are dropped and the next block starts from fresh moments

Memory: gradients and Adam state of one layer at a time (the seed's table puts it at LoRA's row); the
backward still runs down to the active block. The delta is every layer's weights (all blocks train in
turn). The algorithm is written here on top of any --optimizer (AdamW or 8-bit AdamW): the `badam`
package's BlockOptimizer expects a Hugging Face Trainer or DeepSpeed around it, keeps an extra fp32
copy of the active block, and prints to stdout at every switch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.methods.base import already_merged, train_head, trainable_state
from deltatune.options import option

NAME = "badam"
DEFAULT_LR = 2e-4
"""Higher than full fine-tuning's 5e-5: one block moves at a time, so each sees K steps, not all of them.
At 5e-5 MiniLM on rotten-tomatoes (2,000 examples, 2 epochs, 126 steps) predicted one class (accuracy
0.578, macro-F1 0.366, with or without block switching); at 2e-4 it reached 0.727 (benchmarks/RESULTS.md)."""
RESTORE_BEST_EPOCH = False
"""The best-epoch copy would hold only the active block: keep the end state."""


@dataclass
class Config:
    switch_every: int = option(50, ge=1)
    """K: optimizer steps on one block before switching to the next."""
    order: str = option("descending", choices=("descending", "ascending", "random"))
    """Block order: from the top layer down (the paper's default), from the bottom up, or a random
    permutation per pass (seeded by `seed`)."""
    seed: int = option(0, ge=0)
    """Seed of the random order."""


def blocks(task_model: TaskModel) -> list[list[nn.Parameter]]:
    """The parameters of each transformer layer (encoder, then decoder), bottom to top."""
    arch = task_model.arch
    stacks = [task_model.backbone.get_submodule(p) for p in (arch.layers, arch.decoder_layers) if p]
    return [list(layer.parameters()) for stack in stacks for layer in stack]


def apply(task_model: TaskModel, config: Config) -> None:
    for block in blocks(task_model):
        for p in block:
            p.requires_grad_(True)  # every block trains (in turn); the optimizer freezes all but one
    train_head(task_model)


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """Every block's weights and the head (not only the block active at the end)."""
    names = {id(p) for block in blocks(task_model) for p in block}
    head = set(task_model.head_names)
    return {n: p.detach().to("cpu").contiguous() for n, p in task_model.module.named_parameters()
            if id(p) in names or n in head} | trainable_state(task_model.module)


class BlockSwitching:
    """Mixed into an Adam-type optimizer over every block: `step` updates the parameters that have a
    gradient (the active block and the head) and every K steps moves to the next block."""

    def setup(self, blocks: list[list[nn.Parameter]], config: Config) -> None:
        self.blocks, self.switch_every, self.order = blocks, config.switch_every, config.order
        self.rng, self.steps, self.queue = random.Random(config.seed), 0, []
        self.active = self._next()
        for i, block in enumerate(blocks):
            for p in block:
                p.requires_grad_(i == self.active)

    def _next(self) -> int:
        if not self.queue:
            self.queue = list(range(len(self.blocks)))
            if self.order == "descending":
                self.queue.reverse()
            elif self.order == "random":
                self.rng.shuffle(self.queue)
        return self.queue.pop(0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps % self.switch_every == 0 and len(self.blocks) > 1:
            for p in self.blocks[self.active]:  # its moments go: a block restarts from fresh ones
                self.state.pop(p, None)
                p.grad = None
                p.requires_grad_(False)
            self.active = self._next()
            for p in self.blocks[self.active]:
                p.requires_grad_(True)
        return loss


def make_optimizer(task_model: TaskModel, config: Config, groups: list[dict[str, Any]], lr: float,
                   name: str) -> torch.optim.Optimizer:
    from deltatune.optimizers import optimizer_class

    base = optimizer_class(name, task_model.device())
    optimizer = type(f"BAdam{base.__name__}", (BlockSwitching, base), {})(groups, lr=lr)
    optimizer.setup(blocks(task_model), config)
    return optimizer


merge = already_merged  # the trained weights are the model's own
