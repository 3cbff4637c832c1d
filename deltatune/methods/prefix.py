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

Mechanism: deltatune's attention functions (fast/attention.py). The backbone's forward gets a
`PrefixContext` under the KV_KWARG keyword, which transformers hands down to every attention function
(gradient checkpointing replays it): at each prefixed layer the function attends over [P_K ; K] and
[P_V ; V] with n mask columns in front (per-row `prefix_mask`), and position ids start at n, as if the
prefix were the first n tokens (BERT: n + T must fit its 512 positions). The model runs deltatune's
attention while a prefix is installed (`needs_kv_attention`); transformers' cache argument is never
used, so `generate` with its cache works too (the cache holds the real tokens, the prefix is added
at every step). A caller may pass `prefix_kv=(B, layers, 2, n, kv_dim)` (and `prefix_mask=(B, n)`) to
the task model: different rows can carry different prefixes. The decode loop (`deltatune.decoding`)
instead writes a row's prefix into the first n slots of its KV cache (`prefix_of`).
With `layers` (S4's per-group prefixes), only those layers have a prefix: the others attend as usual.
Encoder-decoder models (T5): the prefix is in every encoder block's self-attention (`seq2seq.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.decoding.cache import CacheContext, KVCache, PrefixContext, attention_layers, kv_layout
from deltatune.errors import UserError
from deltatune.fast.attention import KV_KWARG, ensure_kv_attention, kv_attention
from deltatune.methods.base import layer_selection, train_head
from deltatune.methods.inputs import (
    ADAPTER,
    earlier_tokens,
    install_once,
    max_positions,
    positional_kwargs,
    prefix_layers,
    refuse_reentrant,
)
from deltatune.methods.prompt import (
    folded_state,
    load_folded,
    own_tensors,
    sampled_vocab_ids,
    set_encoder,
    text_ids,
    word_embeddings,
)
from deltatune.options import option

if TYPE_CHECKING:
    from deltatune.methods.seq2seq import EncoderPrefixHooks

NAME = "prefix"
DEFAULT_LR = 5e-3
ROW_INPUT = "prefix"
"""Served per row: the engine puts each row's prefix in one cache (what `prefix_hooks` do alone)."""
ROW_HOOKS = ("prefix_hooks",)
ROW_TOP_MODULES = ("prompt_encoder",)
PEFT_TYPE = "PREFIX_TUNING"
PREFIX_KEY = f"prompt_encoder.{ADAPTER}.prefix"
INITS = ("words", "random")
SEQ2SEQ_PEFT = ("peft's seq2seq prefix tuning puts the prefix into the decoder's self- and cross-attention; "
                "deltatune's is in the encoder's self-attention: the two do not convert")


@dataclass
class Config:
    num_virtual_tokens: int = option(10, ge=1)
    """Number n of prefix positions per layer."""
    projection: bool = True
    """Train P = MLP(P') (Li & Liang's reparametrisation, folded away when saving); False: train P."""
    encoder_hidden_size: int = option(512, ge=1)
    """Hidden width of the reparametrisation MLP."""
    init: str = option("words", choices=INITS)
    """words (activations of real tokens: init_text, else sampled frequent tokens) or random."""
    init_text: str | None = None
    """Text whose tokens' activations start the prefix (init=words)."""
    layers: tuple[int, ...] | None = option(None, ge=0)
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
    return KVShape(*kv_layout(config))


# ---- the prefix in the attention functions ------------------------------------------------------------

class PrefixHooks:
    """Installed once per task model: the top forward takes the prefix (own or per-call `prefix_kv`),
    the backbone forward gets it as a `PrefixContext` for its attention functions and position ids
    shifted by n. Under `generate` (its cache holds the earlier real tokens: the attention mask or the
    position ids reach past the new tokens) the positions continue from there, and the prefix is added
    at every step."""

    def __init__(self, task_model: TaskModel, rows: list[int] | None = None):
        self.module, self.backbone = task_model.module, task_model.backbone
        self.max_positions = max_positions(self.backbone.config)
        self.layers = task_model.layers()
        self.rows = rows
        """The layers with a prefix (`layers` option); the encoder's output has one entry per row."""
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.module.needs_kv_attention = True  # the fast path keeps deltatune's attention (fast/attention.py)
        ensure_kv_attention(self.module)
        self.handles = [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, always_call=True),
            self.backbone.register_forward_pre_hook(self.before_backbone, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.module.needs_kv_attention = False

    def before(self, module, args, kwargs):
        prefix, mask = kwargs.pop("prefix_kv", None), kwargs.pop("prefix_mask", None)
        refuse_reentrant(module, self.layers)
        if prefix is None:
            named = positional_kwargs(args, kwargs)
            first = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs_embeds")
            if first is None:
                return args, kwargs
            prefix = module.prompt_encoder[ADAPTER]().unsqueeze(0)  # (1, L, 2, n, kv_dim)
        self.pending = (prefix, mask)  # prefix (B|1, L, 2, n, kv_dim)
        return args, kwargs

    def before_backbone(self, _backbone, args, kwargs):
        if self.pending is None:  # the backbone called directly, not through the task model
            return None
        (prefix, prefix_mask), self.pending = self.pending, None
        ensure_kv_attention(self.backbone)  # in case something switched it since
        kwargs = positional_kwargs(args, kwargs)
        first = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        b, t, n = first.shape[0], first.shape[1], prefix.shape[3]
        seen = earlier_tokens(kwargs, t)  # generate: the real tokens already in its cache
        if self.max_positions is not None and n + seen + t > self.max_positions:
            raise UserError(f"{n} prefix positions + {seen + t} input tokens exceed the model's {self.max_positions} "
                            "positions: lower --max-length or num_virtual_tokens")
        positions = kwargs.get("position_ids")
        if positions is None:  # the caller counted from 0: the prefix holds 0..n-1
            positions = torch.arange(seen, seen + t, device=first.device).unsqueeze(0).expand(b, -1)
        kwargs["position_ids"] = positions + n
        layer_of = prefix_layers(self.backbone, self.rows, prefix.shape[1])
        kwargs[KV_KWARG] = PrefixContext(prefix, layer_of, prefix_mask)
        return (), kwargs

    def after(self, _module, _args, _output) -> None:
        self.pending = None


def prefix_of(module: nn.Module) -> torch.Tensor | None:
    """A prefix model's prefix as served and decoded: P (L, 2, n, kv_dim) detached, or None (no prefix, or
    one on some layers only, which a KV cache row cannot hold)."""
    hooks = getattr(module, "prefix_hooks", None)
    if hooks is None or getattr(hooks, "rows", None) is not None:
        return None
    with torch.no_grad():
        return module.prompt_encoder[ADAPTER]().detach()


def prefix_inputs(model: nn.Module, prefixes: list[torch.Tensor | None], mask: torch.Tensor) -> dict:
    """The forward arguments that give a batch's rows their own prefixes: row b's (L, 2, n_b, kv_dim) in
    the last n_b of n_max slots (the others masked), position ids n_b + t as alone. mask: (B, W)."""
    ensure_kv_attention(model)
    shape = kv_shape(model.config)
    sizes = [p.shape[2] if p is not None else 0 for p in prefixes]
    n_max, (batch, width) = max(sizes), mask.shape
    first = next(p for p in prefixes if p is not None)
    kv = first.new_zeros(batch, shape.layers, 2, n_max, shape.kv_dim)  # (B, L, 2, n_max, kv_dim)
    keep = torch.zeros(batch, n_max, dtype=torch.bool, device=mask.device)
    for b, (n, p) in enumerate(zip(sizes, prefixes)):
        if p is not None:
            kv[b, :, :, n_max - n:] = p
            keep[b, n_max - n:] = True
    positions = torch.tensor(sizes, device=mask.device)[:, None] + torch.arange(width, device=mask.device)
    return {KV_KWARG: PrefixContext(kv, attention_layers(model), keep), "position_ids": positions}


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
    cache = KVCache.for_model(backbone, capacity=len(ids))  # one row, filled by every attention layer
    n = len(ids)
    context = CacheContext(cache, attention_layers(backbone), cache.add_rows(1),
                           torch.tensor([n], device=cache.device), n, causal=task_model.arch.is_decoder)
    was_training = backbone.training
    backbone.eval()
    with kv_attention(backbone):
        backbone(input_ids=torch.tensor([ids], device=task_model.device()), position_ids=context.positions(),
                 use_cache=False, **{KV_KWARG: context})
    context.finish()
    backbone.train(was_training)
    layers = [torch.stack(cache.row_keys(layer, 0)) for layer in range(cache.layers)]  # (2, kv_heads, n, hd)
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
