"""Tiny random models saved as real Hugging Face folders (hidden 32, 2 layers, vocab 99), plus toy data.

A word-level tokenizer over a fixed word list stands in for a real one, so the folders load through
the same `from_pretrained` path as a real model, offline, in well under a second.
"""

from __future__ import annotations

import contextlib
import csv
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

POSITIVE = ["good", "great", "excellent", "fine", "lovely", "superb", "brilliant", "wonderful"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dull", "boring", "weak", "horrible"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "story", "was", "is", "very", "quite", "and",
          "scene", "music", "ending", "cast", "script", "director", "with", "of", "to", "in", "it",
          "this", "that", "really", "so", "too", "not", "but", "by", "for", "on", "an", "at", "as",
          "sports", "game", "team", "match", "election", "vote", "minister", "market", "shares", "profit",
          "phone", "software", "computer", "album", "band", "show", "player", "goal", "win", "lose",
          "bank", "price", "tech", "online", "hello", "hi", "how", "are", "you", "what", "who", "yes", "no"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = SPECIALS + POSITIVE + NEGATIVE + FILLER
VOCAB_SIZE = 99


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside, restored after. Tiny models run fastest on one
    thread (and leave the other core to whoever shares the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move trainable parameters away from their start (the prefix MLP's last layer starts at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def reference_attention(q, k, v, mask, scale):
    """softmax(q kᵀ · scale + mask) v written plainly: k/v heads repeated for grouped queries; mask None,
    additive, or bool (True: attended)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    return torch.softmax(scores if mask is None else scores + mask, dim=-1) @ v


def assert_same_with_grads(ours: torch.Tensor, ref: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    """Two computations of one function: equal outputs, and equal gradients of `inputs` for one upstream."""
    torch.testing.assert_close(ours, ref)
    upstream = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(a, r)


def prompt_encoder_grads(tm, batch: dict, checkpointing: bool) -> dict:
    """Gradients of the prompt encoder after one backward, with or without non-reentrant checkpointing."""
    module = tm.module
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    module.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both runs
    module(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if n.startswith("prompt_encoder.")}
    if checkpointing:
        module.gradient_checkpointing_disable()
    return grads


def skip_if_peft_refuses_prefix(method: str) -> None:
    """Skip a prefix-tuning interop case where peft cannot build the peer: peft 0.21 (the newest) refuses
    prefix tuning on transformers >= 5.24's models ("Model does not support past key values", after
    the cache argument's rename); the dev extra pins transformers < 5.24 for these tests."""
    import pytest
    import transformers
    from packaging.version import Version

    if method.startswith("prefix") and Version(transformers.__version__) >= Version("5.24"):
        pytest.skip("peft refuses prefix tuning on transformers >= 5.24 (its past_key_values check)")


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if kind == "t5":  # T5 appends </s>; its classifier reads the </s> position
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       eos_token="</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    if kind == "bert":
        return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=5, eos_token_id=6)
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          pad_token_id=0, bos_token_id=5, eos_token_id=6)
    if kind == "t5":
        return T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        pad_token_id=0, eos_token_id=6, decoder_start_token_id=0)
    raise ValueError(kind)


def make_model_dir(root: Path, kind: str = "bert", seed: int = 0) -> str:
    """Save a tiny random `kind` model + tokenizer as a HF folder under root; return its path."""
    from transformers import AutoModel

    folder = Path(root) / f"tiny-{kind}-{seed}"
    if (folder / "config.json").exists():
        return str(folder)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(kind))
    model.save_pretrained(folder)
    _tokenizer(kind).save_pretrained(folder)
    return str(folder)


def toy_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable toy reviews: one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        filler = rng.sample(FILLER[:36], rng.randint(3, 8))
        filler.insert(rng.randint(0, len(filler)), word)
        rows.append((" ".join(filler), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)
