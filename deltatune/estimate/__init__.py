"""Memory estimator: what one training step of a method costs on a GPU, before anything is loaded.

    total = weights + gradients + optimizer states + activations + overhead

    weights     = Σ params · bytes(dtype)       (frozen k-bit layers: bits/8 bytes + quantization constants)
    gradients   = N_trainable · bytes(trainable dtype)
    optimizer   = N_trainable · bytes per param of states (AdamW: 2 states; SGD: 0; 8-bit Adam: 2 bytes)
    activations = what autograd saves for backward   (two models: `seed` and `detailed`)
    overhead    = CUDA context (~1 GB) [+ the largest backward temporary, detailed model]

Units: "GB" here means GiB (2**30 bytes), as on the seed slides (13.03 "Gb" = 7e9 · 2 bytes / 2**30).

Layout: this file holds the vocabulary shared by every part (dtypes, methods and what they train,
trainable-parameter counts); `sizes` reads each method's delta sizes from its own Config (LoRA and its
variants: what the method file's `estimate_site` says one adapted matrix costs), `shapes` reads model shapes,
`seed` is the slide formula, `detailed` the per-layer autograd accounting, `total` puts them together
(`estimate_for_model`), `cli` prints them (`hardware_table`, the `estimate` command), `measure` runs real steps.

`qlora` is a projection, not a method: LoRA as `lora.Config` sizes it, on a 4-bit frozen backbone, as the
seed's hardware table (LLaMA-Factory) counts it. No deltatune method implements it yet (the quantised-backbone
issue will); `--measure` and `compare` leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.errors import UserError
from deltatune.estimate.shapes import ModelShapes
from deltatune.estimate.sizes import (
    SITE_METHODS,
    adapter_bottleneck,
    chosen_layers,
    ia3_roles,
    method_config,
    site_estimate,
    target_roles,
)
from deltatune.methods.base import SiteEstimate

GIB = 2**30
METHODS = ("full", "head", "last2", "features", "lora", "adalora", "bitfit", "adapter", "prompt", "prefix",
           "ptuning", "ia3", "mam", "qlora", "galore", "badam", "rrlora", "dora", "vera", "loha", "lokr")
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "paged_adamw8bit")
"""`train --optimizer`'s names (deltatune/optimizers.py; `adam8bit` is an alias of adamw8bit) and sgd."""
CLASSIFIER_ONLY = ("head", "features")
"""Methods that train or fit only a classifier: none of them applies to a generation task."""
PROJECTED = ("qlora",)
"""Rows that no deltatune method implements yet: projections of the seed's table (see above)."""
QUANT_CONSTANT_BITS = {8: 0.0, 5: 0.0, 4: 0.127, 3: 0.7, 2: 0.5}
"""Extra bits per quantized weight: LLM.int8 row scales (negligible), NF4 with double quantization
(QLoRA paper: 0.127 bits), 3-bit (ten codes per int32: 0.2) and 2-bit with a 16-bit scale and zero per group
of 64 (0.5 bits), as `train --quantize` stores them (deltatune/storage_bnb.py, storage_hqq.py). q4_1 counts
as 5 bits with its constants inside: 4-bit codes + an fp16 scale and minimum per 32 (storage_gguf.py)."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor under a training dtype."""

    name: str
    frozen_bytes: float
    """Frozen parameters that are not quantized (all of them unless k-bit)."""
    trained_bytes: float
    """Backbone parameters that train (and the classifier head), their gradients and each optimizer state."""
    delta_bytes: float
    """Added delta parameters (LoRA, adapters, prompts, IA3): fp32 whenever the backbone is 16-bit or k-bit,
    because peft's autocast_adapter_dtype keeps them in fp32; also the dtype their activations use."""
    activation_bytes: float
    """Activations of the backbone (the compute dtype)."""
    quantized_bits: int | None = None
    """k-bit storage for the frozen weight matrices of the layers (embeddings, norms, LM head stay 16-bit)."""
    amp_copy: bool = False
    """Mixed precision: autocast caches an fp16 copy (2 bytes) of each trainable weight during the step."""


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 4, 4),
    "bf16": Precision("bf16", 2, 2, 4, 2),
    "fp16": Precision("fp16", 2, 2, 4, 2),
    "amp": Precision("amp", 4, 4, 4, 2, amp_copy=True),
    "int8": Precision("int8", 2, 2, 4, 2, quantized_bits=8),
    "4bit": Precision("4bit", 2, 2, 4, 2, quantized_bits=4),
    "3bit": Precision("3bit", 2, 2, 4, 2, quantized_bits=3),
    "2bit": Precision("2bit", 2, 2, 4, 2, quantized_bits=2),
    "q4_1": Precision("q4_1", 2, 2, 4, 2, quantized_bits=5),
}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "16": "bf16", "16bit": "bf16", "8bit": "int8", "8": "int8", "nf4": "4bit", "int4": "4bit",
                 "4": "4bit", "int2": "2bit", "2": "2bit", "mixed": "amp", "fp4": "4bit", "int3": "3bit", "3": "3bit",
                 "q4-1": "q4_1"}
"""`train --quantize`'s kinds (nf4, fp4, int8, 3bit, 2bit, q4_1) name the same rows here."""


def precision_for(dtype: str, method: str) -> Precision:
    """The precision a method trains under; qlora means a 4-bit backbone unless a k-bit dtype is given."""
    key = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    if key not in PRECISIONS:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(PRECISIONS)})")
    precision = PRECISIONS[key]
    if method == "qlora" and precision.quantized_bits is None:
        return PRECISIONS["4bit"]
    return precision


@dataclass(frozen=True)
class LayerDelta:
    """What trains inside one transformer layer."""

    all_weights: bool = False
    """Every matrix, bias and norm of the layer (full, last2)."""
    biases: bool = False
    """Only the biases (BitFit)."""
    sites: tuple[tuple[str, SiteEstimate], ...] = ()
    """Roles (q, v, qkv, ...) with a side update and what it adds there, as the method file sizes it
    (`estimate_site`: LoRA, rsLoRA / PiSSA / random ranks, DoRA, VeRA, LoHa, LoKr)."""
    lora_targets: tuple[str, ...] = ()
    """AdaLoRA: roles (q, v, qkv, ...) that get a low-rank update W + B·A."""
    lora_rank: int = 0
    adalora: bool = False
    """AdaLoRA: W + B·diag(E)·A, one more vector E of r singular values."""
    ia3_out: tuple[str, ...] = ()
    """IA3: matrices whose outputs a vector scales (GPT-2's c_attn: "qkv" once per scaled third)."""
    ia3_in: tuple[str, ...] = ()
    """IA3: matrices whose inputs a vector scales (the feed-forward targets)."""
    serial_adapter: int = 0
    """Bottleneck of the two Houlsby adapters (0 = none)."""
    parallel_adapter: int = 0
    """Bottleneck of MAM's parallel FFN adapter (0 = none)."""
    prefix_tokens: int = 0
    """Key/value tokens prepended in this layer's attention (prefix tuning, MAM)."""
    prefix_direct: bool = True
    """The prefix's keys/values are parameters themselves (False: an MLP produces them while training, see
    `MethodPlan.prefix_encoder_hidden`; its parameters are counted there)."""

    @property
    def trains(self) -> bool:
        return bool(self.all_weights or self.biases or self.sites or self.lora_targets or self.ia3_out or self.ia3_in
                    or self.serial_adapter
                    or self.parallel_adapter or self.prefix_tokens)


@dataclass(frozen=True)
class MethodPlan:
    """Where a method puts trainable parameters in the network."""

    method: str
    layers: tuple[LayerDelta, ...]
    embeddings: bool = False
    """The embedding matrices train (full)."""
    top: bool = False
    """Pooler / final norm between the last layer and the head train (full; last2 trains a final norm, not
    BERT's pooler, which belongs to the frozen backbone)."""
    head: bool = True
    """The task head trains: the new classifier (classification), or for generation the LM head, which only
    `full` trains (deltatune keeps a pretrained LM head frozen: `head`, `last2` and PEFT methods leave it)."""
    outside_biases: bool = False
    """BitFit: the biases outside the layers (embedding LayerNorm, pooler, final LayerNorm)."""
    prompt_tokens: int = 0
    """Soft tokens prepended to the input embeddings: the sequence grows by this many (prompt, p-tuning)."""
    prompt_encoder_hidden: int = 0
    """p-tuning: width of the MLP that produces the soft tokens (0 = plain prompt tuning)."""
    prefix_encoder_hidden: int = 0
    """Prefix tuning's reparametrisation while it trains: P' (n, h) -> e -> every prefixed layer's keys and
    values (0 = P trains directly)."""
    backprop: bool = True
    """False for features: frozen features are extracted without autograd and a classifier is fit on them."""


def plan_for_method(method: str, shapes: ModelShapes, generation: bool, config: Any | None = None) -> MethodPlan:
    """The trainable parts of `method` on a model of these shapes (task heads: see `MethodPlan.head`); the
    delta's sizes come from `config`, the method's own Config (None: its defaults, `sizes.method_config`)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if generation and method in CLASSIFIER_ONLY:
        raise UserError(f"{method} trains only a classifier: on a generation task the LM head stays frozen and "
                        "nothing would train (use --task classification)")
    config = method_config(method) if config is None else config
    tokens = getattr(config, "num_virtual_tokens", 1)
    if tokens < 1:
        raise UserError(f"{method} needs num_virtual_tokens >= 1, got {tokens}")
    n_layers, h = shapes.layers, shapes.hidden
    new_head = not generation           # a new classifier trains; a pretrained LM head stays frozen
    chosen = chosen_layers(config, n_layers)

    def every_layer(delta: LayerDelta) -> tuple[LayerDelta, ...]:
        return tuple(delta if i in chosen else LayerDelta() for i in range(n_layers))

    def lora_layers(rank: int, adalora: bool = False) -> tuple[LayerDelta, ...]:
        roles = target_roles(config.target_modules, shapes.family, method)
        return every_layer(LayerDelta(lora_targets=roles, lora_rank=rank, adalora=adalora))

    def site_layers() -> MethodPlan:
        linears = shapes.layer_linears()
        roles = target_roles(config.target_modules, shapes.family, method)
        sites = tuple((role, site_estimate(method, config, linears[role].in_features, linears[role].out_features))
                      for role in roles)
        return MethodPlan(method, every_layer(LayerDelta(sites=sites)), head=new_head)

    def adapter_layers() -> tuple[LayerDelta, ...]:
        if (config.placement, config.parallel) not in (("attn_ffn", False), ("ffn", True)):
            raise UserError("adapter: the estimate models placement=attn_ffn (serial) and ffn with parallel=true")
        size = adapter_bottleneck(config, h)
        return every_layer(LayerDelta(parallel_adapter=size) if config.parallel else LayerDelta(serial_adapter=size))

    def ia3_layers() -> tuple[LayerDelta, ...]:
        scaled_out, scaled_in = ia3_roles(config, shapes.family)
        return every_layer(LayerDelta(ia3_out=scaled_out, ia3_in=scaled_in))

    def ptuning() -> MethodPlan:
        if config.encoder != "mlp":
            raise UserError(f"ptuning: the estimate models the mlp encoder, not '{config.encoder}'")
        return MethodPlan(method, every_layer(LayerDelta()), prompt_tokens=tokens, head=new_head,
                          prompt_encoder_hidden=config.encoder_hidden_size or h)

    frozen = LayerDelta()
    plans = {
        "full": lambda: MethodPlan(method, (LayerDelta(all_weights=True),) * n_layers, embeddings=True, top=True),
        "head": lambda: MethodPlan(method, (frozen,) * n_layers),
        "last2": lambda: MethodPlan(method, (frozen,) * max(n_layers - 2, 0)  # + the final norm; BERT's pooler
                                    + (LayerDelta(all_weights=True),) * min(2, n_layers),  # stays frozen
                                    top=shapes.family != "bert", head=new_head),
        "features": lambda: MethodPlan(method, (frozen,) * n_layers, backprop=False),
        **{name: site_layers for name in SITE_METHODS},  # lora, qlora, rrlora, dora, vera, loha, lokr
        # GaLore: every layer weight trains (full gradients); its optimizer state: `optimizer_state_params`
        "galore": lambda: MethodPlan(method, (LayerDelta(all_weights=True),) * n_layers, top=True, head=new_head),
        # BAdam: one layer's gradients and Adam state at a time; the worst block is the bottom one, whose
        # gradient needs the backward through every layer above it
        "badam": lambda: MethodPlan(method, (LayerDelta(all_weights=True),) + (frozen,) * (n_layers - 1),
                                    head=new_head),
        "adalora": lambda: MethodPlan(method, lora_layers(config.init_r, adalora=True), head=new_head),
        "bitfit": lambda: MethodPlan(method, (LayerDelta(biases=True),) * n_layers, outside_biases=True,
                                     head=new_head),
        "adapter": lambda: MethodPlan(method, adapter_layers(), head=new_head),
        "prompt": lambda: MethodPlan(method, (frozen,) * n_layers, prompt_tokens=tokens, head=new_head),
        "ptuning": ptuning,
        "prefix": lambda: MethodPlan(method, every_layer(LayerDelta(prefix_tokens=tokens,
                                                                    prefix_direct=not config.projection)),
                                     head=new_head,
                                     prefix_encoder_hidden=config.encoder_hidden_size if config.projection else 0),
        "ia3": lambda: MethodPlan(method, ia3_layers(), head=new_head),
        "mam": lambda: MethodPlan(method, (LayerDelta(prefix_tokens=tokens, prefix_direct=not config.prefix_projection,
                                                      parallel_adapter=adapter_bottleneck(config, h)),) * n_layers,
                                  head=new_head,
                                  prefix_encoder_hidden=config.encoder_hidden_size if config.prefix_projection else 0),
    }
    plan = plans[method]()
    if method == "bitfit" and shapes.layer_bias_params() == 0:
        raise UserError(f"bitfit: {shapes.name} has no bias parameters to train")
    return plan


@dataclass(frozen=True)
class TrainableParams:
    """Trainable parameters, split by the dtype they are kept in."""

    backbone: int
    """Existing backbone parameters that train, plus a new classifier head: kept in the model's dtype."""
    delta: int
    """Parameters the method adds (LoRA, adapters, soft prompts, IA3 vectors): see `Precision.delta_bytes`."""

    @property
    def total(self) -> int:
        return self.backbone + self.delta


def classifier_bias(shapes: ModelShapes, backprop: bool = True) -> bool:
    """transformers' BERT classifier has a bias; its decoder classifiers (`score`) have none; `features`
    fits the biased linear head of deltatune's PooledClassifier."""
    return shapes.family == "bert" or not backprop


def head_params(shapes: ModelShapes, generation: bool, num_labels: int, bias: bool = True) -> int:
    """Classifier: h·labels (+ labels). Generation: the LM head V·h (the embedding matrix when tied)."""
    if generation:
        return shapes.vocab * shapes.hidden
    return shapes.hidden * num_labels + (num_labels if bias else 0)


def layer_delta_params(shapes: ModelShapes, delta: LayerDelta) -> TrainableParams:
    """Trainable parameters of one layer under `delta`.

    sites:    what the method file says (`estimate_site`; LoRA: r·(in + out) per target, A: r×in, B: out×r)
    AdaLoRA:  r·(in + out) + r (E) per target
    adapter:  2 · (h·m + m + m·h + h)      (down and up projections with biases, after attention and FFN)
    parallel: h·m + m + m·h + h            (MAM's FFN adapter)
    IA3:      Σ out(output-scaled targets) + Σ in(feed-forward targets)
    prefix:   2 · n · kv_dim               (n key and n value vectors per layer; with the MLP: none here,
                                            `prefix_encoder_params` counts P' and the MLP)
    """
    linears = shapes.layer_linears()
    backbone = 0
    added = sum(site.params for _, site in delta.sites)
    if delta.all_weights:
        backbone = shapes.layer_params()
    elif delta.biases:
        backbone = shapes.layer_bias_params()
    for role in delta.lora_targets:
        lin = linears[role]
        added += delta.lora_rank * (lin.in_features + lin.out_features) + (delta.lora_rank if delta.adalora else 0)
    h = shapes.hidden
    added += sum(ia3_width(linears, role) for role in delta.ia3_out)
    added += sum(linears[role].in_features for role in delta.ia3_in)
    for bottleneck, count in ((delta.serial_adapter, 2), (delta.parallel_adapter, 1)):
        added += count * (2 * h * bottleneck + bottleneck + h) if bottleneck else 0
    added += 2 * delta.prefix_tokens * shapes.kv_dim if delta.prefix_direct else 0
    return TrainableParams(backbone, round(added))  # random ranks: the mean rank may be a half


def ia3_width(linears: dict, role: str) -> int:
    """Elements of an output-scaling IA3 vector: the matrix's outputs (a third of GPT-2's fused qkv)."""
    return linears[role].out_features // (3 if role == "qkv" else 1)


def prefix_encoder_params(shapes: ModelShapes, plan: MethodPlan) -> tuple[int, int]:
    """(parameters, largest tensor) of prefix tuning's MLP: P' (n·h), h→e (+e), e→L·2·kv (+L·2·kv)."""
    e = plan.prefix_encoder_hidden
    tokens = max((layer.prefix_tokens for layer in plan.layers), default=0)
    if not e or not tokens:
        return 0, 0
    out = sum(1 for layer in plan.layers if layer.prefix_tokens) * 2 * shapes.kv_dim
    h = shapes.hidden
    return tokens * h + h * e + e + e * out + out, max(tokens * h, h * e, e * out)


def count_trainable(shapes: ModelShapes, plan: MethodPlan, generation: bool, num_labels: int) -> TrainableParams:
    """Trainable parameters of a whole plan; `full` gives exactly n_params (+ the new classifier)."""
    backbone = delta = 0
    for layer in plan.layers:
        counts = layer_delta_params(shapes, layer)
        backbone, delta = backbone + counts.backbone, delta + counts.delta
    if plan.embeddings:
        backbone += shapes.embedding_params()
    if plan.top:
        backbone += shapes.top_params()
    if plan.outside_biases:
        backbone += shapes.outside_layer_bias_params()
    if plan.head:
        tied_and_counted = generation and shapes.tied_embeddings and plan.embeddings  # full counted it already
        backbone += 0 if tied_and_counted else head_params(shapes, generation, num_labels,
                                                           classifier_bias(shapes, plan.backprop))
    h, n, e = shapes.hidden, plan.prompt_tokens, plan.prompt_encoder_hidden
    delta += n * h                                        # the soft prompt embeddings
    if e:
        delta += (h * e + e) + (e * e + e) + (e * h + h)  # p-tuning MLP: h→e→e→h with biases
    delta += prefix_encoder_params(shapes, plan)[0]
    return TrainableParams(backbone, delta)


def optimizer_state_params(shapes: ModelShapes, plan: MethodPlan, trainable: TrainableParams,
                           config: Any | None) -> TrainableParams:
    """Parameters whose optimizer state is kept (each gets Adam's m and v): every trainable one, except
    under GaLore, whose projected layer matrices (m × n) keep their state at rank r: r · max(m, n)."""
    if plan.method != "galore":
        return trainable
    linears = shapes.layer_linears().values()
    full = sum(lin.in_features * lin.out_features for lin in linears)
    projected = sum(config.rank * max(lin.in_features, lin.out_features) for lin in linears)
    layers = sum(1 for layer in plan.layers if layer.all_weights)
    return TrainableParams(trainable.backbone - layers * (full - projected), trainable.delta)


def quantized_matrix_params(shapes: ModelShapes, plan: MethodPlan) -> int:
    """Weight matrices of layers whose matrices stay frozen (what a k-bit backbone stores in bits/8 bytes)."""
    return sum(shapes.layer_matrix_params() for layer in plan.layers if not layer.all_weights)


def largest_trainable_tensors(shapes: ModelShapes, plan: MethodPlan, generation: bool,
                              num_labels: int) -> TrainableParams:
    """Elements of the biggest single trainable tensor, among backbone (and head) parameters and among delta
    parameters: AdamW updates one tensor at a time on the CPU and allocates two temporaries of its size
    (sqrt(v) and sqrt(v)/bias-correction)."""
    linears = shapes.layer_linears()
    h, backbone, delta = shapes.hidden, [0], [0]
    for layer in plan.layers:
        if layer.all_weights:
            backbone.append(max(lin.in_features * lin.out_features for lin in linears.values()))
        elif layer.biases:
            backbone.append(max([lin.out_features for lin in linears.values() if lin.has_bias] + [h]))
        delta += [site.largest for _, site in layer.sites]
        for role in layer.lora_targets:                     # A: r × in, B: out × r
            delta.append(layer.lora_rank * max(linears[role].in_features, linears[role].out_features))
        delta += [ia3_width(linears, r) for r in layer.ia3_out] + [linears[r].in_features for r in layer.ia3_in]
        for bottleneck in (layer.serial_adapter, layer.parallel_adapter):
            delta.append(h * bottleneck)
    prefix_layers = sum(1 for layer in plan.layers if layer.prefix_tokens and layer.prefix_direct)
    if prefix_layers:                                        # one (L, 2, n, kv) tensor for every layer
        delta.append(prefix_layers * 2 * max(layer.prefix_tokens for layer in plan.layers) * shapes.kv_dim)
    if plan.embeddings:
        backbone.append(shapes.vocab * h)
    if plan.top:
        backbone.append(shapes.top_params() - h if shapes.family == "bert" else h)
    if plan.head:
        backbone.append(shapes.vocab * h if generation else h * num_labels)
    if plan.prompt_tokens:
        delta.append(plan.prompt_tokens * h)
    if plan.prompt_encoder_hidden:
        e = plan.prompt_encoder_hidden
        delta.append(max(h * e, e * e))
    delta.append(prefix_encoder_params(shapes, plan)[1])
    return TrainableParams(max(backbone), max(delta))
