"""Model shapes for the memory estimator: from a known name, a Hugging Face folder or a config.json.

Only the numbers that decide memory are kept (hidden size h, layers L, heads, key/value heads,
intermediate size i, vocabulary V, ...); nothing is downloaded and no weights are read.

The parameter count is computed exactly from the shapes, per family:

    BERT   n = V·h + P·h + T·h + 2h                    (word, position, token-type embeddings, LayerNorm)
             + L·(4(h² + h) + 2h·i + i + h + 4h)       (q, k, v, o with biases; FFN up/down; 2 LayerNorms)
             + h² + h                                   (pooler)
    Llama  n = V·h                                      (embeddings)
             + L·(h·q + 2h·kv + q·h + 3h·i + 2h)        (q, k, v, o without biases; SwiGLU gate/up/down; 2 RMSNorms)
             + h + [V·h if the LM head is not tied]     (final RMSNorm, LM head)
    GPT-2  n = V·h + P·h + L·(h·3h + 3h + h² + h + 2h·i + i + h + 4h) + 2h   (LM head tied to the embeddings)

with q = heads·head_dim, kv = kv_heads·head_dim, P = max positions, T = token types.
For example Llama-2-7B: 32000·4096·2 + 32·202,383,360 + 4096 = 6,738,415,616.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import UserError

FAMILY_OF_MODEL_TYPE = {"bert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}


@dataclass(frozen=True)
class Linear:
    """One weight matrix of a layer: y = x·Wᵀ (+ b), W of shape (out_features, in_features)."""

    in_features: int
    out_features: int
    has_bias: bool


@dataclass(frozen=True)
class ModelShapes:
    """The shape of a transformer backbone, as far as memory is concerned."""

    name: str
    """Known name, or the path it was read from."""
    family: str
    """"bert" (post-LayerNorm encoder), "llama" (pre-RMSNorm, SwiGLU, RoPE, GQA) or "gpt2" (pre-LayerNorm)."""
    hidden: int
    """h: the width of the residual stream."""
    layers: int
    """L: number of transformer blocks."""
    heads: int
    """Attention (query) heads."""
    kv_heads: int
    """Key/value heads (fewer than heads with grouped-query attention)."""
    head_dim: int
    """Width of one head (hidden // heads unless the config says otherwise)."""
    intermediate: int
    """i: FFN inner width."""
    vocab: int
    """V: vocabulary size."""
    max_positions: int = 0
    """Learned position embeddings (BERT, GPT-2); 0 for rotary (Llama)."""
    token_types: int = 0
    """BERT token-type (segment) embeddings."""
    tied_embeddings: bool = False
    """The LM head reuses the input embedding matrix (GPT-2, SmolLM2)."""
    qkv_bias: bool = False
    """Llama-family models with biases on q, k, v (Qwen2)."""
    hidden_act: str = "gelu"
    """FFN activation: "gelu" (one saved tensor), "gelu_new" (GPT-2's tanh formula in Python) or "silu" (SwiGLU)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches (BERT and GPT-2 use 0.1)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    headline_params: float | None = None
    """The size in the model's name (7e9 for "7B"): the N_parameter of the seed slides; None = exact count."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_decoder(self) -> bool:
        """Decoder-only language models are trained for generation by default."""
        return self.family in ("llama", "gpt2")

    def layer_linears(self) -> dict[str, Linear]:
        """The weight matrices of one layer, by role: q, k, v, o (or fused qkv), gate, up, down."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return {"q": Linear(h, h, True), "k": Linear(h, h, True), "v": Linear(h, h, True),
                    "o": Linear(h, h, True), "up": Linear(h, i, True), "down": Linear(i, h, True)}
        if self.family == "llama":
            bias = self.qkv_bias
            return {"q": Linear(h, self.q_dim, bias), "k": Linear(h, self.kv_dim, bias),
                    "v": Linear(h, self.kv_dim, bias), "o": Linear(self.q_dim, h, False),
                    "gate": Linear(h, i, False), "up": Linear(h, i, False), "down": Linear(i, h, False)}
        return {"qkv": Linear(h, 3 * h, True), "o": Linear(h, h, True),
                "up": Linear(h, i, True), "down": Linear(i, h, True)}

    def norm_params(self) -> int:
        """Parameters of one norm: LayerNorm has a weight and a bias (2h), RMSNorm only a weight (h)."""
        return self.hidden if self.family == "llama" else 2 * self.hidden

    def layer_matrix_params(self) -> int:
        """Σ in·out over the layer's weight matrices (what k-bit quantization stores in bits/8 bytes)."""
        return sum(lin.in_features * lin.out_features for lin in self.layer_linears().values())

    def layer_bias_params(self) -> int:
        """Biases of one layer: linear biases + the LayerNorm biases (BitFit trains exactly these)."""
        linear_biases = sum(lin.out_features for lin in self.layer_linears().values() if lin.has_bias)
        norm_biases = 0 if self.family == "llama" else 2 * self.hidden
        return linear_biases + norm_biases

    def layer_params(self) -> int:
        """All parameters of one transformer block."""
        norms = 2 * self.norm_params()
        return self.layer_matrix_params() + sum(
            lin.out_features for lin in self.layer_linears().values() if lin.has_bias) + norms

    def embedding_params(self) -> int:
        """Token embeddings (+ learned positions, token types and the embedding LayerNorm of BERT)."""
        h = self.hidden
        n = self.vocab * h + self.max_positions * h + self.token_types * h
        return n + (2 * h if self.family == "bert" else 0)

    def top_params(self) -> int:
        """What sits between the last layer and the task head: BERT pooler, final RMSNorm/LayerNorm."""
        h = self.hidden
        return {"bert": h * h + h, "llama": h, "gpt2": 2 * h}[self.family]

    def lm_head_params(self) -> int:
        """A separate LM head matrix V·h; 0 when tied to the embeddings, and for encoders."""
        return self.vocab * self.hidden if self.is_decoder and not self.tied_embeddings else 0

    def outside_layer_bias_params(self) -> int:
        """Biases outside the blocks: BERT embedding-LayerNorm and pooler biases, GPT-2 final LayerNorm bias."""
        return {"bert": 2 * self.hidden, "llama": 0, "gpt2": self.hidden}[self.family]

    @property
    def n_params(self) -> int:
        """Exact parameter count of the backbone (with its LM head for decoders; no classifier)."""
        return (self.embedding_params() + self.layers * self.layer_params() + self.top_params()
                + self.lm_head_params())


def _bert(name: str, h: int, layers: int, heads: int, i: int, headline: float | None) -> ModelShapes:
    return ModelShapes(name, "bert", h, layers, heads, heads, h // heads, i, 30522, max_positions=512,
                       token_types=2, hidden_act="gelu", hidden_dropout=0.1, attention_dropout=0.1,
                       headline_params=headline)


def _llama(name: str, h: int, layers: int, heads: int, kv: int, i: int, vocab: int, headline: float,
           tied: bool = False) -> ModelShapes:
    return ModelShapes(name, "llama", h, layers, heads, kv, h // heads, i, vocab, tied_embeddings=tied,
                       hidden_act="silu", headline_params=headline)


KNOWN_MODELS: dict[str, ModelShapes] = {
    shapes.name: shapes
    for shapes in [
        _llama("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, 7e9),          # 6,738,415,616
        _llama("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, 13e9),        # 13,015,864,320
        _llama("llama-30b", 6656, 60, 52, 52, 17920, 32000, 30e9),          # 32,528,943,616 (LLaMA-1 "30B")
        _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, 70e9),         # 68,976,648,192
        _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, 8e9),          # 8,030,261,248
        _llama("mistral-7b", 4096, 32, 32, 8, 14336, 32000, 7e9),           # 7,241,732,096
        _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, 135e6, tied=True),  # 134,515,008
        _bert("bert-base-uncased", 768, 12, 12, 3072, 110e6),               # 109,482,240
        _bert("all-minilm-l6-v2", 384, 6, 12, 1536, None),                  # 22,713,216
        ModelShapes("gpt2", "gpt2", 768, 12, 12, 12, 64, 3072, 50257, max_positions=1024,
                    tied_embeddings=True, hidden_act="gelu_new", hidden_dropout=0.1, attention_dropout=0.1,
                    headline_params=124e6),                                 # 124,439,808
    ]
}


KNOWN_ALIASES = {"minilm": "all-minilm-l6-v2", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}
"""The backbone loader's short names (deltatune.backbone.MODEL_ALIASES) and the instruct variant."""


def shapes_from_config(config: dict, name: str) -> ModelShapes:
    """Read a Hugging Face config.json dict (BERT, Llama/Mistral/Qwen2 or GPT-2 style)."""
    model_type = str(config.get("model_type", ""))
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILY_OF_MODEL_TYPE))
        raise UserError(f"{name}: unsupported model_type {model_type!r} (supported: {supported})")
    try:
        if family == "gpt2":
            hidden, layers, heads = int(config["n_embd"]), int(config["n_layer"]), int(config["n_head"])
            intermediate = int(config.get("n_inner") or 4 * hidden)
            return ModelShapes(name, family, hidden, layers, heads, heads, hidden // heads, intermediate,
                               int(config["vocab_size"]), max_positions=int(config.get("n_positions", 1024)),
                               tied_embeddings=True, hidden_act=str(config.get("activation_function", "gelu_new")),
                               hidden_dropout=float(config.get("resid_pdrop", 0.1)),
                               attention_dropout=float(config.get("attn_pdrop", 0.1)))
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        common = dict(name=name, family=family, hidden=hidden, layers=layers, heads=heads, head_dim=head_dim,
                      intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]))
        if family == "bert":
            return ModelShapes(**common, kv_heads=heads, max_positions=int(config["max_position_embeddings"]),
                               token_types=int(config.get("type_vocab_size", 2)),
                               hidden_act=str(config.get("hidden_act", "gelu")),
                               hidden_dropout=float(config.get("hidden_dropout_prob", 0.1)),
                               attention_dropout=float(config.get("attention_probs_dropout_prob", 0.1)))
        return ModelShapes(**common, kv_heads=int(config.get("num_key_value_heads") or heads),
                           tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                           qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                           hidden_act="silu", attention_dropout=float(config.get("attention_dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{name}: config.json lacks or garbles the shape field {error}") from error


def load_shapes(model: str) -> ModelShapes:
    """A known name (case-insensitive, "org/" prefix and "-hf" suffix ignored), a folder with config.json,
    or a config.json path."""
    path = Path(model).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        key = model.strip().lower().rsplit("/", 1)[-1].removesuffix("-hf")
        key = KNOWN_ALIASES.get(key, key)
        if key in KNOWN_MODELS:
            return KNOWN_MODELS[key]
        known = ", ".join(KNOWN_MODELS)
        raise UserError(f"unknown model {model!r}: not a known name ({known}), "
                        "nor a folder with config.json, nor a config.json file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{config_path}: cannot read it as JSON ({error})") from error
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    return shapes_from_config(config, str(config_path))
