"""Memory estimator: what one training step of a method costs on a GPU, before anything is loaded.

    total = weights + gradients + optimizer states + activations + overhead

    weights     = Σ params · bytes(dtype)       (frozen k-bit layers: bits/8 bytes + quantization constants)
    gradients   = N_trainable · bytes(trainable dtype)
    optimizer   = N_trainable · bytes per param of states (AdamW: 2 states; SGD: 0; 8-bit Adam: 2 bytes)
    activations = what autograd saves for backward   (two models: `seed` and `detailed`)
    overhead    = CUDA context (~1 GB) [+ the largest backward temporary, detailed model]

Units: "GB" here means GiB (2**30 bytes), as on the seed slides (13.03 "Gb" = 7e9 · 2 bytes / 2**30).

Layout: this file holds the vocabulary shared by every part (dtypes, methods and what they train,
trainable-parameter counts); `shapes` reads model shapes, `seed` is the slide formula, `detailed` the per-layer
autograd accounting, `cli` puts them together (`estimate_for_model`, `hardware_table`, the `estimate` command).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deltatune.errors import UserError
from deltatune.estimate.shapes import ModelShapes

GIB = 2**30
METHODS = ("full", "head", "last2", "features", "lora", "adalora", "bitfit", "adapter", "prompt", "prefix",
           "ptuning", "ia3", "mam", "qlora")
OPTIMIZERS = ("adamw", "sgd", "adam8bit")
CLASSIFIER_ONLY = ("head", "features")
"""Methods that train or fit only a classifier: none of them applies to a generation task."""
LORA_TARGETS = {"bert": ("q", "v"), "llama": ("q", "v"), "gpt2": ("qkv",)}
"""peft's default LoRA targets: query/value (q_proj/v_proj); GPT-2 has one fused c_attn."""
IA3_OUTPUT_SCALED = {"bert": ("k", "v"), "llama": ("k", "v"), "gpt2": ("qkv",)}
IA3_INPUT_SCALED = {"bert": ("o", "down"), "llama": ("down",), "gpt2": ("down",)}
"""peft's IA3 defaults: l_k, l_v scale the key/value outputs, l_ff scales the input of the FFN output layer
(for BERT the pattern "output.dense" also matches the attention output projection, so it is scaled too)."""
QUANT_CONSTANT_BITS = {8: 0.0, 4: 0.127, 2: 0.5}
"""Extra bits per quantized weight: LLM.int8 row scales (negligible), NF4 with double quantization
(QLoRA paper: 0.127 bits), 2-bit with an fp16 scale and zero per group of 64 (0.5 bits)."""


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
    "2bit": Precision("2bit", 2, 2, 4, 2, quantized_bits=2),
}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "16": "bf16", "16bit": "bf16", "8bit": "int8", "8": "int8", "nf4": "4bit", "int4": "4bit",
                 "4": "4bit", "int2": "2bit", "2": "2bit", "mixed": "amp"}


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
class DeltaSettings:
    """Hyper-parameters of the deltas that change their size."""

    num_virtual_tokens: int = 20
    """n soft tokens of prompt tuning / p-tuning, and per-layer key/value tokens of prefix tuning and MAM."""
    lora_rank: int = 8
    """r of LoRA (and of QLoRA)."""
    adalora_initial_rank: int = 12
    """AdaLoRA starts at init_r and prunes to target_r: memory peaks at the start."""
    adapter_bottleneck: int = 64
    """m of the Houlsby adapters (one after attention, one after the FFN)."""
    mam_adapter_bottleneck: int = 512
    """m of MAM's scaled parallel FFN adapter (He et al. 2022 use 512)."""
    ptuning_encoder_hidden: int | None = None
    """Width of p-tuning's MLP prompt encoder; None = hidden (peft's default)."""


@dataclass(frozen=True)
class LayerDelta:
    """What trains inside one transformer layer."""

    all_weights: bool = False
    """Every matrix, bias and norm of the layer (full, last2)."""
    biases: bool = False
    """Only the biases (BitFit)."""
    lora_targets: tuple[str, ...] = ()
    """Roles (q, v, qkv, ...) that get a low-rank update W + B·A."""
    lora_rank: int = 0
    adalora: bool = False
    """AdaLoRA: W + B·diag(E)·A, one more vector E of r singular values."""
    ia3: bool = False
    """IA3 scaling vectors on k, v outputs and the FFN output layer's input."""
    serial_adapter: int = 0
    """Bottleneck of the two Houlsby adapters (0 = none)."""
    parallel_adapter: int = 0
    """Bottleneck of MAM's parallel FFN adapter (0 = none)."""
    prefix_tokens: int = 0
    """Trainable key/value tokens prepended in this layer's attention (prefix tuning, MAM)."""

    @property
    def trains(self) -> bool:
        return bool(self.all_weights or self.biases or self.lora_targets or self.ia3 or self.serial_adapter
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
    backprop: bool = True
    """False for features: frozen features are extracted without autograd and a classifier is fit on them."""
    settings: DeltaSettings = field(default_factory=DeltaSettings)


def plan_for_method(method: str, shapes: ModelShapes, generation: bool,
                    settings: DeltaSettings | None = None) -> MethodPlan:
    """The trainable parts of `method` on a model of these shapes (task heads: see `MethodPlan.head`)."""
    settings = settings or DeltaSettings()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if generation and method in CLASSIFIER_ONLY:
        raise UserError(f"{method} trains only a classifier: on a generation task the LM head stays frozen and "
                        "nothing would train (use --task classification)")
    n_layers, tokens = shapes.layers, settings.num_virtual_tokens
    if tokens < 1 and method in ("prompt", "prefix", "ptuning", "mam"):
        raise UserError(f"{method} needs num_virtual_tokens >= 1, got {tokens}")
    new_head = not generation           # a new classifier trains; a pretrained LM head stays frozen

    def every_layer(delta: LayerDelta) -> tuple[LayerDelta, ...]:
        return (delta,) * n_layers

    frozen = LayerDelta()
    lora = LayerDelta(lora_targets=LORA_TARGETS[shapes.family], lora_rank=settings.lora_rank)
    plans = {
        "full": lambda: MethodPlan(method, every_layer(LayerDelta(all_weights=True)), embeddings=True, top=True),
        "head": lambda: MethodPlan(method, every_layer(frozen)),
        "last2": lambda: MethodPlan(method, (frozen,) * max(n_layers - 2, 0)  # + the final norm; BERT's pooler
                                    + (LayerDelta(all_weights=True),) * min(2, n_layers),  # stays frozen
                                    top=shapes.family != "bert", head=new_head),
        "features": lambda: MethodPlan(method, every_layer(frozen), backprop=False),
        "lora": lambda: MethodPlan(method, every_layer(lora), head=new_head),
        "qlora": lambda: MethodPlan(method, every_layer(lora), head=new_head),
        "adalora": lambda: MethodPlan(method, every_layer(LayerDelta(
            lora_targets=LORA_TARGETS[shapes.family], lora_rank=settings.adalora_initial_rank, adalora=True)),
            head=new_head),
        "bitfit": lambda: MethodPlan(method, every_layer(LayerDelta(biases=True)), outside_biases=True,
                                     head=new_head),
        "adapter": lambda: MethodPlan(method, every_layer(LayerDelta(serial_adapter=settings.adapter_bottleneck)),
                                      head=new_head),
        "prompt": lambda: MethodPlan(method, every_layer(frozen), prompt_tokens=tokens, head=new_head),
        "ptuning": lambda: MethodPlan(method, every_layer(frozen), prompt_tokens=tokens, head=new_head,
                                      prompt_encoder_hidden=settings.ptuning_encoder_hidden or shapes.hidden),
        "prefix": lambda: MethodPlan(method, every_layer(LayerDelta(prefix_tokens=tokens)), head=new_head),
        "ia3": lambda: MethodPlan(method, every_layer(LayerDelta(ia3=True)), head=new_head),
        "mam": lambda: MethodPlan(method, every_layer(LayerDelta(
            prefix_tokens=tokens, parallel_adapter=settings.mam_adapter_bottleneck)), head=new_head),
    }
    plan = plans[method]()
    if method == "bitfit" and shapes.layer_bias_params() == 0:
        raise UserError(f"bitfit: {shapes.name} has no bias parameters to train")
    return replace(plan, settings=settings)


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

    LoRA:     r·(in + out) per target (A: r×in, B: out×r); AdaLoRA adds E (r values)
    adapter:  2 · (h·m + m + m·h + h)      (down and up projections with biases, after attention and FFN)
    parallel: h·m + m + m·h + h            (MAM's FFN adapter)
    IA3:      Σ out(k, v targets) + Σ in(FFN-output targets)
    prefix:   2 · n · kv_dim               (n key and n value vectors per layer)
    """
    linears = shapes.layer_linears()
    backbone = 0
    if delta.all_weights:
        backbone = shapes.layer_params()
    elif delta.biases:
        backbone = shapes.layer_bias_params()
    added = 0
    for role in delta.lora_targets:
        lin = linears[role]
        added += delta.lora_rank * (lin.in_features + lin.out_features) + (delta.lora_rank if delta.adalora else 0)
    h = shapes.hidden
    if delta.ia3:
        added += sum(linears[role].out_features for role in IA3_OUTPUT_SCALED[shapes.family])
        added += sum(linears[role].in_features for role in IA3_INPUT_SCALED[shapes.family])
    for bottleneck, count in ((delta.serial_adapter, 2), (delta.parallel_adapter, 1)):
        added += count * (2 * h * bottleneck + bottleneck + h) if bottleneck else 0
    added += 2 * delta.prefix_tokens * shapes.kv_dim
    return TrainableParams(backbone, added)


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
    return TrainableParams(backbone, delta)


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
        for role in layer.lora_targets:                     # A: r × in, B: out × r
            delta.append(layer.lora_rank * max(linears[role].in_features, linears[role].out_features))
        if layer.ia3:
            delta.append(max([linears[r].out_features for r in IA3_OUTPUT_SCALED[shapes.family]]
                             + [linears[r].in_features for r in IA3_INPUT_SCALED[shapes.family]]))
        for bottleneck in (layer.serial_adapter, layer.parallel_adapter):
            delta.append(h * bottleneck)
    prefix_layers = sum(1 for layer in plan.layers if layer.prefix_tokens)
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
    return TrainableParams(max(backbone), max(delta))
