"""A persistent vector index of text chunks: FAISS, exact inner product on unit vectors (= cosine).

    IDX/
      index.faiss    faiss.write_index of IndexIDMap2(IndexFlatIP(dim)); FAISS ids are chunk ids
      chunks.jsonl   one record per chunk: {"id", "doc", "chunk", "text", ...} (knn: "label")
      index.json     format, encoder identity (path, fingerprint, dim), chunking, documents {id: sha256}

Built once, read many times; `add_documents` is incremental (unchanged documents are skipped, a
changed one has its chunks replaced). Saving writes a temporary sibling folder renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltatune.errors import UserError
from deltatune.io import atomic_directory, write_json_atomic, write_text_atomic
from deltatune.notune.chunking import Document, chunk_text
from deltatune.notune.encoder import TextEncoder, check_same_encoder

FORMAT = "deltatune.index"
VERSION = 1
FAISS_FILE, CHUNKS_FILE, META_FILE = "index.faiss", "chunks.jsonl", "index.json"


@dataclass
class Hit:
    score: float
    """Cosine similarity of the query and the chunk."""
    record: dict

    @property
    def text(self) -> str:
        return self.record["text"]


class VectorIndex:
    def __init__(self, encoder_info: dict, chunking: dict | None = None):
        import faiss

        self.encoder_info = dict(encoder_info)
        self.chunking = dict(chunking or {})
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(encoder_info["dim"])))
        self.records: dict[int, dict] = {}
        self.documents: dict[str, str] = {}  # document id -> sha256 of its text
        self.next_id = 0

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, records: list[dict]) -> None:
        """Add (N, D) unit vectors with one record each; ids continue from the last one ever given."""
        if len(records) != len(vectors):
            raise ValueError("one record per vector")
        if not records:
            return
        ids = np.arange(self.next_id, self.next_id + len(records), dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        for i, record in zip(ids.tolist(), records):
            self.records[i] = {"id": i, **record}
        self.next_id += len(records)

    def remove_document(self, doc_id: str) -> int:
        ids = [i for i, r in self.records.items() if r.get("doc") == doc_id]
        if ids:
            self.index.remove_ids(np.array(ids, dtype=np.int64))
            for i in ids:
                del self.records[i]
        self.documents.pop(doc_id, None)
        return len(ids)

    def add_documents(self, docs: list[Document], encoder: TextEncoder, max_words: int = 120,
                      overlap: int = 20) -> dict[str, int]:
        """Chunk, embed and add documents; skip unchanged ones, replace changed ones."""
        check_same_encoder(self.encoder_info, encoder, "this index")
        self.chunking = {"max_words": max_words, "overlap": overlap}
        counts = {"added": 0, "updated": 0, "unchanged": 0, "chunks": 0}
        records: list[dict] = []
        for doc in docs:
            digest = doc.sha256
            if self.documents.get(doc.doc_id) == digest:
                counts["unchanged"] += 1
                continue
            counts["updated" if doc.doc_id in self.documents else "added"] += 1
            self.remove_document(doc.doc_id)
            self.documents[doc.doc_id] = digest
            records += [{"doc": doc.doc_id, "chunk": n, "text": text}
                        for n, text in enumerate(chunk_text(doc.text, max_words, overlap))]
        if records:
            self.add(encoder.embed([r["text"] for r in records]), records)
        counts["chunks"] = len(records)
        return counts

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """The k most similar chunks of each (Q, D) query vector, most similar first."""
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)  # (Q, k) each
        return [[Hit(float(s), self.records[int(i)]) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def query(self, encoder: TextEncoder, texts: list[str], k: int) -> list[list[Hit]]:
        check_same_encoder(self.encoder_info, encoder, "this index")
        return self.search(encoder.embed(texts), k)

    def save(self, path: str | Path) -> Path:
        import faiss

        with atomic_directory(path, "index") as tmp:
            faiss.write_index(self.index, str(tmp / FAISS_FILE))
            write_text_atomic(tmp / CHUNKS_FILE, "".join(json.dumps(self.records[i], ensure_ascii=False) + "\n"
                                                         for i in sorted(self.records)))
            write_json_atomic(tmp / META_FILE, {
                "format": FORMAT, "version": VERSION, "encoder": self.encoder_info, "chunking": self.chunking,
                "next_id": self.next_id, "chunks": len(self), "documents": self.documents})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        import faiss

        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.exists():
            raise UserError(f"not a deltatune index (no {META_FILE}): {path}")
        try:
            meta = json.loads(meta_file.read_text())
            records = [json.loads(line) for line in (path / CHUNKS_FILE).read_text().splitlines() if line]
            index = faiss.read_index(str(path / FAISS_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"corrupt index {path}: {str(exc).splitlines()[0]}") from exc
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_file} is not a deltatune index description")
        out = cls(meta["encoder"], meta.get("chunking"))
        if index.d != int(meta["encoder"]["dim"]) or index.ntotal != len(records):
            raise UserError(f"corrupt index {path}: {index.ntotal} vectors of dim {index.d} for "
                            f"{len(records)} chunks of dim {meta['encoder']['dim']}")
        out.index = index
        out.records = {int(r["id"]): r for r in records}
        out.documents = dict(meta.get("documents", {}))
        out.next_id = int(meta.get("next_id", len(records)))
        return out


def example_text(text: str, text_pair: str | None) -> str:
    return text if text_pair is None else f"{text}\n{text_pair}"


def example_index(encoder: TextEncoder, examples, label_names: list[str]) -> VectorIndex:
    """One chunk per labelled example (text, label name, position): knn and retrieved demonstrations."""
    index = VectorIndex(encoder.info)
    records = [{"doc": f"example:{i}", "chunk": 0, "text": e.text, "text_pair": e.text_pair,
                "label": label_names[e.label]} for i, e in enumerate(examples)]
    index.add(encoder.embed([example_text(e.text, e.text_pair) for e in examples]), records)
    return index
