"""deltatune's key/value cache: one padded tensor per layer, one row per live sequence.

    layer l   keys   K_l (B, hk, S_cap, d)     row b holds its first len_b slots:
              values V_l (B, hk, S_cap, d)     [prefix P_b (n_b) ; prompt ; generated tokens ; free …]
    lengths   (B,)                             len_b; position of the next token = len_b

A forward through `CacheContext` (the `KV_KWARG` of fast/attention.py) gives every attention module its
layer's cache: the new keys/values of row b (T_b of them, right-padded to T) go to slots
len_b .. len_b + T − 1, and the queries attend over the slots

    allowed[b, i, j] = j ≤ len_b + i                     (B, 1, T, S): cached, then causal in the new

so a row never sees another row's slots, and a prefix is simply a row's first n_b slots. The keys
stored are the ones the attention function receives (rotary embeddings already applied), so nothing
here depends on the model family. S_cap grows geometrically; rows leave by compaction (`keep`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deltatune.fast.attention import Kernel


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model's self-attention: num_key_value_heads (GQA) or
    num_attention_heads, times head_dim (T5: d_kv)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class KVCache:
    """Per-layer padded keys/values with a length per row (see the module docstring)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 64):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys = [self._empty(0, capacity) for _ in range(layers)]  # (B, hk, S_cap, d) per layer
        self.values = [self._empty(0, capacity) for _ in range(layers)]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (B,)

    @classmethod
    def for_model(cls, model: nn.Module, capacity: int = 64) -> KVCache:
        param = next(model.parameters())
        return cls(*kv_layout(model.config), dtype=param.dtype, device=param.device, capacity=capacity)

    def _empty(self, rows: int, capacity: int) -> torch.Tensor:
        return torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, slots: int) -> None:
        """Room for `slots` positions per row: the capacity at least doubles when it grows."""
        if slots <= self.capacity:
            return
        capacity = max(slots, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = self._empty(old.shape[0], capacity)
                grown[:, :, :old.shape[2]] = old
                store[i] = grown

    def add_rows(self, count: int, prefixes: list[torch.Tensor | None] | None = None) -> slice:
        """Append `count` empty rows (row k starting with prefixes[k] (L, 2, n, kv_dim) when given);
        returns their slice."""
        prefixes = prefixes or [None] * count
        n_max = max((p.shape[2] for p in prefixes if p is not None), default=0)
        self.reserve(n_max + 1)
        start = self.rows
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = torch.cat([old, self._empty(count, old.shape[2])])
        lengths = []
        for k, prefix in enumerate(prefixes):
            lengths.append(0 if prefix is None else prefix.shape[2])
            if prefix is None:
                continue
            n = prefix.shape[2]
            kv = prefix.to(self.device, self.dtype).view(self.layers, 2, n, self.kv_heads, self.head_dim)
            for layer in range(self.layers):  # kv[layer, 0]: (n, hk, d) -> (hk, n, d)
                self.keys[layer][start + k, :, :n] = kv[layer, 0].transpose(0, 1)
                self.values[layer][start + k, :, :n] = kv[layer, 1].transpose(0, 1)
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, device=self.device)])
        return slice(start, start + count)

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay (in this order): finished sequences leave the batch."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = old.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def row_keys(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one row at one layer, each (hk, len, d)."""
        n = int(self.lengths[row])
        return self.keys[layer][row, :, :n], self.values[layer][row, :, :n]

    def as_prefix(self, row: int) -> torch.Tensor:
        """One row's slots as a prefix for `PrefixContext`: (1, L, 2, len, kv_dim)."""
        kv = torch.stack([torch.stack(self.row_keys(layer, row)) for layer in range(self.layers)])  # (L, 2, hk, n, d)
        return kv.transpose(2, 3).flatten(3).unsqueeze(0)


class CacheContext:
    """One forward over cache rows `rows`, row b bringing `new[b]` tokens (right-padded to T): every
    attention module writes its new keys/values into its layer's cache and attends over the row's slots."""

    def __init__(self, cache: KVCache, layer_of: dict[int, int], rows: slice, new: torch.Tensor, width: int,
                 causal: bool = True):
        self.cache, self.layer_of, self.rows = cache, layer_of, rows
        self.new = new  # (B,) tokens per row this forward
        self.width = width  # T
        lengths = cache.lengths[rows]  # (B,)
        self.span = int(lengths.max()) + width  # S: slots any query may read
        cache.reserve(self.span)
        steps = torch.arange(width, device=cache.device)  # (T,)
        self.slots = lengths[:, None] + steps  # (B, T): where each new key goes (= its position)
        self.batch = torch.arange(lengths.shape[0], device=cache.device)[:, None].expand(-1, width)  # (B, T)
        columns = torch.arange(self.span, device=cache.device)  # (S,)
        if causal:  # allowed[b, i, j] = j <= len_b + i
            self.mask = (columns[None, None, :] <= self.slots[:, :, None])[:, None]  # (B, 1, T, S) bool
        else:  # an encoder (prefix initialisation on BERT): every real new token is visible
            self.mask = (columns[None, :] < (lengths + new)[:, None])[:, None, None].expand(-1, 1, width, -1)

    def positions(self) -> torch.Tensor:
        """(B, T) position ids of the new tokens: each row continues from its own length."""
        return self.slots

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, kernel: Kernel, scaling: float, dropout: float) -> torch.Tensor:
        # query (B, h, T, d), key/value (B, hk, T, d): the model's mask is replaced by the cache's own
        layer = self.layer_of[id(module)]
        keys = self.cache.keys[layer][self.rows]  # (B, hk, S_cap, d), a view
        values = self.cache.values[layer][self.rows]
        keys[self.batch, :, self.slots] = key.transpose(1, 2).to(keys.dtype)  # (B, T, hk, d) into the slots
        values[self.batch, :, self.slots] = value.transpose(1, 2).to(values.dtype)
        keys, values = keys[:, :, :self.span], values[:, :, :self.span]  # (B, hk, S, d)
        return kernel(query, keys.to(query.dtype), values.to(query.dtype), self.mask, scaling, dropout)

    def finish(self) -> None:
        """After the forward: every row's length grows by its real new tokens."""
        self.cache.lengths[self.rows] += self.new


class PrefixContext:
    """Fixed keys/values before every row's new ones: at each layer in `layer_of`, row b attends over
    [P_b ; new] (a prefix-tuning prefix, methods/prefix.py; the ICL scorer's shared prompt, which every
    row continues). Nothing is stored: a recomputation (gradient checkpointing) sees the same thing.

    prefix (B|1, L', 2, n, kv_dim); `layer_of` maps an attention module to its index in L'; keep (B, n)
    bool says which prefix slots a row attends (None: all)."""

    def __init__(self, prefix: torch.Tensor, layer_of: dict[int, int], keep: torch.Tensor | None = None,
                 prefix_bias: Callable[[int], torch.Tensor] | None = None):
        self.prefix, self.layer_of, self.keep = prefix, layer_of, keep
        self.prefix_bias = prefix_bias
        """T5: t -> (1, h, t, n), the relative position bias of the prefix columns (seq2seq.py)."""
        self._bias: torch.Tensor | None = None  # computed by the first layer, reused by the others

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, kernel: Kernel, scaling: float, dropout: float) -> torch.Tensor:
        layer = self.layer_of.get(id(module))
        if layer is None:  # a layer without a prefix (`layers`)
            return kernel(query, key, value, mask, scaling, dropout)
        b, kv_heads, tk, d = key.shape  # (B, hk, Tk, d): Tk > T when generate's cache holds earlier tokens
        n = self.prefix.shape[3]
        kv = self.prefix[:, layer].reshape(-1, 2, n, kv_heads, d).transpose(2, 3)  # (B|1, 2, hk, n, d)
        kv = kv.expand(b, -1, -1, -1, -1).to(key.dtype)
        key, value = torch.cat([kv[:, 0], key], dim=2), torch.cat([kv[:, 1], value], dim=2)  # (B, hk, n+Tk, d)
        return kernel(query, key, value, self.columns(module, mask, query, tk), scaling, dropout)

    def columns(self, module: nn.Module, mask: torch.Tensor | None, query: torch.Tensor, tk: int) -> torch.Tensor:
        """The model's mask (B|1, 1|h, T, Tk) with n prefix columns in front: (B, 1|h, T, n + Tk)."""
        b, t, n = query.shape[0], query.shape[2], self.prefix.shape[3]
        if mask is None:  # no padding: bidirectional (all zeros) or causal over the new keys
            allowed = torch.ones(t, tk, dtype=torch.bool, device=query.device)
            mask = allowed.tril(tk - t) if getattr(module, "is_causal", False) else allowed
            mask = mask[None, None]
        heads = mask.shape[1]
        mask = mask[..., :tk].expand(b, heads, t, tk)
        keep = torch.ones(b, n, dtype=torch.bool, device=query.device) if self.keep is None else self.keep.bool()
        keep = keep[:, None, None, :].expand(b, heads, t, n)
        if mask.dtype != torch.bool:  # additive
            keep = torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~keep, torch.finfo(mask.dtype).min)
            if self.prefix_bias is not None:
                if self._bias is None:
                    self._bias = self.prefix_bias(t)
                keep = keep + self._bias.to(mask.dtype)
        return torch.cat([keep, mask], dim=-1)


def attention_layers(model: nn.Module) -> dict[int, int]:
    """id(self-attention module) -> its layer index (`layer_idx`, which every model on transformers'
    attention interface gives the module that calls it); cross-attention is left out."""
    return {id(m): m.layer_idx for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
            and "Cross" not in type(m).__name__ and not getattr(m, "is_cross_attention", False)}
