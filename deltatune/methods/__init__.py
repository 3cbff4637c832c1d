"""The adaptation methods, by name. Adding a method: one file here and one line in `_MODULES`."""

from __future__ import annotations

from typing import Any

from deltatune.errors import UserError
from deltatune.intrinsic import said as intrinsic
from deltatune.methods import (
    adalora,
    adapter,
    badam,
    bitfit,
    dora,
    features,
    full,
    galore,
    head,
    ia3,
    icl,
    knn,
    loha,
    lokr,
    lora,
    mam,
    prefix,
    prompt,
    ptuning,
    s4,
    vera,
)
from deltatune.methods.base import Method, build_config

_MODULES = {
    "features": features,
    "head": head,
    "full": full,
    "galore": galore,
    "badam": badam,
    "lora": lora,
    "adalora": adalora,
    "dora": dora,
    "vera": vera,
    "loha": loha,
    "lokr": lokr,
    "bitfit": bitfit,
    "adapter": adapter,
    "ia3": ia3,
    "mam": mam,
    "prompt": prompt,
    "prefix": prefix,
    "ptuning": ptuning,
    "icl": icl,
    "knn": knn,
    "intrinsic": intrinsic,
    "s4": s4,
}
REGISTRY: dict[str, Method] = {name: Method.of(module) for name, module in _MODULES.items()}
"""Method name -> its contract (`methods/base.py`)."""

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "last2": ("head", {"unfreeze_last": 2}),
    "said": ("intrinsic", {"said": True}),
    "rrlora": ("lora", lora.RRLORA),
}
"""Ready names for a method with options: `last2` is `head` with the last 2 layers unfrozen."""


def method_names() -> list[str]:
    return list(REGISTRY) + list(PRESETS)


def resolve_method(name: str, overrides: dict[str, Any] | None = None) -> tuple[Method, Any]:
    """(method module, its config) for a registry or preset name, with user overrides applied."""
    options: dict[str, Any] = {}
    if name in PRESETS:
        name, preset = PRESETS[name]
        options.update(preset)
    if name not in REGISTRY:
        raise UserError(f"unknown method '{name}': choose from {', '.join(method_names())}")
    options.update(overrides or {})
    method = REGISTRY[name]
    return method, build_config(method.Config, options)
