"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable keys and values at every layer.

    layer l:   K = [P_K^l ; W_K h]   V = [P_V^l ; W_V h]        P^l (2, n, kv_dim) per layer, trainable
               softmax(Q K^T / sqrt(d)) V                      every token also attends to n prefix slots

    training:  P = P0 + MLP(P') = P0 + W2 tanh(W1 P' + b1) + b2     P' (n, H) and the MLP train: the
                                                                   reparametrisation Li & Liang found
                                                                   stabler than training P directly
    saved:     P (layers, 2, n, kv_dim), the MLP folded away

Initialisation from real words (the paper's advice): P0 is the keys/values the frozen model computes
for n real tokens (init_text, or sampled frequent tokens), fixed; P' starts as those tokens'
embeddings and W2, b2 at zero, so P = P0 at step 0. (projection=False trains P from P0 directly.)
init=random: P0 = 0 and a default-initialised MLP, as peft does. Grouped-query attention: kv_dim is
num_key_value_heads * head_dim (SmolLM2: 3 * 64), the prefix is repeated over query groups like K.

Mechanism: transformers' cache. The prefix becomes a `PrefixCache` (a DynamicCache whose layers
return [prefix; new] without storing new, so a recomputation under gradient checkpointing sees the
same thing) passed as the cache argument (`past_key_values`, `cache` from transformers 5.24): the model extends its masks and shifts position ids by n
itself (BERT: n + T must fit its 512 positions). The attention mask is extended by n. Gradient
checkpointing drops the cache inside layers, so the cache also travels as `prefix_cache` and
a hook on each attention module puts it back. A caller may pass `prefix_kv=(B, layers, 2, n, kv_dim)`
(and `prefix_mask=(B, n)`) to the task model: different rows can carry different prefixes.
`generate` works too: the prefix is written into its cache on the first step.
With `layers` (S4's per-group prefixes), only those layers have a prefix: the others get n zero slots
whose columns their attention mask hides, so every layer's cache has the same length.
Encoder-decoder models (T5): the prefix is in every encoder block's self-attention (`seq2seq.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import layer_selection, train_head
from deltatune.methods.prompt import (
    ADAPTER,
    CACHE_KWARGS,
    cache_in,
    cache_kwarg,
    folded_state,
    install_once,
    load_folded,
    max_positions,
    own_tensors,
    positional_kwargs,
    sampled_vocab_ids,
    set_encoder,
    text_ids,
    word_embeddings,
)

if TYPE_CHECKING:
    from deltatune.methods.seq2seq import EncoderPrefixHooks

NAME = "prefix"
DEFAULT_LR = 5e-3
PEFT_TYPE = "PREFIX_TUNING"
PREFIX_KEY = f"prompt_encoder.{ADAPTER}.prefix"
INITS = ("words", "random")
SEQ2SEQ_PEFT = ("peft's seq2seq prefix tuning puts the prefix into the decoder's self- and cross-attention; "
                "deltatune's is in the encoder's self-attention: the two do not convert")


@dataclass
class Config:
    num_virtual_tokens: int = 10
    """Number n of prefix positions per layer."""
    projection: bool = True
    """Train P = MLP(P') (Li & Liang's reparametrisation, folded away when saving); False: train P."""
    encoder_hidden_size: int = 512
    """Hidden width of the reparametrisation MLP."""
    init: str = "words"
    """words (activations of real tokens: init_text, else sampled frequent tokens) or random."""
    init_text: str | None = None
    """Text whose tokens' activations start the prefix (init=words)."""
    layers: tuple[int, ...] | None = None
    """Prefix only these transformer layers (indices from 0); the others attend to no prefix (their mask
    hides the n slots). None: every layer."""


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def kv_shape(config) -> KVShape:
    """Keys/values per layer: num_key_value_heads (GQA) or num_attention_heads, times head_dim (T5: d_kv)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return KVShape(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


# ---- the prefix as a cache -------------------------------------------------------------------------------

class PrefixLayer(DynamicLayer):
    """One layer's fixed prefix: update() returns [prefix; new] and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (B, kv_heads, n, head_dim)
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states (B, kv_heads, T, head_dim) -> (B, kv_heads, n+T, head_dim)
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=-2))


def per_layer(prefix: torch.Tensor, shape: KVShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, L, 2, n, kv_dim) -> per layer (keys, values), each (B, kv_heads, n, head_dim)."""
    b, layers, _, n, _ = prefix.shape
    split = prefix.reshape(b, layers, 2, n, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 4, 3, 5)
    return [(kv[0], kv[1]) for kv in split]  # split: (L, 2, B, kv_heads, n, head_dim)


class PrefixCache(DynamicCache):
    """A per-call prefix in transformers' cache API (get_seq_length() = n shifts positions and masks)."""

    def __init__(self, prefix: torch.Tensor, shape: KVShape):
        super(DynamicCache, self).__init__(layers=[PrefixLayer(k, v) for k, v in per_layer(prefix, shape)])


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


class PrefixHooks:
    """Installed once per task model: the top forward takes the prefix (own or per-call `prefix_kv`),
    the backbone forward gets it as a cache, each attention module gets it back if checkpointing dropped it.

    With a caller's cache (`generate`), the prefix is written into it on the first step and found
    there on later ones; position ids the caller computes are shifted by n, as in training."""

    def __init__(self, task_model: TaskModel, rows: list[int] | None = None):
        self.module, self.backbone = task_model.module, task_model.backbone
        self.shape = kv_shape(self.backbone.config)
        self.max_positions = max_positions(self.backbone.config)
        self.layers = task_model.layers()
        self.rows = rows
        """The layers with a prefix (`layers` option); the encoder's output has one entry per row."""
        self.causal = task_model.arch.is_decoder
        self.backbone_cache = cache_kwarg(self.backbone)
        self.width = 0
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        attentions = [layer.get_submodule(task_model.arch.attention) for layer in self.layers]
        self.handles = [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, always_call=True),
            self.backbone.register_forward_pre_hook(self.before_backbone, with_kwargs=True),
        ] + [attention.register_forward_pre_hook(self.before_attention, with_kwargs=True) for attention in attentions]
        if rows is not None:
            self.handles += [attention.register_forward_pre_hook(self.hide_prefix, with_kwargs=True)
                             for i, attention in enumerate(attentions) if i not in rows]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def before(self, module, args, kwargs):
        prefix, mask = kwargs.pop("prefix_kv", None), kwargs.pop("prefix_mask", None)
        refuse_reentrant(module, self.layers)
        if prefix is None:
            named = positional_kwargs(args, kwargs)
            first = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs_embeds")
            if first is None:
                return args, kwargs
            prefix = module.prompt_encoder[ADAPTER]().unsqueeze(0).expand(first.shape[0], -1, -1, -1, -1)
        if self.rows is not None and prefix.shape[1] != len(self.layers):  # zeros where no prefix (hidden)
            full = prefix.new_zeros(prefix.shape[0], len(self.layers), *prefix.shape[2:])
            full[:, self.rows] = prefix
            prefix = full
        self.pending = (prefix, mask)  # prefix (B, L, 2, n, kv_dim)
        self.width = prefix.shape[3]
        return args, kwargs

    def before_backbone(self, _backbone, args, kwargs):
        if self.pending is None:  # the backbone called directly, not through the task model
            return None
        (prefix, prefix_mask), self.pending = self.pending, None
        kwargs = positional_kwargs(args, kwargs)
        first = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        b, t, n = first.shape[0], first.shape[1], prefix.shape[3]
        cache = cache_in(kwargs)
        for name in CACHE_KWARGS:
            kwargs.pop(name, None)
        seen = 0 if cache is None else cache.get_seq_length()
        if self.max_positions is not None and (seen or n) + t > self.max_positions:  # seen counts the prefix
            raise UserError(f"{n} prefix positions + {t} input tokens exceed the model's {self.max_positions} "
                            "positions: lower --max-length or num_virtual_tokens")
        if cache is None:  # training / classification: a cache that holds the prefix and nothing else
            cache = kwargs["prefix_cache"] = PrefixCache(prefix, self.shape)
        elif seen == 0:  # the first generation step: the caller's cache starts with the prefix
            for i, (keys, values) in enumerate(per_layer(prefix, self.shape)):
                cache.update(keys, values, i)
        kwargs[self.backbone_cache] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None or prefix_mask is not None:
            mask = torch.ones(b, max(seen - n, 0) + t, dtype=torch.long, device=first.device) if mask is None else mask
            prefix_mask = mask.new_ones(b, n) if prefix_mask is None else prefix_mask.to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([prefix_mask, mask], dim=1)  # (B, n + seen + T)
        if kwargs.get("position_ids") is not None:  # the caller counted from 0: the prefix holds 0..n-1
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return (), kwargs

    def before_attention(self, attention, args, kwargs):
        cache = kwargs.pop("prefix_cache", None)
        if cache is not None and cache_in(kwargs) is None:  # dropped by gradient checkpointing
            kwargs[cache_kwarg(attention)] = cache
        return args, kwargs

    def hide_prefix(self, _attention, args, kwargs):
        """A layer outside `layers`: its attention mask hides the n prefix slots (which hold zeros)."""
        n, positional = self.width, len(args) > 1 and "attention_mask" not in kwargs
        mask = args[1] if positional else kwargs.get("attention_mask")
        if mask is None:  # an encoder without padding: transformers passes no mask at all
            if self.causal:
                raise UserError("prefix tuning with `layers` needs an attention mask in a decoder")
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            mask = torch.ones(hidden.shape[0], 1, hidden.shape[1], n + hidden.shape[1], dtype=torch.bool,
                              device=hidden.device)
        else:  # (B, 1, T, n + seen + T), bool (sdpa) or additive float (eager)
            mask = mask.clone()
        mask[..., :n] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        if positional:
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask}

    def after(self, _module, _args, _output) -> None:
        self.pending = None


# ---- the trainable prefix ------------------------------------------------------------------------------

class Prefix(nn.Module):
    """P itself (layers, 2, n, kv_dim): trained directly (projection=False) or the folded form."""

    def __init__(self, prefix: torch.Tensor):
        super().__init__()
        self.prefix = nn.Parameter(prefix.clone())

    def forward(self) -> torch.Tensor:
        return self.prefix  # (L, 2, n, kv_dim)


class PrefixMLP(nn.Module):
    """P = P0 + MLP(P'): P' (n, H) -> Linear -> tanh -> Linear -> (L, 2, n, kv_dim), plus a fixed start P0."""

    def __init__(self, start: torch.Tensor, shape: KVShape, hidden: int, base: torch.Tensor | None):
        super().__init__()
        n, width = start.shape
        self.shape = shape
        self.embedding = nn.Embedding(n, width, device=start.device)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(),
                                       nn.Linear(hidden, shape.layers * 2 * shape.kv_dim)).to(start.device)
        base = torch.zeros(shape.layers, 2, n, shape.kv_dim, device=start.device) if base is None else base
        self.register_buffer("base", base.clone())  # (L, 2, n, kv_dim): the real words' activations, fixed
        with torch.no_grad():
            self.embedding.weight.copy_(start)
            if base.abs().sum() > 0:  # last layer at zero: P = P0 exactly at step 0
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)

    def forward(self) -> torch.Tensor:
        flat = self.transform(self.embedding.weight)  # (n, L*2*kv_dim)
        n = flat.shape[0]
        return self.base + flat.view(n, self.shape.layers, 2, self.shape.kv_dim).permute(1, 2, 0, 3)


# ---- apply, fold, load ---------------------------------------------------------------------------------

def init_token_ids(task_model: TaskModel, config: Config) -> list[int]:
    n = config.num_virtual_tokens
    if config.init_text:
        return text_ids(task_model.tokenizer, config.init_text, n)
    return sampled_vocab_ids(task_model.tokenizer, n)


@torch.no_grad()
def word_activations(task_model: TaskModel, ids: list[int]) -> torch.Tensor:
    """(L, 2, n, kv_dim): the keys and values each layer of the frozen model computes for `ids`."""
    if task_model.arch.decoder_layers is not None:  # an encoder-decoder: the encoder's layers
        from deltatune.methods.seq2seq import encoder_word_activations

        return encoder_word_activations(task_model, ids)
    backbone = task_model.backbone
    cache = DynamicCache()  # filled by every attention layer (encoders too, when a cache is passed)
    was_training = backbone.training
    backbone.eval()
    backbone(input_ids=torch.tensor([ids], device=task_model.device()), past_key_values=cache, use_cache=True)
    backbone.train(was_training)
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, kv_heads, n, hd)
    return torch.stack(layers).transpose(2, 3).flatten(3).float()  # (L, 2, n, kv_heads * head_dim)


def apply(task_model: TaskModel, config: Config) -> None:
    if config.init not in INITS:
        raise UserError(f"unknown init '{config.init}': choose one of {', '.join(INITS)}")
    if config.num_virtual_tokens < 1 or config.encoder_hidden_size < 1:
        raise UserError("num_virtual_tokens and encoder_hidden_size must be at least 1")
    chosen = layer_selection(task_model, config.layers)
    rows = None if chosen is None else sorted(chosen)
    shape = kv_shape(task_model.backbone.config)
    n, device = config.num_virtual_tokens, task_model.device()
    if rows is not None:  # the encoder makes the chosen layers' prefixes only
        shape = replace(shape, layers=len(rows))
    if config.init == "words":
        ids = init_token_ids(task_model, config)
        base = word_activations(task_model, ids)  # before the hooks are installed
        base = base if rows is None else base[rows]
        start = word_embeddings(task_model).weight[ids].detach().float()  # (n, H)
    else:
        base, start = None, torch.randn(n, task_model.backbone.config.hidden_size, device=device)
    if config.projection:
        encoder: nn.Module = PrefixMLP(start, shape, config.encoder_hidden_size, base)
    else:
        encoder = Prefix(base if base is not None else 0.02 * torch.randn(
            shape.layers, 2, n, shape.kv_dim, device=device))
    set_encoder(task_model, encoder)
    install_hooks(task_model, rows)
    train_head(task_model)


def install_hooks(task_model: TaskModel, rows: list[int] | None = None) -> PrefixHooks | EncoderPrefixHooks:
    """Hook the task model once (an encoder-decoder: its encoder, `seq2seq.py`); a prefix is never skipped
    by the frozen-prefix cache."""
    if task_model.arch.decoder_layers is not None:
        from deltatune.methods.seq2seq import EncoderPrefixHooks

        return install_once(task_model, "prefix_hooks", lambda: EncoderPrefixHooks(task_model, rows))
    return install_once(task_model, "prefix_hooks", lambda: PrefixHooks(task_model, rows))


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """The head and the folded prefix P (layers, 2, n, kv_dim); the MLP is not saved."""
    return folded_state(task_model, PREFIX_KEY)


def load_delta_state(task_model: TaskModel, config: Config, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the MLP by the folded prefix and load it (and the head)."""
    load_folded(task_model, tensors, PREFIX_KEY, NAME, Prefix)


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """peft's `prompt_embeddings` (n, L*2*kv_dim): per token, layer-major, keys before values."""
    if config.layers is not None:
        raise UserError("peft prefix tuning puts a prefix in every layer: a delta with `layers` cannot export")
    prefix = tensors[PREFIX_KEY]  # (L, 2, n, kv_dim)
    layers, _, n, kv_dim = prefix.shape
    flat = prefix.permute(2, 0, 1, 3).reshape(n, layers * 2 * kv_dim)
    fields = {"num_virtual_tokens": n, "token_dim": kv_dim, "num_layers": layers, "num_attention_heads": None,
              "num_transformer_submodules": 1, "prefix_projection": False,
              "encoder_hidden_size": config.encoder_hidden_size}
    return fields, {"prompt_embeddings": flat.contiguous(), **own_tensors(tensors)}


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(prefix options, deltatune tensors) of a peft PREFIX_TUNING adapter (its flattened prefix)."""
    if "prompt_embeddings" not in tensors:
        raise UserError("PREFIX_TUNING adapter has no 'prompt_embeddings' tensor")
    if adapter_config.get("task_type") == "SEQ_2_SEQ_LM":
        raise UserError(SEQ2SEQ_PEFT)
    flat = tensors["prompt_embeddings"]  # (n, L*2*kv_dim)
    layers = adapter_config.get("num_layers")
    if not layers or flat.shape[1] % (2 * layers):
        raise UserError(f"PREFIX_TUNING adapter: prompt_embeddings {tuple(flat.shape)} does not split into "
                        f"num_layers={layers} x 2 keys/values")
    prefix = flat.view(flat.shape[0], layers, 2, -1).permute(1, 2, 0, 3).contiguous()  # (L, 2, n, kv_dim)
    options = {"num_virtual_tokens": flat.shape[0], "init": "random",
               "encoder_hidden_size": adapter_config.get("encoder_hidden_size") or 512}
    return options, {PREFIX_KEY: prefix}
