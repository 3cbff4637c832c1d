"""What the input-changing methods share (prompt tuning, P-tuning, prefix tuning; their encoder-decoder
hooks in seq2seq.py): the names of their modules, splicing blocks into a sequence, the position ids a
caller's cache implies, installing their hooks once. Kept apart from prompt.py / prefix.py so that
seq2seq.py, which both of those pick for T5, imports neither of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.decoding.cache import attention_layers
from deltatune.errors import UserError

ADAPTER = "default"
"""peft's adapter name: the prompt encoder is `prompt_encoder["default"]`."""
PLACEMENTS = ("start", "after_first")
"""Where soft tokens go: before everything, or after the first token ([CLS] / BOS)."""


def splice(x: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    """Insert block (B, n, ...) into x (B, T, ...) at sequence position `at`: (B, T+n, ...)."""
    return torch.cat([x[:, :at], block, x[:, at:]], dim=1)


def max_positions(config) -> int | None:
    """Learned absolute position tables (BERT, GPT-2) cap the sequence length."""
    if getattr(config, "position_embedding_type", "absolute") != "absolute" or config.model_type == "llama":
        return None
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def positional_kwargs(args: tuple, kwargs: dict) -> dict:
    """Every model forward here takes (input_ids, attention_mask, ...): name positional inputs."""
    if len(args) > 2:
        raise UserError("soft-token methods take the model inputs as keyword arguments")
    return {**dict(zip(("input_ids", "attention_mask"), args)), **kwargs}


def shift_positions(position_ids: torch.Tensor | None, n: int, at: int | None) -> torch.Tensor | None:
    """Positions after n inserted slots: +n from `at` on, and at..at+n-1 for the slots (at=None: all +n)."""
    if position_ids is None or at is None:
        return None if position_ids is None else position_ids + n
    slots = torch.arange(at, at + n, device=position_ids.device).expand(position_ids.shape[0], n)
    return torch.cat([position_ids[:, :at], slots, position_ids[:, at:] + n], dim=1)


def earlier_tokens(kwargs: dict, width: int) -> int:
    """Tokens before these `width` new ones that sit in the caller's cache (transformers' `generate` after
    its first step), read from the attention mask (wider than the new tokens) or the position ids (which
    continue past them), never from the cache argument, whose name changes between versions."""
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    seen = mask.shape[1] - width if mask is not None and mask.dim() == 2 else 0
    if positions is not None and positions.numel():
        seen = max(seen, int(positions.max()) + 1 - width)
    return max(seen, 0)


def is_decoding(kwargs: dict, width: int) -> bool:
    """A generation step after the first: the inserted slots already sit in the caller's cache."""
    return earlier_tokens(kwargs, width) > 0


def install_once(task_model: TaskModel, attr: str, make_hooks: Callable[[], Any]) -> Any:
    """Hooks made by `make_hooks` kept as `module.<attr>`, replacing (removing) earlier ones there; methods
    with such hooks (soft tokens, prefixes) are never skipped by the frozen-prefix cache."""
    module = task_model.module
    if getattr(module, attr, None) is not None:
        getattr(module, attr).remove()
    setattr(module, attr, make_hooks())
    module.no_prefix_cache = True
    return getattr(module, attr)


def refuse_reentrant(module: nn.Module, layers: nn.ModuleList) -> None:
    """Reentrant checkpointing would backpropagate through the shared prefix once per layer."""
    if not (module.training and torch.is_grad_enabled()):
        return
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and \
                getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
            raise UserError("prefix tuning needs non-reentrant gradient checkpointing: "
                            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")


def prefix_layers(model: nn.Module, rows: list[int] | None, stored: int) -> dict[int, int]:
    """id(attention module) -> index into a prefix of `stored` layers: every layer, or (`layers`) the
    chosen ones, whose prefixes sit in order when the prefix has only those."""
    layer_of = attention_layers(model)
    if rows is None:
        return layer_of
    index = {layer: (layer if stored > len(rows) else k) for k, layer in enumerate(rows)}
    return {m: index[layer] for m, layer in layer_of.items() if layer in index}
