"""`deltatune index` and `deltatune ask`: a persistent document index and retrieval-augmented prompting.

    index build --docs DIR|FILE   documents ──> chunks ──> MiniLM vectors ──> IDX/ (FAISS + chunks + meta)
                                  (incremental: unchanged documents are skipped, changed ones replaced)
    index query "question" -k 5   question ──> vector ──> the 5 most similar chunks
    ask --index IDX "question"    the top-k chunks go into the decoder's prompt (Lewis et al. 2020, RAG):

        user: "[1] chunk\\n[2] chunk ...\\n\\nQuestion: ...\\nAnswer in one or two sentences." (chat template)
        ──> greedy generation; chunks are dropped (lowest-ranked first) until the prompt fits
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import UserError
from deltatune.io import claim_output
from deltatune.notune.index import META_FILE, Hit, VectorIndex

INSTRUCTION = "Answer in one or two sentences."


def _encoder(path: str | None, device: str):
    from deltatune.backbone import pick_device
    from deltatune.notune.encoder import TextEncoder

    return TextEncoder(path, device=pick_device(device))


def index_command(action: str, query: str | None = None, *, docs: str | None = None, index: str = "runs/index",
                  k: int = 5, encoder: str | None = None, chunk_words: int = 120, overlap: int = 20,
                  rebuild: bool = False, device: str = "auto", json_: bool = False) -> int:
    """Build, extend or query a persistent vector index of text documents.

    Args:
        action: build (chunk, embed and add --docs; adds to an existing index) or query (the k chunks nearest QUERY).
        query: The question to look up (with query).
        docs: A text file, or a folder of .txt/.md/.rst files (with build).
        index: Index folder: a new path, an empty folder, or an index deltatune wrote (extended, or rebuilt
            with --rebuild, and replaced atomically); a file or any other folder is refused.
        k: How many chunks a query returns.
        encoder: Encoder folder or alias (default: the index's own; a new index: all-MiniLM-L6-v2).
        chunk_words: Words per chunk (build).
        overlap: Words repeated at the start of the next chunk (build).
        rebuild: Build a new index even if one exists at --index.
        device: auto, cpu or cuda.
        json_: Print JSON.
    """
    from deltatune.notune.chunking import read_documents

    if action == "build":
        if not docs:
            raise UserError("index build needs --docs DIR|FILE")
        claim_output(index, "index")
        documents = read_documents(docs)
        exists = (Path(index) / META_FILE).exists() and not rebuild
        store = VectorIndex.load(index) if exists else None
        enc = _encoder(encoder or (store.encoder_info["path"] if store else None), device)
        store = store or VectorIndex(enc.info)
        counts = store.add_documents(documents, enc, chunk_words, overlap)
        store.save(index)
        counts.update(total_chunks=len(store), documents=len(store.documents))
        print(json.dumps(counts) if json_ else
              f"{index}: {counts['added']} documents added, {counts['updated']} updated, {counts['unchanged']} "
              f"unchanged ({counts['chunks']} new chunks); {len(store)} chunks from {len(store.documents)} documents")
        return 0
    if action == "query":
        if not query:
            raise UserError("index query needs the question: deltatune index query \"question\"")
        hits = search(index, query, k, encoder, device)
        if json_:
            print(json.dumps([{"score": h.score, **h.record} for h in hits], indent=2, ensure_ascii=False))
        for rank, hit in enumerate(hits if not json_ else [], 1):
            print(f"{rank}. {hit.score:.3f}  {hit.record['doc']} #{hit.record['chunk']}\n   {hit.text[:300]}")
        return 0
    raise UserError(f"unknown index action '{action}': build or query")


def search(index: str, question: str, k: int, encoder: str | None = None, device: str = "auto") -> list[Hit]:
    if k < 1:
        raise UserError(f"-k must be at least 1, not {k}")
    store = VectorIndex.load(index)
    return store.query(_encoder(encoder or store.encoder_info["path"], device), [question], k)[0]


def rag_text(question: str, hits: list[Hit]) -> str:
    """The numbered passages, then the question (the chat template adds the model's own system prompt)."""
    context = "\n".join(f"[{i}] {hit.text}" for i, hit in enumerate(hits, 1))
    return f"{context}\n\nQuestion: {question}\n{INSTRUCTION}"


def rag_prompt_ids(tokenizer, question: str, hits: list[Hit]) -> list[int]:
    """The chat-formatted prompt (or plain text for a tokenizer without a chat template) as ids."""
    content = rag_text(question, hits)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{content}\nAnswer:")["input_ids"])


def answer(lm, question: str, hits: list[Hit], max_new_tokens: int = 160,
           max_prompt_tokens: int = 2048) -> tuple[str, list[Hit], int]:
    """(answer, the chunks that fit in the prompt, prompt tokens): greedy decoding."""
    import torch

    budget = min(max_prompt_tokens, lm.max_positions - max_new_tokens)
    used = list(hits)
    ids = rag_prompt_ids(lm.tokenizer, question, used)
    while used and len(ids) > budget:
        used.pop()  # drop the lowest-ranked chunk first
        ids = rag_prompt_ids(lm.tokenizer, question, used)
    if len(ids) > budget:
        raise UserError(f"the question alone takes {len(ids)} tokens, more than the {budget}-token budget")
    tok = lm.tokenizer
    input_ids = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        out = lm.lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip(), used, len(ids)


def ask(question: str, *, index: str = "runs/index", k: int = 4, model: str | None = None,
        max_new_tokens: int = 160, max_prompt_tokens: int = 2048, device: str = "auto",
        json_: bool = False) -> int:
    """Answer a question with a decoder that reads the top-k chunks retrieved from an index (RAG).

    Args:
        question: The question.
        index: Index folder written by `deltatune index build`.
        k: Chunks put into the prompt (fewer if they do not fit).
        model: Decoder folder or alias (default: the packaged SmolLM2-135M-Instruct).
        max_new_tokens: Longest answer in tokens.
        max_prompt_tokens: Prompt budget in tokens (also capped by the model's context window).
        device: auto, cpu or cuda.
        json_: Print JSON with the answer, the chunks used and the prompt length.
    """
    from deltatune.backbone import pick_device
    from deltatune.notune.scoring import load_language_model

    hits = search(index, question, k, device=device)
    lm = load_language_model(model, pick_device(device))
    text, used, prompt_tokens = answer(lm, question, hits, max_new_tokens, max_prompt_tokens)
    if json_:
        print(json.dumps({"question": question, "answer": text, "prompt_tokens": prompt_tokens,
                          "sources": [{"score": h.score, "doc": h.record["doc"], "chunk": h.record["chunk"]}
                                      for h in used]}, indent=2, ensure_ascii=False))
        return 0
    print(text)
    print("\nsources: " + "; ".join(f"[{i}] {h.record['doc']} #{h.record['chunk']} ({h.score:.2f})"
                                     for i, h in enumerate(used, 1)))
    return 0
