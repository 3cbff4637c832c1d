"""Generation with a per-request delta, mixed across requests, through deltatune's decode loop.

    shared tasks   every row whose task the row routers cover (LoRA, AdaLoRA, IA³, adapters) or whose
                   delta is an input (soft prompts: spliced into its prompt; prefixes: the first slots
                   of its KV-cache row) decodes in ONE batch of the mixed tree, `deltatune.decoding`;
                   logits from each task's LM head
    own tasks      a task whose delta changes backbone weights (BitFit, unfrozen layers, full) decodes
                   through its own model, all its rows together, with the same loop and KV cache
    stop           a row stops at EOS or its max_new_tokens and leaves the batch

Greedy decoding: a reply is the same whatever else shares the batch (tested against each task
decoding alone). Encoder-decoders are not served for generation (`Engine` serves generation on
decoders only).
"""

from __future__ import annotations

import torch

from deltatune.decoding.loop import Decoder, Sampling, Sequence, decode
from deltatune.errors import UserError
from deltatune.generation import prompt_ids
from deltatune.methods.prefix import prefix_of
from deltatune.methods.prompt import soft_tokens_of
from deltatune.serve.task import SHARED, ServedTask


def _prompt(engine, task: ServedTask, text: str) -> list[int]:
    ids = prompt_ids(engine.shared.tokenizer, text)
    return ids[-task.max_length:]  # a long prompt keeps its end (the generation prompt)


@torch.no_grad()
def generate(engine, items: list[tuple[str, str, int]]) -> list[dict | Exception]:
    """{task, text} (the reply) or the exception that failed it, per (task, prompt, max_new_tokens) item."""
    results: list[dict | Exception | None] = [None] * len(items)
    with engine.lock:
        shared: list[int] = []
        own: dict[str, list[int]] = {}
        for i, (name, _, limit) in enumerate(items):
            try:
                task = engine.task(name)
                if task.kind != "generation":
                    raise UserError(f"task '{name}' is a {task.kind} task: use predict")
                if limit < 1:
                    raise UserError("max_new_tokens must be at least 1")
                (shared.append(i) if task.group == SHARED else own.setdefault(name, []).append(i))
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[i] = exc
        groups = [(None, shared)] if shared else []
        groups += [(engine.tasks[name], idx) for name, idx in own.items()]
        for alone, idx in groups:
            tasks = [alone or engine.tasks[items[i][0]] for i in idx]
            prompts = [_prompt(engine, t, items[i][1]) for t, i in zip(tasks, idx)]
            limits = [items[i][2] for i in idx]
            try:
                replies = (decode_alone(engine, alone, prompts, limits) if alone is not None
                           else decode_mixed(engine, tasks, prompts, limits))
            except Exception as exc:  # noqa: BLE001 - a shared batch falls back to each task alone
                replies = [exc] * len(idx) if alone is not None else _task_by_task(engine, tasks, prompts, limits)
            for i, task, reply in zip(idx, tasks, replies):
                results[i] = _reply(engine, task.name, reply)
    return results


def _task_by_task(engine, tasks: list[ServedTask], prompts: list[list[int]],
                  limits: list[int]) -> list[list[int] | Exception]:
    """Each task's rows through its own model: one failing delta fails only its own rows."""
    replies: list[list[int] | Exception | None] = [None] * len(tasks)
    for name in dict.fromkeys(t.name for t in tasks):
        idx = [b for b, t in enumerate(tasks) if t.name == name]
        try:
            out = decode_alone(engine, tasks[idx[0]], [prompts[b] for b in idx], [limits[b] for b in idx])
        except Exception as exc:  # noqa: BLE001
            out = [exc] * len(idx)
        for b, reply in zip(idx, out):
            replies[b] = reply
    return replies


def _reply(engine, task: str, tokens: list[int] | Exception) -> dict | Exception:
    if isinstance(tokens, Exception):
        return tokens
    return {"task": task, "text": engine.shared.tokenizer.decode(tokens, skip_special_tokens=True).strip()}


def _sequence(engine, task: ServedTask, prompt: list[int], limit: int, top: bool) -> Sequence:
    """A greedy sequence carrying the task's soft tokens / prefix (`top`: read from its own model)."""
    eos = engine.shared.tokenizer.eos_token_id
    soft = soft_tokens_of(task.top) if top else task.soft_tokens
    prefix = prefix_of(task.top) if top else task.prefix
    return Sequence(ids=prompt, task=task.name, soft_tokens=soft, prefix=prefix,
                    head=task.top.get_output_embeddings(),
                    sampling=Sampling(max_new_tokens=limit, stop_ids=() if eos is None else (eos,)))


def decode_alone(engine, task: ServedTask, prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
    """Greedy decoding of one task's rows through the task's own model (KV cache, one batch)."""
    seqs = [_sequence(engine, task, p, n, top=True) for p, n in zip(prompts, limits)]
    with Decoder(task.top.get_submodule(task.base_name)) as decoder:
        return decode(decoder, seqs)


def decode_mixed(engine, tasks: list[ServedTask], prompts: list[list[int]], limits: list[int],
                 step_logits: list | None = None) -> list[list[int]]:
    """Greedy decoding of every row in one batch, each row with its own task's delta; new tokens per row.

    `step_logits`, when given a list, receives the (B, V) logits of every step (tests compare them;
    rows that have stopped are NaN)."""
    seqs = [_sequence(engine, t, p, n, top=False) for t, p, n in zip(tasks, prompts, limits)]
    for s in seqs:
        s.logits = [] if step_logits is not None else None
    with Decoder(engine.mixed, routers=engine.routers.values()) as decoder:
        news = decode(decoder, seqs)
    if step_logits is not None:
        for step in range(max(len(s.logits) for s in seqs)):
            rows = [s.logits[step] if step < len(s.logits) else torch.full_like(s.logits[0], float("nan"))
                    for s in seqs]
            step_logits.append(torch.stack(rows))  # (B, V)
    return news
