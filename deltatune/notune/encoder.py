"""Sentence embeddings for retrieval: a frozen encoder, masked mean pooling, unit length.

    text ──> tokens (≤ max_length) ──> encoder (MiniLM by default) ──> hidden (B, T, H)
         ──> mean over the attended tokens ──> e / ||e||        (cosine similarity = inner product)

This is how all-MiniLM-L6-v2 was trained (sentence-transformers: mean pooling, normalised). An index
records the encoder's identity (`info`): path, weight fingerprint, dimension, pooling, so a query is
never embedded by another model than the index's chunks.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from deltatune.backbone import fingerprint_module, load_tokenizer, resolve_model_path
from deltatune.errors import UserError


class TextEncoder:
    def __init__(self, model: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                 max_length: int = 256):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_path = resolve_model_path(model or "minilm")
        try:
            self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load encoder {self.model_path}: {str(exc).splitlines()[0]}") from exc
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(device)
        self.tokenizer = load_tokenizer(self.model_path)
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.fingerprint = fingerprint_module(self.model)
        self.dim = int(self.model.config.hidden_size)

    @property
    def info(self) -> dict:
        return {"path": self.model_path, "fingerprint": self.fingerprint, "dim": self.dim, "pooling": "mean",
                "max_length": self.max_length}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32 unit vectors, in the order of `texts` (batches sorted by length inside)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def check_same_encoder(expected: dict, encoder: TextEncoder, where: str) -> None:
    """A UserError when `encoder` is not the one whose identity `expected` recorded."""
    if expected.get("fingerprint") != encoder.fingerprint or int(expected.get("dim", -1)) != encoder.dim:
        raise UserError(f"{where} was built with encoder {expected.get('path')} (fingerprint "
                        f"{expected.get('fingerprint')}, dim {expected.get('dim')}), not {encoder.model_path} "
                        f"(fingerprint {encoder.fingerprint}, dim {encoder.dim}): rebuild it or use that encoder")
