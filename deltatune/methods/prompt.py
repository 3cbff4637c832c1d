"""Prompt tuning (Lester, Al-Rfou & Constant 2021, arXiv:2104.08691): n trainable soft tokens.

    input ids x (B, T) ──> E(x) (B, T, H) ─┐                 E: the frozen word-embedding table
                                           ├─> [P ; E(x)] (B, n+T, H) ──> frozen transformer ──> head
    P (n, H), trainable ───────────────────┘

Only P (and the task head) trains. P starts from `random` values, `vocab` (embeddings of sampled
frequent real tokens), `labels` (the mean embedding of each class name's tokens, the paper's best,
then vocab-sampled tokens for the rest) or `text` (the embeddings of a given string, repeated).

Where the soft tokens go: the task model sees n placeholder ids spliced into `input_ids` (with the
attention mask, token types extended to match), and a hook on the word-embedding table swaps the
placeholders' embeddings for P. So every head keeps working: LlamaForSequenceClassification still
finds the last non-pad token from the (longer) ids, BERT position ids stay 0..n+T-1 (n+T must fit
max_position_embeddings). `insert_at=start` puts P before everything (peft's layout: the HF BERT
head then pools the first soft token); `insert_at=after_first` puts P after [CLS] / BOS.
Default `start`: exported deltas give peft's logits exactly, and on MiniLM / rotten-tomatoes (1000
train, 2 epochs, 500 test) the placement hardly matters: --pooling cls 0.644 (start) vs 0.666
(after_first, within noise), --pooling hf 0.578 both (MiniLM's pooler is untrained), mean 0.728.
A caller may pass `soft_prompt=(B, n, H)` (and `soft_prompt_mask=(B, n)`) to the task model's
forward: different rows can carry different prompts. P-tuning (`ptuning.py`) reuses this hook.
Encoder-decoder models (T5): the soft tokens go in front of the encoder's input only (`seq2seq.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import train_head, trainable_state
from deltatune.methods.inputs import (
    ADAPTER,
    PLACEMENTS,
    install_once,
    is_decoding,
    max_positions,
    positional_kwargs,
    shift_positions,
    splice,
)
from deltatune.options import option

if TYPE_CHECKING:
    from deltatune.methods.seq2seq import EncoderPromptHooks

NAME = "prompt"
DEFAULT_LR = 3e-2
ROW_INPUT = "soft_tokens"
"""Served per row: the engine splices each row's soft tokens in (what `prompt_hooks` do alone)."""
ROW_HOOKS = ("prompt_hooks",)
ROW_TOP_MODULES = ("prompt_encoder",)
PEFT_TYPE = "PROMPT_TUNING"
INITS = ("random", "vocab", "labels", "text")
log = logging.getLogger(__name__)


@dataclass
class Config:
    num_virtual_tokens: int = option(20, ge=1)
    """Number n of soft tokens."""
    init: str = option("labels", choices=INITS)
    """random, vocab (sampled frequent tokens), labels (class names, then vocab) or text (init_text)."""
    init_text: str | None = None
    """The string whose token embeddings start the prompt (init=text)."""
    insert_at: str = option("start", choices=PLACEMENTS)
    """start (before everything; peft's layout, exportable) or after_first (after [CLS]/BOS)."""


class SoftPrompt(nn.Module):
    """n trainable vectors; forward() -> (n, H). Named like peft's PromptEmbedding (`embedding.weight`)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding(init.shape[0], init.shape[1], device=init.device)
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, H)


# ---- initialisation -------------------------------------------------------------------------------------

def word_embeddings(task_model: TaskModel) -> nn.Embedding:
    return task_model.backbone.get_submodule(task_model.arch.word_embeddings)


def frequent_token_ids(tokenizer, limit: int = 5000, scan: int = 30000) -> list[int]:
    """Ids of real word tokens, most frequent first (low ids: WordPiece and BPE vocabularies are
    roughly frequency ordered). Skips specials, [unusedN], '##' pieces and one-letter tokens; when the
    vocabulary marks word starts (GPT-2 'Ġ', SentencePiece '▁'), only word-start tokens count."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), scan))))
    special = set(tokenizer.all_special_ids)
    marked = any(t.startswith(("Ġ", "▁")) for t in tokens)
    ids = []
    for i, tok in enumerate(tokens):
        word = tok[1:] if tok.startswith(("Ġ", "▁")) else tok
        if i in special or (marked and word == tok) or not word.isalpha() or len(word) < 2:
            continue
        ids.append(i)
        if len(ids) == limit:
            break
    if not ids:
        raise UserError("the tokenizer has no word tokens to initialise soft tokens from")
    return ids


def sampled_vocab_ids(tokenizer, count: int) -> list[int]:
    """`count` ids sampled (torch's seeded RNG) without replacement from the frequent word tokens."""
    pool = frequent_token_ids(tokenizer)
    order = torch.randperm(len(pool)).tolist()
    return [pool[order[i % len(pool)]] for i in range(count)]


def text_ids(tokenizer, text: str | None, count: int) -> list[int]:
    """The ids of `text` (no special tokens), repeated and cut to `count`."""
    if not text:
        raise UserError("init=text needs --set init_text='...'")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"init_text '{text}' has no tokens")
    return (ids * (count // len(ids) + 1))[:count]


def initial_prompt(task_model: TaskModel, config: Config) -> torch.Tensor:
    """(n, H) float32 starting values of the soft prompt."""
    if config.init not in INITS:
        raise UserError(f"unknown init '{config.init}': choose one of {', '.join(INITS)}")
    n, tokenizer = config.num_virtual_tokens, task_model.tokenizer
    table = word_embeddings(task_model).weight.detach().float()  # (V, H)
    if config.init == "random":  # uniform with the table's std (the paper: U[-0.5, 0.5] on T5)
        bound = table.std().item() * 3**0.5
        return torch.empty(n, table.shape[1], device=table.device).uniform_(-bound, bound)
    if config.init == "text":
        return table[text_ids(tokenizer, config.init_text, n)].clone()
    rows = []
    if config.init == "labels":
        names = getattr(task_model, "label_names", None) or []  # set by the training workflow
        if not names and task_model.pooling != "lm":  # a generation task has no class names: vocab, quietly
            log.warning("init=labels: the class names are unknown here, using vocab-sampled tokens")
        for name in names[:n]:
            ids = tokenizer(name, add_special_tokens=False)["input_ids"] or sampled_vocab_ids(tokenizer, 1)
            rows.append(table[ids].mean(0))  # (H,): a multi-token class name gives the mean of its tokens
    rows += list(table[sampled_vocab_ids(tokenizer, n - len(rows))]) if n > len(rows) else []
    return torch.stack(rows).clone()  # (n, H)


# ---- the forward hook that splices soft tokens into the input --------------------------------------------

def splice_soft_tokens(embeds: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                       soft: list[tuple[torch.Tensor, int] | None], pad: str = "right"):
    """Each row as it would enter the backbone alone, [x_<at ; P_b ; x_≥at], padded to the longest.

    embeds (B, T, H), mask (B, T) (rows right- or left-padded), types (B, T) or None, soft[b] = (P (n_b, H),
    at) or None -> (B, W, H), (B, W), types (B, W) | None, each row's tokens at the `pad` side's other end.
    Used by the serve engine's mixed pass (right) and by the decode loop's prefill."""
    lengths = mask.sum(1).tolist()
    sizes = [s[0].shape[0] if s is not None else 0 for s in soft]
    width = max(t + n for t, n in zip(lengths, sizes))
    out = embeds.new_zeros(embeds.shape[0], width, embeds.shape[2])  # (B, W, H)
    out_mask = mask.new_zeros(mask.shape[0], width)
    out_types = types.new_zeros(types.shape[0], width) if types is not None else None
    for b, (t, n, s) in enumerate(zip(lengths, sizes, soft)):
        real = mask[b].nonzero().flatten()  # (t,): the row's token positions, whichever side pads
        x = embeds[b, real]  # (t, H)
        at = min(s[1], t) if s is not None else t
        row = x if s is None else torch.cat([x[:at], s[0].to(x.dtype), x[at:]])  # (t + n, H)
        start = 0 if pad == "right" else width - t - n
        out[b, start:start + t + n] = row
        out_mask[b, start:start + t + n] = 1
        if out_types is not None:
            ty = types[b, real]
            fill = ty[at:at + 1].expand(n) if n and 0 < at < t else ty.new_zeros(n)  # soft tokens: the type they follow
            out_types[b, start:start + t + n] = torch.cat([ty[:at], fill, ty[at:]])
    return out, out_mask, out_types


def soft_tokens_of(module: nn.Module) -> tuple[torch.Tensor, int] | None:
    """A prompt / P-tuning model's soft tokens as served: (P (n, H) detached, insert position), or None."""
    hooks = getattr(module, "prompt_hooks", None)
    if hooks is None or not isinstance(getattr(module, "prompt_encoder", None), nn.ModuleDict):
        return None
    with torch.no_grad():
        return module.prompt_encoder[ADAPTER]().detach(), hooks.at


class PromptHooks:
    """Installed once per task model: each forward gets soft tokens from `module.prompt_encoder`
    (or from a per-call `soft_prompt`), spliced in at a fixed position.

    Also for language models (pooling=lm): token labels get -100 at the soft slots, the logits of the
    slots are cut out again, and `generate` works (its later steps find the slots in the cache)."""

    def __init__(self, task_model: TaskModel, insert_at: str):
        if insert_at not in PLACEMENTS:
            raise UserError(f"unknown insert_at '{insert_at}': choose one of {', '.join(PLACEMENTS)}")
        self.module = task_model.module
        self.at = PLACEMENTS.index(insert_at)  # 0: before everything, 1: after the first token
        pad = task_model.tokenizer.pad_token_id
        self.placeholder = 1 if pad == 0 else 0  # any real id but pad: decoder heads skip pad ids
        self.max_positions = max_positions(self.module.config)
        self.token_labels = not self.module.config.is_encoder_decoder  # seq2seq labels are the decoder's
        self.pending: tuple[torch.Tensor, int] | None = None  # consumed by the next embedding lookup
        self.cut: tuple[int, int, int] | None = None  # (at, n, T): logits of the slots to remove
        self.handles = [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, always_call=True),
            word_embeddings(task_model).register_forward_hook(self.swap),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def before(self, _module, args, kwargs):
        kwargs = positional_kwargs(args, kwargs)
        prompts, prompt_mask = kwargs.pop("soft_prompt", None), kwargs.pop("soft_prompt_mask", None)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:  # nothing to prepend to (a seq2seq step on cached encoder outputs)
            return (), kwargs
        first = ids if ids is not None else embeds
        b, t = first.shape[:2]
        if prompts is None:
            prompts = self.module.prompt_encoder[ADAPTER]().unsqueeze(0).expand(b, -1, -1)  # (B, n, H)
        n, decoding = prompts.shape[1], is_decoding(kwargs, t)
        mask = kwargs.get("attention_mask")
        if mask is not None or not decoding:  # the slots count as attended
            mask = torch.ones(b, t, dtype=torch.long, device=first.device) if mask is None else mask
            prompt_mask = mask.new_ones(b, n) if prompt_mask is None else prompt_mask.to(mask.dtype)
            kwargs["attention_mask"] = splice(mask, prompt_mask, min(self.at, mask.shape[1]))  # (B, n+T)
        at = min(self.at, t)
        kwargs["position_ids"] = shift_positions(kwargs.get("position_ids"), n, None if decoding else at)
        if decoding:
            return (), kwargs
        if self.max_positions is not None and n + t > self.max_positions:
            raise UserError(f"{n} soft tokens + {t} input tokens exceed the model's {self.max_positions} "
                            "positions: lower --max-length or num_virtual_tokens")
        if ids is not None:  # placeholders now, their embeddings are swapped for the prompt in `swap`
            kwargs["input_ids"] = splice(ids, ids.new_full((b, n), self.placeholder), at)  # (B, n+T)
            self.pending = (prompts, at)
        else:
            kwargs["inputs_embeds"] = splice(embeds, prompts.to(embeds.dtype), at)  # (B, n+T, H)
        for name, fill in (("token_type_ids", 0), ("labels", -100)):  # slots: first segment, not scored
            value = kwargs.get(name)
            if value is not None and value.dim() == 2 and value.shape[1] == t and (name != "labels" or
                                                                                  self.token_labels):
                kwargs[name] = splice(value, value.new_full((b, n), fill), at)
        self.cut = (at, n, t)
        return (), kwargs

    def swap(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        if self.pending is None:
            return None
        (prompts, at), self.pending = self.pending, None
        # output (B, n+T, H) holds the placeholders' embeddings at at..at+n: put the prompt there instead
        return torch.cat([output[:, :at], prompts.to(output.dtype), output[:, at + prompts.shape[1]:]], dim=1)

    def after(self, _module, _args, output) -> None:
        self.pending, cut, self.cut = None, self.cut, None
        logits = getattr(output, "logits", None)
        if cut is not None and self.token_labels and torch.is_tensor(logits) and logits.dim() == 3 \
                and logits.shape[1] == cut[1] + cut[2]:  # per-token logits (LM): one per input token again
            at, n, _ = cut
            output.logits = torch.cat([logits[:, :at], logits[:, at + n:]], dim=1)  # (B, T, V)


def install_hooks(task_model: TaskModel, insert_at: str) -> PromptHooks | EncoderPromptHooks:
    """Hook the task model once (an encoder-decoder: its encoder, `seq2seq.py`); soft-token methods are
    never skipped by the frozen-prefix cache."""
    if task_model.arch.decoder_layers is not None:
        from deltatune.methods.seq2seq import EncoderPromptHooks

        return install_once(task_model, "prompt_hooks", lambda: EncoderPromptHooks(task_model, insert_at))
    return install_once(task_model, "prompt_hooks", lambda: PromptHooks(task_model, insert_at))


def set_encoder(task_model: TaskModel, encoder: nn.Module) -> None:
    """Attach the module that produces the prompt as `prompt_encoder["default"]` (peft's name); only it
    and the head train."""
    module = task_model.module
    if not isinstance(getattr(module, "prompt_encoder", None), nn.ModuleDict):
        module.prompt_encoder = nn.ModuleDict()
    module.prompt_encoder[ADAPTER] = encoder.to(task_model.device())
    encoder.requires_grad_(True)


def apply(task_model: TaskModel, config: Config) -> None:
    if config.num_virtual_tokens < 1:
        raise UserError("num_virtual_tokens must be at least 1")
    set_encoder(task_model, SoftPrompt(initial_prompt(task_model, config)))
    install_hooks(task_model, config.insert_at)
    train_head(task_model)


# ---- folded deltas and peft ------------------------------------------------------------------------------

def load_state(task_model: TaskModel, tensors: dict[str, torch.Tensor], method: str) -> None:
    """Load a delta's tensors into the (folded) method modules; names and shapes must match."""
    own = task_model.module.state_dict()
    for name, tensor in tensors.items():
        if name not in own:
            raise UserError(f"delta tensor '{name}' does not exist in the {method} model")
        if own[name].shape != tensor.shape:
            raise UserError(f"delta tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(own[name].shape)}")
    missing = {n for n, p in task_model.module.named_parameters() if p.requires_grad} - set(tensors)
    if missing:
        raise UserError(f"delta is missing {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    task_model.module.load_state_dict(tensors, strict=False)


ENCODER_KEY = f"prompt_encoder.{ADAPTER}.embedding.weight"


def own_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything but the method's own modules (the head), under deltatune's names."""
    return {k: v for k, v in tensors.items() if not k.startswith("prompt_encoder.")}


def folded_state(task_model: TaskModel, key: str) -> dict[str, torch.Tensor]:
    """The head and the prompt encoder's output under `key` (the folded form: the encoder is not saved),
    computed in eval mode (no dropout)."""
    encoder = task_model.module.prompt_encoder[ADAPTER]
    state = own_tensors(trainable_state(task_model.module))
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        state[key] = encoder().detach().float().cpu().contiguous()
    encoder.train(was_training)
    return state


def load_folded(task_model: TaskModel, tensors: dict[str, torch.Tensor], key: str, method: str,
                folded: Callable[[torch.Tensor], nn.Module]) -> None:
    """Replace the encoder by `folded` (a module that returns its tensor, zeros here) and load the folded
    tensor `key` into it (and the head)."""
    if key not in tensors:
        raise UserError(f"{method} delta has no '{key}' tensor")
    set_encoder(task_model, folded(torch.zeros_like(tensors[key], device=task_model.device())))
    load_state(task_model, tensors, method)


def soft_tokens_to_peft(tensors: dict[str, torch.Tensor], insert_at: str) -> tuple[dict, dict]:
    """Common part of prompt and p-tuning export: (n, H) soft tokens as `prompt_embeddings`."""
    if insert_at != "start":
        raise UserError("peft puts soft tokens before everything: only insert_at=start deltas export")
    prompt = tensors[ENCODER_KEY]  # (n, H)
    fields = {"num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
              "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None}
    return fields, {"prompt_embeddings": prompt, **own_tensors(tensors)}


def soft_tokens_from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    if "prompt_embeddings" not in tensors:
        raise UserError(f"{adapter_config.get('peft_type')} adapter has no 'prompt_embeddings' tensor")
    prompt = tensors["prompt_embeddings"]  # (n * submodules, H)
    submodules = adapter_config.get("num_transformer_submodules")
    if submodules == 2 and adapter_config.get("task_type") == "SEQ_2_SEQ_LM":  # peft's seq2seq default: only
        prompt = prompt[:adapter_config.get("num_virtual_tokens") or prompt.shape[0] // 2]  # the first n are used
    elif submodules not in (None, 1):
        raise UserError("only peft prompt adapters with one transformer submodule can be imported")
    options = {"num_virtual_tokens": prompt.shape[0], "insert_at": "start"}
    return options, {ENCODER_KEY: prompt}


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors) of a prompt-tuning delta."""
    fields, peft_tensors = soft_tokens_to_peft(tensors, config.insert_at)
    fields["prompt_tuning_init"] = {"vocab": "SAMPLE_VOCAB", "labels": "SAMPLE_VOCAB"}.get(config.init, "RANDOM")
    return fields, peft_tensors


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(prompt options, deltatune tensors) of a peft PROMPT_TUNING adapter."""
    options, own = soft_tokens_from_peft(adapter_config, tensors)
    options["init"] = "vocab" if adapter_config.get("prompt_tuning_init") == "SAMPLE_VOCAB" else "random"
    return options, own
