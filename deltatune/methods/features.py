"""The feature-based approach: frozen embeddings, then a logistic regression (Peters et al. 2018).

    z = pool(Backbone_frozen(x))                  computed once per example
    p(y | x) = softmax(W z + b)                   W, b fitted by scikit-learn's LogisticRegression

No gradient ever reaches the backbone. The fitted W, b are stored as the linear head of a
PooledClassifier, so a features delta loads, evaluates and serves like any other delta.
The regularisation strength C is chosen on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deltatune.backbone import ArchSpec, TaskModel
from deltatune.options import option

NAME = "features"
DEFAULT_LR = 0.0


@dataclass
class Config:
    c_grid: tuple[float, ...] = option((0.01, 0.1, 1.0, 10.0), gt=0)
    """Inverse regularisation strengths tried; the best on validation is kept."""
    max_iter: int = option(2000, ge=1)
    """Iteration limit of the LBFGS solver."""


def pooling_for(requested: str, arch: ArchSpec) -> str:
    """Features need an explicit pooling: transformers' head becomes cls (encoders) or last (decoders)."""
    if requested != "hf":
        return requested
    return "last" if arch.is_decoder else "cls"


def apply(task_model: TaskModel, config: Config) -> None:
    task_model.module.classifier.requires_grad_(True)  # the head is what gets fitted


def fit(task_model: TaskModel, config: Config, train_features, validation_features) -> dict[str, float]:
    """Fit the logistic regression on (features, labels) pairs; write it into the linear head."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = train_features
    x_val, y_val = validation_features
    best = None
    for c in config.c_grid:
        clf = LogisticRegression(C=c, max_iter=config.max_iter)
        clf.fit(x_train, y_train)
        score = float((clf.predict(x_val) == y_val).mean()) if len(y_val) else 0.0
        if best is None or score > best[0]:
            best = (score, c, clf)
    score, c, clf = best
    head = task_model.module.classifier
    weight = np.zeros((head.out_features, head.in_features), dtype=np.float32)
    bias = np.zeros(head.out_features, dtype=np.float32)
    classes = clf.classes_
    if len(classes) == 2 and clf.coef_.shape[0] == 1:  # binary: softmax([-z/2, z/2]) = sigmoid(z)
        weight[classes[0]], weight[classes[1]] = -clf.coef_[0] / 2, clf.coef_[0] / 2
        bias[classes[0]], bias[classes[1]] = -clf.intercept_[0] / 2, clf.intercept_[0] / 2
    else:
        weight[classes] = clf.coef_
        bias[classes] = clf.intercept_
        bias[np.setdiff1d(np.arange(head.out_features), classes)] = -1e4  # a class never seen
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return {"validation_accuracy": score, "C": c}
