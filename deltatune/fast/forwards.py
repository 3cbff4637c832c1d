"""Instance-level forwards: a module runs another function while keeping its class, parameter names and
hooks (swiglu.py, recompute.py); undone by dropping the instance attribute."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn


def replace_forward(modules: list[nn.Module], forward: Callable[..., object]) -> list[nn.Module]:
    """Each module's forward becomes `forward(module, *args, **kwargs)`; returns the modules."""
    for m in modules:
        m.forward = functools.partial(forward, m)
    return modules


def restore_forward(modules: list[nn.Module]) -> None:
    """Their class's forward again."""
    for m in modules:
        m.__dict__.pop("forward", None)
