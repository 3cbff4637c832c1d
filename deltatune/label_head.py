"""`--objective verbalizer`: prompt-based fine-tuning (PET, Schick & Schütze 2021; LM-BFF, Gao et al. 2021).

The input goes through the template and the LM head scores the label words; no classification head
is added. Only the method's delta (LoRA, prompt tuning, ...) trains:

    "Review: {text}\\nSentiment:" ──> decoder + delta ──> h = hidden state of the last token   (H,)
    logit_y = w_{v(y)} · h            w_v: the LM head's row of label word v(y)'s first token
    loss    = cross-entropy over the K label words (a softmax over the words, not the vocabulary)

Done with the existing parts: a `last`-pooled PooledClassifier whose Linear(H, K) is set to the K
label-word rows of the LM head (bias 0) and frozen, and a tokenizer wrapper that renders every text
through the template (so train, eval, predict and serve all see the prompt). The rows are rebuilt
from the backbone when a delta loads (delta.json "prompt"), so the delta holds only the method's tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune.backbone import TaskModel
from deltatune.data.templates import PromptSpec, Template, label_token_ids, prompt_spec
from deltatune.errors import UserError


class TemplateTokenizer:
    """A tokenizer that renders each text through the template's query before tokenizing it.

    Truncation cuts the input text, never the template, so every prompt ends with the cue ("Sentiment:").
    Everything else (pad_token_id, decode, ...) is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer, template: Template):
        self.tokenizer = tokenizer
        self.template = template
        empty = template.query("", "" if template.has_pair else None)
        self.overhead = len(tokenizer(empty)["input_ids"])

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:  # dunder methods are not found through __getattr__
        return len(self.tokenizer)

    def _cut(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max(0, max_tokens)])

    def __call__(self, texts, text_pairs=None, truncation: bool = False, max_length: int | None = None, **kwargs):
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        pairs = [text_pairs] if single and text_pairs is not None else (list(text_pairs) if text_pairs else None)
        pairs = pairs or [None] * len(texts)
        if truncation and max_length:
            room = max(1, (max_length - self.overhead) // (2 if self.template.has_pair else 1))
            texts = [self._cut(t, room) for t in texts]
            pairs = [self._cut(p, room) if p is not None else None for p in pairs]
        prompts = [self.template.query(t, p) for t, p in zip(texts, pairs)]
        return self.tokenizer(prompts[0] if single else prompts, **kwargs)


def objective_pooling(pooling: str, method: Any) -> str:
    """The pooling the verbalizer objective needs (`last`: the token before the label word)."""
    if not method.trains_by_gradient:
        raise UserError(f"--objective verbalizer needs a gradient-trained method, not '{method.NAME}'")
    if pooling not in ("hf", "last"):
        raise UserError(f"--objective verbalizer reads the last token; --pooling {pooling} does not apply")
    return "last"


def verbalizer_spec(task, template: str | None, verbalizer: str | None) -> dict[str, Any]:
    """The template and label words of a task (its built-in ones unless given), as stored in delta.json."""
    pair = any(e.text_pair is not None for e in task.train)
    return prompt_spec(task.name, task.label_names, "", template, verbalizer, pair).to_dict()


def lm_head_weight(task_model: TaskModel) -> torch.Tensor:
    """The (V, H) LM head: the input embeddings when tied, else `lm_head.weight` read from the checkpoint."""
    config = task_model.module.config
    if getattr(config, "tie_word_embeddings", False):
        return task_model.backbone.get_input_embeddings().weight
    from safetensors import safe_open

    for file in sorted(Path(task_model.model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith("lm_head.weight")), None)
            if key is not None:
                return f.get_tensor(key)
    raise UserError(f"{task_model.model_path} has no LM head (no tied embeddings, no lm_head.weight): "
                    "--objective verbalizer needs one")


def attach_label_head(task_model: TaskModel, prompt: dict[str, Any]) -> dict[str, Any]:
    """Turn a `last`-pooled classifier into the LM head at the label words; returns delta.json's "prompt"."""
    if not task_model.arch.is_decoder or task_model.pooling != "last":
        raise UserError("--objective verbalizer needs a decoder (llama, gpt2, ...) read at its last token")
    names = list(prompt["verbalizer"])  # in the task's label order
    spec = PromptSpec.from_dict(prompt, names)
    tokens = label_token_ids(task_model.tokenizer, spec.template, spec.words, names)
    first = [t[0] for t in tokens]
    if len(set(first)) < len(first):
        raise UserError("--objective verbalizer scores each label word's first token, and two label words "
                        f"start with the same token ({', '.join(spec.words)}): choose other words")
    head = task_model.module.classifier
    rows = lm_head_weight(task_model)[first]  # (K, H)
    with torch.no_grad():
        head.weight.copy_(rows.to(head.weight.dtype))
        head.bias.zero_()
    head.requires_grad_(False)
    task_model.head_names = []  # the LM head is frozen: no new head trains
    task_model.tokenizer = TemplateTokenizer(task_model.tokenizer, spec.template)
    return {"objective": "verbalizer", **spec.to_dict(), "label_token_ids": first}
