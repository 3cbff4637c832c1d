"""The delta sizes the estimate counts, read from each method's own Config (no second table of defaults).

    method     read from                                  what it sizes
    lora       lora.Config: r, target_modules, layers      B·A on the target roles
    qlora      lora.Config (a projection: no method yet)   the same LoRA on a k-bit backbone
    adalora    adalora.Config: init_r, target_modules      the rank at the start (pruned later: the peak)
    adapter    adapter.Config: bottleneck or hidden //     two serial adapters (attn_ffn), or one parallel
               reduction_factor (as adapter.apply), layers  adapter beside the FFN
    prompt     prompt.Config: num_virtual_tokens           n soft tokens
    ptuning    ptuning.Config: num_virtual_tokens,          n soft tokens + the MLP encoder h→e→e→h
               encoder_hidden_size (0: hidden)
    prefix     prefix.Config: num_virtual_tokens,           n keys and values per layer (+ the MLP
               projection, encoder_hidden_size, layers      P' → e → (L, 2, n, kv) while it trains)
    ia3        ia3.Config: target_modules,                  l scales the outputs of targets, and the inputs
               feedforward_modules                          of the feed-forward ones
    mam        mam.Config: prefix + parallel adapter        composed as mam.apply composes them
    lora, qlora, rrlora, dora, vera, loha, lokr             what each adds to one adapted matrix: the method
               (side updates)                               file's own `estimate_site(config, k, d)` hook

The Config is looked up on the method module at each call (`lora.Config`), so an option's default lives in
one place. Roles (query, key, value, attn_out, ffn_in, ffn_out) map to the estimate's layer matrices.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from deltatune.errors import UserError
from deltatune.methods import (
    adalora,
    adapter,
    dora,
    galore,
    ia3,
    loha,
    lokr,
    lora,
    mam,
    prefix,
    prompt,
    ptuning,
    vera,
)
from deltatune.methods.base import Method, SiteEstimate, build_config

CONFIGURED: dict[str, ModuleType] = {"lora": lora, "qlora": lora, "adalora": adalora, "adapter": adapter,
                                     "prompt": prompt, "ptuning": ptuning, "prefix": prefix, "ia3": ia3,
                                     "mam": mam, "galore": galore}
"""The methods whose sizes depend on their options, and the module whose Config holds them."""
SITE_METHODS: dict[str, ModuleType] = {"lora": lora, "qlora": lora, "rrlora": lora, "dora": dora, "vera": vera,
                                       "loha": loha, "lokr": lokr}
"""Side-update methods: the method file sizes each adapted matrix (its `estimate_site`); qlora and the preset
rrlora are LoRA's."""
ROLES = {"query": "q", "key": "k", "value": "v", "attn_out": "o", "ffn_out": "down"}
"""deltatune's roles -> the estimate's matrices (`ModelShapes.layer_linears`); ffn_in: `ffn_in_roles`."""


def preset_options(method: str) -> dict[str, Any]:
    """A preset's options (rrlora: lora with random_ranks 1-16, `lora.RRLORA`), else none."""
    return dict(lora.RRLORA) if method == "rrlora" else {}


def method_config(method: str, options: dict[str, Any] | None = None) -> Any | None:
    """The method's Config with `options` over its defaults (None for methods without size options)."""
    if method in SITE_METHODS:
        return build_config(SITE_METHODS[method].Config, {**preset_options(method), **(options or {})})
    module = CONFIGURED.get(method)
    return None if module is None else build_config(module.Config, dict(options or {}))


def site_estimate(method: str, config: Any, in_features: int, out_features: int) -> SiteEstimate:
    """What `method` adds to one adapted matrix, from its own file's `estimate_site`."""
    return Method.of(SITE_METHODS[method]).estimate_site(config, in_features, out_features)


def target_roles(targets: tuple[str, ...], family: str, method: str) -> tuple[str, ...]:
    """Target roles -> matrices of one layer, each once; GPT-2's fused c_attn serves query, key and value."""
    roles: list[str] = []
    for target in targets:
        if target == "ffn_in":
            roles += ["up"] if family != "llama" else ["gate", "up"]
        elif target in ROLES:
            roles.append("qkv" if family == "gpt2" and target in ("query", "key", "value") else ROLES[target])
        else:
            raise UserError(f"{method}: the estimate knows target roles ({', '.join([*ROLES, 'ffn_in'])}), "
                            f"not the module name '{target}'")
    return tuple(dict.fromkeys(roles))


def ia3_roles(config: Any, family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(output-scaled, input-scaled) matrices of IA3. On GPT-2's fused c_attn the output vector covers one
    third per scaled role: "qkv" appears once per third (key, value: twice)."""
    feedforward = set(config.feedforward_modules)
    outputs = [t for t in config.target_modules if t not in feedforward]
    fused = [t for t in outputs if family == "gpt2" and t in ("query", "key", "value")]
    scaled_out = target_roles(tuple(t for t in outputs if t not in fused), family, "ia3") + ("qkv",) * len(fused)
    scaled_in = target_roles(tuple(t for t in config.target_modules if t in feedforward), family, "ia3")
    return scaled_out, scaled_in


def adapter_bottleneck(config: Any, hidden: int) -> int:
    """m of an adapter, as `adapter.apply` sizes it (also MAM's parallel adapter)."""
    size = config.bottleneck or hidden // max(1, config.reduction_factor)
    if size < 1:
        raise UserError(f"adapter: bottleneck size must be at least 1 (hidden size {hidden})")
    return size


def chosen_layers(config: Any, n_layers: int) -> set[int]:
    """The layers a method's `layers` option selects (every layer when it has none or it is None)."""
    layers = getattr(config, "layers", None)
    return set(range(n_layers)) if layers is None else {int(i) for i in layers if 0 <= int(i) < n_layers}
