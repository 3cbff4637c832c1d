"""Label + probabilities for raw texts with a loaded delta."""

from __future__ import annotations

from deltatune.batching import encode
from deltatune.data import Example
from deltatune.delta import LoadedDelta
from deltatune.evaluate import predict_logits


def predict_texts(loaded: LoadedDelta, texts: list[str], batch_size: int = 64) -> list[dict]:
    """One {text, label, probabilities} dict per text, probabilities in the delta's label order."""
    labels = loaded.meta["task"]["label_names"]
    max_length = loaded.meta.get("train_config", {}).get("max_length", 128)
    rows = encode(loaded.task_model.tokenizer, [Example(text=t) for t in texts], max_length, "predict")
    probs = predict_logits(loaded.task_model, rows, batch_size).softmax(-1)
    return [{"text": text, "label": labels[int(p.argmax())],
             "probabilities": {name: float(p[i]) for i, name in enumerate(labels)}}
            for text, p in zip(texts, probs)]
