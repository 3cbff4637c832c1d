"""Documents -> chunks for an index: read text files, cut them into overlapping passages of ~N words.

    document ──> paragraphs ──> sentences ──> packed greedily into chunks of ≤ max_words
                                              (a sentence longer than that is cut by words),
                 each chunk starts with the last ≤ overlap words of the previous one

Passages, not whole documents, are embedded: a sentence encoder reads a limited number of tokens
(all-MiniLM-L6-v2: 256 word pieces, trained on 128), and a prompt has room for a few passages only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import UserError

DOC_SUFFIXES = (".txt", ".md", ".rst", ".text")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass
class Document:
    doc_id: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def read_documents(path: str | Path) -> list[Document]:
    """One file, or every .txt/.md/.rst file under a folder (sorted); ids are the paths as given."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"documents not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                 if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    docs = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document(doc_id=file.as_posix(), text=text))
    if not docs:
        raise UserError(f"no text documents in {path} (looked for {', '.join(DOC_SUFFIXES)} files)")
    return docs


def _sentences(text: str) -> list[list[str]]:
    """Sentences as word lists; paragraph breaks always end a sentence."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            words = sentence.split()
            if words:
                out.append(words)
    return out


def chunk_text(text: str, max_words: int = 120, overlap: int = 20) -> list[str]:
    """Overlapping passages of at most max_words words (whitespace normalised)."""
    if max_words < 1 or overlap < 0 or overlap >= max_words:
        raise UserError(f"chunking needs max_words ≥ 1 and 0 ≤ overlap < max_words (got {max_words}, {overlap})")
    pieces: list[list[str]] = []
    for words in _sentences(text):  # sentences longer than a chunk are cut into chunk-sized pieces
        pieces += [words[i:i + max_words] for i in range(0, len(words), max_words)]
    chunks: list[list[str]] = []
    current: list[str] = []
    fresh = 0  # words in `current` that no earlier chunk holds
    for piece in pieces:
        if current and len(current) + len(piece) > max_words:
            chunks.append(current)
            current = current[-overlap:] if overlap else []
            if len(current) + len(piece) > max_words:
                current = current[len(current) + len(piece) - max_words:]
            fresh = 0
        current = current + piece
        fresh += len(piece)
    if fresh:
        chunks.append(current)
    return [" ".join(words) for words in chunks]
