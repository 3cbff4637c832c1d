"""Soft prompts and prefixes on encoder-decoder models (T5): they go into the encoder only.

    prompt, P-tuning:  encoder input   [P ; E(x)] (B, n+T, H), attention mask [1…1 ; m] (B, n+T)
                       decoder         its cross-attention mask gets the same n columns: [1…1 ; m]
    prefix:            every encoder block's self-attention  K = [P_K ; W_K h], V = [P_V ; W_V h],
                       attention mask [1…1 ; m]; the decoder reads the encoder's T outputs as before

This is what peft (prompt tuning on seq2seq models) and Li & Liang (the encoder's prefix) do. The
decoder's own inputs (the labels shifted right; T5ForSequenceClassification shifts input_ids) never
see a soft slot, so the top-level hook leaves input_ids and labels alone: it only takes a per-call
`soft_prompt` / `soft_prompt_mask` (`prefix_kv` / `prefix_mask`) for the next encoder call. The
hooks sit on the encoder stack, so `generate` (which runs the encoder itself, not the top module)
gets the model's own prompt too.

T5's prefix takes the same road as the decoders' (prefix.py): the encoder runs deltatune's attention
function (transformers 5 routes T5's attention through its attention interface, the relative
position bias as an argument), and its forward gets a `PrefixContext` under fast/attention's KV_KWARG,
never transformers' cache argument. Each encoder self-attention reads [P_K ; K], [P_V ; V] (T5 has no
rotary embedding: the projections' outputs are the keys and values), its mask gets n columns, and
the prefix columns get the relative position bias of keys 0..n-1 for queries at n..n+T-1
(`compute_bias(n + T, n + T)[:, :, n:, :n]`): the real tokens keep their relative distances and the
prefix sits before them, where soft tokens at the start would be.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.decoding.cache import PrefixContext
from deltatune.errors import UserError
from deltatune.fast.attention import KV_KWARG, ensure_kv_attention
from deltatune.methods.inputs import (
    ADAPTER,
    PLACEMENTS,
    positional_kwargs,
    prefix_layers,
    refuse_reentrant,
    splice,
)


def stack(task_model: TaskModel, layers: str | None) -> nn.Module | None:
    """The stack (T5Stack) that holds the ModuleList at dotted path `layers`, or None when absent."""
    if layers is None:
        return None
    try:
        return task_model.backbone.get_submodule(layers.rpartition(".")[0])
    except AttributeError:  # T5EncoderModel (pooled classification) has no decoder
        return None


def encoder_stack(task_model: TaskModel) -> nn.Module:
    return stack(task_model, task_model.arch.layers)


def first_input(kwargs: dict) -> torch.Tensor | None:
    return kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")


def rows_of(mask: torch.Tensor, b: int) -> torch.Tensor:
    """A per-call (B, n) mask for b rows: generate's beams repeat each row (repeat_interleave)."""
    return mask if mask.shape[0] == b else mask.repeat_interleave(b // mask.shape[0], dim=0)


class EncoderPromptHooks:
    """Soft tokens in front of (or after the first token of) the encoder's input embeddings."""

    def __init__(self, task_model: TaskModel, insert_at: str):
        if insert_at not in PLACEMENTS:
            raise UserError(f"unknown insert_at '{insert_at}': choose one of {', '.join(PLACEMENTS)}")
        self.module = task_model.module
        self.at = PLACEMENTS.index(insert_at)
        self.embed = task_model.backbone.get_submodule(task_model.arch.embeddings)  # the encoder's table
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a per-call prompt and its mask
        self.added: tuple[int, int, torch.Tensor | None] | None = None
        """(n, at, per-call mask) of the last encoder call: what the decoder's cross-attention mask lacks."""
        encoder, decoder = encoder_stack(task_model), stack(task_model, task_model.arch.decoder_layers)
        self.handles = [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, always_call=True),
            encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True),
        ]
        if decoder is not None:
            self.handles.append(decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def before(self, _module, args, kwargs):
        prompts, mask = kwargs.pop("soft_prompt", None), kwargs.pop("soft_prompt_mask", None)
        if prompts is not None or mask is not None:
            self.pending = (prompts, mask)
        return args, kwargs

    def after(self, _module, _args, _output) -> None:
        self.pending = None

    def before_encoder(self, _encoder, args, kwargs):
        kwargs = positional_kwargs(args, kwargs)
        first = first_input(kwargs)
        if first is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        embeds = self.embed(kwargs["input_ids"]) if embeds is None else embeds  # (B, T, H)
        b, t = first.shape[:2]
        (prompts, prompt_mask), self.pending = self.pending or (None, None), None
        if prompts is None:
            prompts = self.module.prompt_encoder[ADAPTER]().unsqueeze(0).expand(b, -1, -1)  # (B, n, H)
        n, at = prompts.shape[1], min(self.at, t)
        mask = kwargs.get("attention_mask")
        if mask is not None or prompt_mask is not None:
            mask = torch.ones(b, t, dtype=torch.long, device=first.device) if mask is None else mask
            slots = mask.new_ones(b, n) if prompt_mask is None else prompt_mask.to(mask.dtype)
            kwargs["attention_mask"] = splice(mask, slots, at)  # (B, n+T)
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, splice(embeds, prompts.to(embeds.dtype), at)
        self.added = (n, at, prompt_mask)
        return (), kwargs

    def before_decoder(self, _decoder, args, kwargs):
        kwargs = positional_kwargs(args, kwargs)
        states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if self.added is None or states is None:
            return None
        n, at, prompt_mask = self.added
        t = states.shape[1] - n  # the real tokens among the encoder's outputs
        if mask is None:
            if prompt_mask is None:  # every encoder position is attended anyway
                return None
            mask = torch.ones(states.shape[0], t, dtype=torch.long, device=states.device)
        if mask.dim() != 2 or mask.shape[1] != t:  # not outputs of a prompted encoder call
            return None
        slots = mask.new_ones(mask.shape[0], n) if prompt_mask is None else rows_of(prompt_mask, mask.shape[0])
        kwargs["encoder_attention_mask"] = splice(mask, slots.to(mask.dtype), min(at, t))  # (B, n+T)
        return (), kwargs


class EncoderPrefixHooks:
    """Prefix keys/values in the self-attention of every encoder block (or of the `rows` blocks)."""

    def __init__(self, task_model: TaskModel, rows: list[int] | None = None):
        self.module = task_model.module
        self.layers = task_model.layers()
        self.rows = rows
        self.encoder = encoder_stack(task_model)
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.module.needs_kv_attention = True
        ensure_kv_attention(self.module)
        self.handles = [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, always_call=True),
            self.encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.module.needs_kv_attention = False

    def before(self, _module, args, kwargs):
        prefix, mask = kwargs.pop("prefix_kv", None), kwargs.pop("prefix_mask", None)
        if prefix is not None or mask is not None:
            self.pending = (prefix, mask)
        return args, kwargs

    def after(self, _module, _args, _output) -> None:
        self.pending = None

    def before_encoder(self, encoder, args, kwargs):
        kwargs = positional_kwargs(args, kwargs)
        first = first_input(kwargs)
        if first is None:
            return None
        refuse_reentrant(self.module, self.layers)
        ensure_kv_attention(self.module)
        (prefix, mask), self.pending = self.pending or (None, None), None
        if prefix is None:
            prefix = self.module.prompt_encoder[ADAPTER]().unsqueeze(0)  # (1, L, 2, n, kv_dim)
        if mask is not None:
            mask = rows_of(mask, first.shape[0])
        n, bias_source = prefix.shape[3], self.layers[0].get_submodule("layer.0.SelfAttention")

        def prefix_bias(t: int) -> torch.Tensor:  # keys 0..n-1, queries at n..n+t-1: (1, h, t, n)
            return bias_source.compute_bias(n + t, n + t, device=first.device)[:, :, n:, :n]

        layer_of = prefix_layers(encoder, self.rows, prefix.shape[1])
        kwargs[KV_KWARG] = PrefixContext(prefix, layer_of, mask, prefix_bias)
        return (), kwargs


@torch.no_grad()
def encoder_word_activations(task_model: TaskModel, ids: list[int]) -> torch.Tensor:
    """(L, 2, n, kv_dim): the keys and values each encoder self-attention computes for `ids` (T5 has no
    rotary embedding: its k / v projections' outputs are what the attention reads)."""
    arch, layers, seen = task_model.arch, task_model.layers(), []
    hooks = [layer.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
             for layer in layers for name in (arch.key, arch.value)]  # called k then v, block by block
    encoder = encoder_stack(task_model)
    was_training = encoder.training
    encoder.eval()
    try:
        encoder(input_ids=torch.tensor([ids], device=task_model.device()))
    finally:
        encoder.train(was_training)
        for hook in hooks:
            hook.remove()
    return torch.stack(seen).view(len(layers), 2, len(ids), -1).float()  # (L, 2, n, heads * d_kv)
