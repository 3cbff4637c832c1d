"""`export --format merged OUT`: a plain transformers model folder with the delta folded into its weights.

    delta ──load_delta──> backbone + method modules ──method.merge──> plain transformers model
          ──save_pretrained──> OUT/config.json, model.safetensors, tokenizer (with its chat template)

Each method's `merge` hook (methods/base.py) owns its math (LoRA: W0 + s·BA, IA³: rows or columns of W0
times l, ...); methods that train the backbone's own tensors (full, BitFit, head) have nothing to fold.
`AutoModelForCausalLM.from_pretrained(OUT)` (or the sequence-classification / seq2seq class) then gives
the delta's logits. Refused, with one line: methods whose delta runs beside the weights (soft prompts,
prefixes, adapters), classifiers on deltatune's own pooled head or verbalizer objective (transformers
has no class for them), and quantised backbones (their weights are packed).
"""

from __future__ import annotations

from pathlib import Path

from deltatune.delta import read_meta
from deltatune.errors import UserError
from deltatune.io import atomic_directory
from deltatune.methods import resolve_method

MERGEABLE_POOLINGS = ("hf", "lm")


def check_mergeable(delta: str | Path, meta: dict):
    """(method, config) of a delta that can be merged; else a UserError naming why and suggesting peft."""
    name = meta["method"]
    method, config = resolve_method(name, meta.get("method_config", {}))
    if method.merge is None:
        raise UserError(f"{delta}: method '{name}' cannot be merged into the weights (its delta runs beside "
                        "the frozen model); export it with --format peft")
    pooling = meta["backbone"].get("pooling")
    if pooling not in MERGEABLE_POOLINGS:
        raise UserError(f"{delta}: a classifier on deltatune's own pooled head (--pooling {pooling}) has no "
                        "transformers class to load it; train with --pooling hf to export it merged")
    if meta.get("prompt", {}).get("objective") == "verbalizer":
        raise UserError(f"{delta}: a verbalizer classifier (label words scored by the LM head) has no "
                        "transformers class to load it; export it with --format peft")
    if (meta["backbone"].get("quantization") or {}).get("kind"):
        raise UserError(f"{delta}: the backbone is stored quantised ({meta['backbone']['quantization']['kind']}); "
                        "a merged export needs full-precision weights: export it with --format peft")
    return method, config


def export_merged(delta: str | Path, out: str | Path) -> Path:
    """Write OUT: config, safetensors weights and tokenizer of the backbone with the delta merged in."""
    from deltatune.loading import load_delta

    meta = read_meta(delta)
    method, config = check_mergeable(delta, meta)
    task_model = load_delta(delta, device="cpu").task_model
    method.merge(task_model, config)
    module = task_model.module
    left = sorted({type(m).__name__ for m in module.modules() if type(m).__module__.startswith("deltatune")})
    if left:  # a merge hook that left its modules in: the folder would not load in transformers
        raise RuntimeError(f"{meta['method']}.merge left deltatune modules in the model: {', '.join(left)}")
    labels = meta.get("task", {}).get("label_names") or []
    if meta["backbone"]["pooling"] == "hf" and labels:
        module.config.id2label = dict(enumerate(labels))
        module.config.label2id = {name: i for i, name in enumerate(labels)}
    module.requires_grad_(False)
    with atomic_directory(out, "merged") as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        task_model.tokenizer.save_pretrained(tmp)
    return Path(out)
