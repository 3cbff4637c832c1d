"""Label + probabilities for raw texts with a loaded delta."""

from __future__ import annotations

from collections.abc import Sequence

from deltatune.batching import encode
from deltatune.data import Example
from deltatune.delta import LoadedDelta
from deltatune.errors import UserError
from deltatune.evaluate import predict_logits


def check_texts(texts: Sequence[str], what: str = "text", first: int = 1) -> None:
    """Refuse an empty or blank text (the CLI's arguments and lines, the server's items): one rule for both."""
    for i, text in enumerate(texts, start=first):
        if not text.strip():
            raise UserError(f"{what} {i} is empty: there is nothing to predict from")


def predict_texts(loaded: LoadedDelta, texts: list[str], batch_size: int = 64) -> list[dict]:
    """One {text, label, probabilities} dict per text, probabilities in the delta's label order."""
    labels = loaded.meta["task"]["label_names"]
    max_length = loaded.meta.get("train_config", {}).get("max_length", 128)
    rows = encode(loaded.task_model.tokenizer, [Example(text=t) for t in texts], max_length, "predict")
    probs = predict_logits(loaded.task_model, rows, batch_size).softmax(-1)
    return [{"text": text, "label": labels[int(p.argmax())],
             "probabilities": {name: float(p[i]) for i, name in enumerate(labels)}}
            for text, p in zip(texts, probs)]
