"""k-nearest-neighbour classification over a vector index of the training texts (the seed's "indexing").

    training texts ──> encoder (MiniLM) ──> unit vectors ──> FAISS index, on disk, built once
    query ──> encoder ──> its k nearest training examples N_k
          ──> vote_y = Σ_{i ∈ N_k, y_i = y} w_i,   w_i = max(cos(q, x_i), 0) ("similarity") or 1 ("uniform")
          ──> p(y | q) = (vote_y + ε) / Σ_y' (vote_y' + ε)

Nothing is trained: adding labelled examples is adding vectors to the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune.data import Example
from deltatune.errors import UserError
from deltatune.notune.encoder import TextEncoder
from deltatune.notune.index import VectorIndex, example_index, example_text

WEIGHTINGS = ("similarity", "uniform")
EPS = 1e-6


class KNN:
    def __init__(self, encoder: TextEncoder, label_names: list[str], config: Any):
        if config.k < 1:
            raise UserError(f"knn needs k ≥ 1, not {config.k}")
        if config.weighting not in WEIGHTINGS:
            raise UserError(f"weighting must be similarity or uniform, not '{config.weighting}'")
        self.encoder, self.label_names, self.config = encoder, label_names, config
        self.index: VectorIndex | None = None
        self.stats: dict[str, float] = {}

    def fit(self, train: list[Example], seed: int) -> None:
        self.index = example_index(self.encoder, train, self.label_names)

    def scores(self, examples: list[Example]) -> torch.Tensor:
        """(N, K) log-probabilities: the (weighted) label votes of each input's k nearest neighbours."""
        label_index = {name: i for i, name in enumerate(self.label_names)}
        hits = self.index.query(self.encoder, [example_text(e.text, e.text_pair) for e in examples], self.config.k)
        votes = np.full((len(examples), len(self.label_names)), EPS, dtype=np.float64)
        for n, found in enumerate(hits):
            for hit in found:
                weight = max(hit.score, 0.0) if self.config.weighting == "similarity" else 1.0
                votes[n, label_index[hit.record["label"]]] += weight
        self.stats = {"neighbours": float(self.config.k)}
        return torch.from_numpy(np.log(votes / votes.sum(1, keepdims=True))).float()

    def backbone(self) -> dict[str, Any]:
        info = self.encoder.info
        return {"path": info["path"], "fingerprint": info["fingerprint"], "family": self.encoder.model.config.model_type,
                "model_type": self.encoder.model.config.model_type, "pooling": "mean"}

    def total_params(self) -> int:
        return sum(p.numel() for p in self.encoder.model.parameters())

    def save(self, folder: Path) -> dict[str, Any]:
        self.index.save(folder / "index")
        return {"index": "index", "chunks": len(self.index)}

    def restore(self, folder: Path, state: dict[str, Any]) -> None:
        self.index = VectorIndex.load(folder / state["index"])
