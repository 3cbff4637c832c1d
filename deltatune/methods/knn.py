"""knn: the seed's "indexing" — label an input by its k nearest training examples; nothing is trained.

    training texts ──> encoder (all-MiniLM-L6-v2) ──> FAISS index, saved in DELTA/index/ (built once)
    input ──> encoder ──> k nearest ──> p(y) ∝ Σ_{neighbours with label y} max(cos, 0)

`--model` (or the `encoder` option) picks the encoder. The code lives in deltatune/notune/knn.py and
deltatune/notune/index.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from deltatune.backbone import TaskModel
from deltatune.options import option

NAME = "knn"
DEFAULT_LR = 0.0


@dataclass
class Config:
    k: int = option(10, ge=1)
    """Neighbours that vote."""
    weighting: str = option("similarity", choices=("similarity", "uniform"))
    """similarity (votes weighted by cosine similarity) or uniform."""
    encoder: str | None = None
    """Encoder folder or alias; None: --model, else all-MiniLM-L6-v2."""


def apply(task_model: TaskModel, config: Config) -> None:
    """Nothing to add: knn has no parameters; it predicts through its strategy (`run_job`), not this model."""


def run_job(job, config: Config, out) -> dict:
    """The workflow hook of no-tuning methods: build the index, test, save (deltatune/notune/job.py)."""
    from deltatune.notune.job import run_strategy_job

    return run_strategy_job(job, sys.modules[__name__], config, out)


def make_strategy(config: Config, context):
    from deltatune.notune.encoder import TextEncoder
    from deltatune.notune.knn import KNN

    encoder = TextEncoder(config.encoder or context.model, device=context.device,
                          batch_size=context.train.eval_batch_size)
    return KNN(encoder, context.label_names, config)
