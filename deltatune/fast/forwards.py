"""Instance-level forwards: a module runs another function while keeping its class, parameter names and
hooks (swiglu.py, recompute.py); undone by dropping the instance attribute."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

LONG_ROWS = 512
"""Rows at least this long take the fast path's memory-saving forms (the SwiGLU keeping only its inputs,
RMSNorms rerun in backward, the freed heap released before a step). Shorter rows keep the plain forms:
at 128 tokens those cost ~2% of a SmolLM2 step for memory that matters little there (RESULTS.md)."""


def long_rows(hidden: torch.Tensor) -> bool:
    """hidden (B, T, H): are its rows LONG_ROWS tokens or more?"""
    return hidden.dim() >= 2 and hidden.shape[-2] >= LONG_ROWS


def replace_forward(modules: list[nn.Module], forward: Callable[..., object]) -> list[nn.Module]:
    """Each module's forward becomes `forward(module, *args, **kwargs)`; returns the modules."""
    for m in modules:
        m.forward = functools.partial(forward, m)
    return modules


def restore_forward(modules: list[nn.Module]) -> None:
    """Their class's forward again."""
    for m in modules:
        m.__dict__.pop("forward", None)
