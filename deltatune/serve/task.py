"""One served task: its delta applied around a structural clone of the shared, frozen backbone.

    shared backbone (loaded once, never written) ── weights shared, modules cloned ──> task's clone
                                                                                       │ method.apply
    task model (`top`): head + clone + the method's modules  ── runs the task alone (its own group)
    head view: the same head over a `Precomputed` stand-in   ── reads the rows' slice of a mixed pass

A delta that overwrites backbone weights (BitFit biases, unfrozen layers, full fine-tuning) gets private
copies of exactly those weights before loading (`delta.apply_delta(before_load=...)`), so the shared
backbone is never modified; such a task cannot share the mixed pass and runs as its own group.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deltatune.backbone import ArchSpec, PooledClassifier, TaskModel
from deltatune.delta import apply_delta, delta_size_bytes
from deltatune.errors import UserError
from deltatune.methods import resolve_method
from deltatune.methods.prefix import prefix_of
from deltatune.methods.prompt import soft_tokens_of
from deltatune.methods.rows import RowSite
from deltatune.serve.routing import find_sites, structural_clone, unexplained

SHARED, OWN = "shared", "own"


class BackboneMismatch(UserError):
    """A delta trained on another backbone than the served one (HTTP 409)."""


@dataclass
class SharedBackbone:
    """The one frozen backbone every task reuses, and what a task model needs to know about it."""

    module: nn.Module
    tokenizer: object
    arch: ArchSpec
    model_path: str
    fingerprint: str
    device: torch.device
    lm_head: nn.Module | None = None
    """The pretrained LM head (tied to the embeddings or read from the checkpoint), for generation."""
    quantization: dict | None = None
    """--quantize: the backbone's quantisation (deltatune/quantize.py); None: as loaded."""

    def tensor_ids(self) -> set[int]:
        tensors = itertools.chain(self.module.parameters(), self.module.buffers(),
                                  self.lm_head.parameters() if self.lm_head is not None else ())
        return {id(t) for t in tensors}


class Precomputed(nn.Module):
    """Stands in for the backbone inside a head view: returns the output it was handed."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.output = None

    def forward(self, *args, **kwargs):
        output, self.output = self.output, None
        return output


@dataclass
class ServedTask:
    name: str
    path: str
    meta: dict
    top: nn.Module
    """The task alone: its head over a structural clone of the backbone (with the method's modules)."""
    base_name: str
    view: nn.Module
    """The same head over `stub`: classifies rows of a shared pass."""
    stub: Precomputed
    group: str
    """'shared' (rows join the mixed pass) or 'own' (rows run through `top`, grouped by task)."""
    reason: str = ""
    sites: dict[str, RowSite] = field(default_factory=dict)
    """Backbone path -> the method's row site there (its row key says which router applies it)."""
    soft_tokens: tuple[torch.Tensor, int] | None = None
    """(P (n, H), insert position) for prompt / P-tuning tasks."""
    prefix: torch.Tensor | None = None
    """(L, 2, n, kv_dim) for prefix / MAM tasks."""
    tokenizer: object = None
    """The task's tokenizer: the shared one, or a template renderer (verbalizer objective)."""

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def kind(self) -> str:
        return self.meta.get("task", {}).get("kind", "classification")

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("task", {}).get("label_names", []))

    @property
    def max_length(self) -> int:
        return int(self.meta.get("train_config", {}).get("max_length", 128))

    @property
    def soft_token_count(self) -> int:
        return self.soft_tokens[0].shape[0] if self.soft_tokens is not None else 0

    def describe(self) -> dict:
        """JSON-ready summary (catalog, /v1/tasks, the page)."""
        return {"name": self.name, "method": self.method, "kind": self.kind, "labels": self.labels,
                "group": self.group, "reason": self.reason, "metrics": self.meta.get("metrics", {}),
                "created_at": self.meta.get("created_at"), "delta_bytes": delta_size_bytes(self.path)}


def build_top(shared: SharedBackbone, clone: nn.Module, pooling: str, num_labels: int) -> tuple[nn.Module, str]:
    """The task's model around `clone`, without loading any weight: (module, name of its backbone child)."""
    if pooling in ("mean", "cls", "last"):
        top = PooledClassifier(clone, num_labels, pooling).to(shared.device)
        return top, "backbone"
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(clone.config)
    if pooling == "hf":
        config.num_labels = num_labels
        config.pad_token_id = shared.tokenizer.pad_token_id
        model_class = AutoModelForSequenceClassification
    elif pooling == "lm" and not config.is_encoder_decoder:
        model_class = AutoModelForCausalLM
    elif pooling == "lm":  # the decode loop's KV cache holds a decoder's self-attention only
        raise UserError(f"serve generates with decoders only: a {config.model_type} (encoder-decoder) generation "
                        "delta decodes alone, through transformers' generate: use deltatune generate")
    else:
        raise UserError(f"serve cannot build a '{pooling}' model for {config.model_type}")
    with torch.device("meta"):  # only the head's shapes: the backbone is the clone
        top = model_class.from_config(config)
    base_name = top.base_model_prefix
    setattr(top, base_name, clone)
    dtype = next(clone.parameters()).dtype
    for name, child in top.named_children():
        if name != base_name:
            child.to_empty(device=shared.device).to(dtype)
            for p in child.parameters():
                nn.init.zeros_(p)
    if pooling == "lm" and shared.lm_head is not None:  # else the delta must carry its own lm_head
        head = shared.lm_head.weight
        top.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device="meta")
        top.lm_head.weight = head  # the task's own module around the shared weight: privatizing never
        # touches another task's head
    return top, base_name


def privatizer(shared_ids: set[int]):
    """before_load hook: every shared weight the delta writes gets a private copy first (ties kept)."""

    def privatize(task_model: TaskModel, tensors: dict[str, torch.Tensor]) -> None:
        module = task_model.module
        written = set(tensors) | {n for n, p in module.named_parameters() if p.requires_grad}
        named = list(itertools.chain(module.named_parameters(remove_duplicate=False),
                                     module.named_buffers(remove_duplicate=False)))
        targets = {id(t) for n, t in named if n in written and id(t) in shared_ids}
        copies: dict[int, torch.Tensor] = {}
        for name, tensor in named:
            if id(tensor) not in targets:
                continue
            if id(tensor) not in copies:
                data = tensor.detach().clone()
                copies[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(
                    tensor, nn.Parameter) else data
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            store = owner._parameters if attr in owner._parameters else owner._buffers
            store[attr] = copies[id(tensor)]

    return privatize


def build_task(shared: SharedBackbone, name: str, path: str | Path, meta: dict,
               tensors: dict[str, torch.Tensor]) -> ServedTask:
    """Apply a delta around a clone of the shared backbone; decide whether it can share the mixed pass."""
    backbone_meta = meta.get("backbone", {})
    if backbone_meta.get("fingerprint") != shared.fingerprint:
        raise BackboneMismatch(
            f"task '{name}': delta was trained on a different backbone ({backbone_meta.get('path')}, "
            f"fingerprint {backbone_meta.get('fingerprint')}) than the served {shared.model_path} "
            f"(fingerprint {shared.fingerprint})")
    method, method_config = resolve_method(meta["method"], meta.get("method_config", {}))
    if method.runs_own_job:
        raise UserError(f"task '{name}': method '{meta['method']}' predicts through its own pipeline, not a "
                        "pass of the model: serve does not run it (use deltatune predict)")
    pooling = backbone_meta.get("pooling", "hf")
    labels = meta.get("task", {}).get("label_names", [])
    num_labels = int(meta.get("num_labels") or len(labels) or 1)
    clone = structural_clone(shared.module)
    top, base_name = build_top(shared, clone, pooling, num_labels)
    vanilla_children = set(top._modules)
    head_names = meta.get("head_names") or [
        n for n, _ in top.named_parameters() if not n.startswith(base_name + ".") and not n.startswith("lm_head.")]
    task_model = TaskModel(module=top, tokenizer=shared.tokenizer, arch=shared.arch, model_path=shared.model_path,
                           pooling=pooling, num_labels=num_labels, fingerprint=shared.fingerprint,
                           head_names=head_names, quantization=shared.quantization)
    task_model.label_names = list(labels)  # methods that start from the class names (prompt init=labels)
    verbalizer = meta.get("prompt", {}).get("objective") == "verbalizer"
    if verbalizer:  # the LM head's label-word rows as the head, texts rendered through the template
        from deltatune.label_head import attach_label_head

        attach_label_head(task_model, meta["prompt"])
    shared_ids = shared.tensor_ids()
    try:
        apply_delta(task_model, meta, tensors, method, method_config, before_load=privatizer(shared_ids))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"task '{name}': cannot apply its {meta.get('method')} delta: "
                        f"{str(exc).splitlines()[0]}") from exc
    shared.module.requires_grad_(False)  # some methods (full) flag every weight they see as trainable
    top.requires_grad_(False)
    top.eval()
    missing = [n for n, p in top.named_parameters() if not n.startswith(base_name + ".")
               and id(p) not in shared_ids and n not in tensors and not verbalizer]
    if missing:
        raise UserError(f"task '{name}': delta has no tensor for the head weight '{missing[0]}'")
    stub = Precomputed(clone.config)
    view = copy.copy(top)  # shares the head's modules and hooks; only the backbone child differs
    view._modules = {**top._modules, base_name: stub}
    task = ServedTask(name=name, path=str(path), meta=meta, top=top, base_name=base_name, view=view,
                      stub=stub, group=SHARED, tokenizer=task_model.tokenizer)
    reason = unexplained(top, base_name, shared.module, method, vanilla_children)
    if reason is None and method.ROW_INPUT is not None and shared.arch.decoder_layers is not None:
        reason = "its soft tokens / prefix go into an encoder-decoder's encoder, which the mixed pass does not route"
    if reason is not None:
        task.group, task.reason = OWN, reason
        return task
    task.sites = find_sites(clone)
    if method.ROW_INPUT == "soft_tokens":
        task.soft_tokens = soft_tokens_of(top)  # (P (n, H), insert position)
    elif method.ROW_INPUT == "prefix":
        task.prefix = prefix_of(top)  # (L, 2, n, kv_dim)
    return task


def shared_lm_head(base: TaskModel) -> nn.Module | None:
    """The pretrained LM head around the shared weight (the input embeddings when tied, else the
    checkpoint's lm_head.weight, read once), or None when the model has none."""
    from deltatune.label_head import lm_head_weight

    try:
        weight = lm_head_weight(base)
    except UserError:
        return None
    if not isinstance(weight, nn.Parameter):
        emb = base.backbone.get_input_embeddings().weight
        weight = nn.Parameter(weight.to(emb.device, emb.dtype), requires_grad=False)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = weight
    return head
