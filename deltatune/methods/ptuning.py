"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): virtual tokens from a prompt encoder.

    e (n, H) trainable ──> encoder ──> h (n, H) ──┐
                                                  ├─> [h ; E(x)] ──> frozen transformer ──> head
    input ids x ──> E(x) (B, T, H) ───────────────┘

    encoder=mlp:   h_i = W3 relu(W2 relu(W1 e_i))            each virtual token on its own (peft's default)
    encoder=lstm:  h = MLP(BiLSTM(e))                         the paper's: tokens depend on each other

The encoder trains with the head; the virtual tokens go into the input exactly as in prompt tuning
(`prompt.py`: same placement options, same per-call `soft_prompt`). Saved: h itself (n, H), the
encoder folded away, so a loaded P-tuning delta is a plain soft prompt (peft's inference form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backbone import TaskModel
from deltatune.errors import UserError
from deltatune.methods.base import train_head
from deltatune.methods.prompt import (
    ENCODER_KEY,
    PLACEMENTS,
    SoftPrompt,
    folded_state,
    install_hooks,
    load_folded,
    sampled_vocab_ids,
    set_encoder,
    soft_tokens_from_peft,
    soft_tokens_to_peft,
    word_embeddings,
)
from deltatune.options import option

NAME = "ptuning"
DEFAULT_LR = 1e-2  # rotten-tomatoes, 1000 examples, 2 epochs, mean pooling: 0.686 (1e-3: 0.584)
ROW_INPUT, ROW_HOOKS, ROW_TOP_MODULES = "soft_tokens", ("prompt_hooks",), ("prompt_encoder",)  # as prompt tuning
PEFT_TYPE = "P_TUNING"
ENCODERS = ("mlp", "lstm")


@dataclass
class Config:
    num_virtual_tokens: int = option(20, ge=1)
    """Number n of virtual tokens."""
    encoder: str = option("mlp", choices=ENCODERS)
    """Prompt encoder: mlp (3 linear layers) or lstm (bidirectional LSTM, then a 2-layer MLP)."""
    encoder_hidden_size: int = option(0, ge=0)
    """Hidden width of the encoder (0: the model's hidden size)."""
    encoder_num_layers: int = option(2, ge=1)
    """LSTM layers (encoder=lstm)."""
    encoder_dropout: float = option(0.0, ge=0, lt=1)
    """Dropout between LSTM layers (encoder=lstm)."""
    insert_at: str = option("start", choices=PLACEMENTS)
    """start (before everything; peft's layout, exportable) or after_first (after [CLS]/BOS)."""


class PromptEncoder(nn.Module):
    """e (n, H) -> h (n, H). Named like peft's PromptEncoder (`embedding`, `mlp_head`, `lstm_head`)."""

    def __init__(self, start: torch.Tensor, config: Config):
        super().__init__()
        n, width = start.shape
        hidden = config.encoder_hidden_size or width
        self.embedding = nn.Embedding(n, width)
        with torch.no_grad():
            self.embedding.weight.copy_(start)  # real tokens' embeddings as the encoder's inputs
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=config.encoder_num_layers, bidirectional=True,
                                     batch_first=True, dropout=config.encoder_dropout)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight  # (n, H)
        if self.lstm_head is not None:
            e = self.lstm_head(e.unsqueeze(0))[0][0]  # (1, n, H) -> (n, 2*hidden)
        return self.mlp_head(e)  # (n, H)


def apply(task_model: TaskModel, config: Config) -> None:
    if config.encoder not in ENCODERS:
        raise UserError(f"unknown encoder '{config.encoder}': choose one of {', '.join(ENCODERS)}")
    if config.num_virtual_tokens < 1 or config.encoder_hidden_size < 0 or config.encoder_num_layers < 1:
        raise UserError("num_virtual_tokens and encoder_num_layers must be at least 1, "
                        "encoder_hidden_size at least 0")
    ids = sampled_vocab_ids(task_model.tokenizer, config.num_virtual_tokens)
    start = word_embeddings(task_model).weight[ids].detach().float()  # (n, H)
    set_encoder(task_model, PromptEncoder(start, config))
    install_hooks(task_model, config.insert_at)
    train_head(task_model)


def delta_state(task_model: TaskModel, config: Config) -> dict[str, torch.Tensor]:
    """The head and the encoder's output h (n, H) under the soft prompt's name; the encoder is not saved."""
    return folded_state(task_model, ENCODER_KEY)  # eval mode: no dropout in the folded tokens


def load_delta_state(task_model: TaskModel, config: Config, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the encoder by the folded virtual tokens and load them (and the head)."""
    load_folded(task_model, tensors, ENCODER_KEY, NAME, SoftPrompt)


def to_peft(config: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config fields, peft tensors): the folded tokens as `prompt_embeddings` (peft's inference form)."""
    fields, peft_tensors = soft_tokens_to_peft(tensors, config.insert_at)
    fields.update(encoder_reparameterization_type=config.encoder.upper(),
                  encoder_hidden_size=config.encoder_hidden_size or fields["token_dim"],
                  encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout)
    return fields, peft_tensors


def from_peft(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ptuning options, deltatune tensors) of a peft P_TUNING adapter (its folded virtual tokens)."""
    options, own = soft_tokens_from_peft(adapter_config, tensors)
    options.update(encoder=str(adapter_config.get("encoder_reparameterization_type") or "MLP").lower(),
                   encoder_hidden_size=adapter_config.get("encoder_hidden_size") or 0,
                   encoder_num_layers=adapter_config.get("encoder_num_layers") or 2,
                   encoder_dropout=adapter_config.get("encoder_dropout") or 0.0)
    return options, own
