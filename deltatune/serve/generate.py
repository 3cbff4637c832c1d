"""Generation with a per-request delta, mixed across requests (decoders: LoRA, adapters, IA³, soft prompts).

    prefill   rows left-padded to one width so that they end together:
              [pad ; x_<at ; P_b ; x_≥at]   positions cumsum(mask) − 1: each row's own 0..L_b−1
    decode    one token per row per step through the same routers (prepared once for the whole
              request), KV cache shared by the batch; logits from each task's LM head
    stop      a row stops at EOS or its max_new_tokens; the batch stops when every row has

Greedy decoding only: a reply is then the same whatever else shares the batch (tested against each task
decoding alone). Tasks that cannot share the mixed pass (and prefix tasks, whose prefix lives in the
cache) decode alone through their own model, recomputing the whole sequence each step.
"""

from __future__ import annotations

import torch

from deltatune.errors import UserError
from deltatune.generation import prompt_ids
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
        for i, (name, text, limit) in enumerate(items):
            try:
                task = engine.task(name)
                if task.kind != "generation":
                    raise UserError(f"task '{name}' is a {task.kind} task: use predict")
                if limit < 1:
                    raise UserError("max_new_tokens must be at least 1")
                if task.group == SHARED and task.prefix is None:
                    shared.append(i)
                else:
                    results[i] = _reply(engine, name, decode_alone(engine, task, _prompt(engine, task, text), limit))
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[i] = exc
        if shared:
            shared.sort(key=lambda i: items[i][0])  # rows of a task together: one LM head call per task
            tasks = [engine.tasks[items[i][0]] for i in shared]
            prompts = [_prompt(engine, t, items[i][1]) for t, i in zip(tasks, shared)]
            try:
                replies = decode_mixed(engine, tasks, prompts, [items[i][2] for i in shared])
            except Exception as exc:  # noqa: BLE001 - fall back to each row alone
                replies = [exc] * len(shared)
            for i, task, reply, prompt in zip(shared, tasks, replies, prompts):
                if isinstance(reply, Exception):
                    try:
                        reply = decode_alone(engine, task, prompt, items[i][2])
                    except Exception as exc:  # noqa: BLE001
                        reply = exc
                results[i] = _reply(engine, task.name, reply)
    return results


def _reply(engine, task: str, tokens: list[int] | Exception) -> dict | Exception:
    if isinstance(tokens, Exception):
        return tokens
    return {"task": task, "text": engine.shared.tokenizer.decode(tokens, skip_special_tokens=True).strip()}


def decode_alone(engine, task: ServedTask, prompt: list[int], limit: int) -> list[int]:
    """Greedy decoding of one row through the task's own model, the whole sequence each step."""
    eos = engine.shared.tokenizer.eos_token_id
    ids = torch.tensor([prompt], device=engine.device)  # (1, T)
    new: list[int] = []
    for _ in range(limit):
        logits = task.top(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]  # (V,)
        token = int(logits.argmax())
        new.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def decode_mixed(engine, tasks: list[ServedTask], prompts: list[list[int]], limits: list[int],
                 step_logits: list | None = None) -> list[list[int]]:
    """Greedy decoding of every row in one batch, each row with its own task's delta; new tokens per row.

    `step_logits`, when given a list, receives the (B, V) logits of every step (tests compare them)."""
    from transformers.cache_utils import DynamicCache

    device, eos = engine.device, engine.shared.tokenizer.eos_token_id
    embed = engine.mixed.get_input_embeddings()
    rows = []
    for task, ids in zip(tasks, prompts):
        e = embed(torch.tensor(ids, device=device))  # (T, H)
        if task.soft_tokens is not None:
            soft, at = task.soft_tokens
            at = min(at, len(ids))
            e = torch.cat([e[:at], soft.to(e.dtype), e[at:]])  # (n + T, H)
        rows.append(e)
    width = max(len(r) for r in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])  # (B, W, H), left-padded
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        embeds[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, W): each row's own 0..L-1
    names = [t.name for t in tasks]
    spans = _task_spans(tasks)
    new: list[list[int]] = [[] for _ in tasks]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    cap = torch.tensor(limits, device=device)
    for router in engine.routers.values():
        router.begin(names)
    try:
        out = engine.mixed(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           past_key_values=DynamicCache(), use_cache=True)
        for step in range(max(limits)):
            logits = _lm_logits(spans, out.last_hidden_state[:, -1])  # (B, V)
            if step_logits is not None:
                step_logits.append(logits)
            token = logits.argmax(-1)  # (B,)
            for b in (~done).nonzero().flatten().tolist():
                new[b].append(int(token[b]))
            done |= (token == eos) | (cap <= step + 1)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = engine.mixed(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                               past_key_values=out.past_key_values, use_cache=True)
    finally:
        for router in engine.routers.values():
            router.end()
    return new


def _task_spans(tasks: list[ServedTask]) -> list[tuple[ServedTask, slice]]:
    """Consecutive rows of one task -> (task, rows)."""
    spans, start = [], 0
    for i in range(1, len(tasks) + 1):
        if i == len(tasks) or tasks[i].name != tasks[start].name:
            spans.append((tasks[start], slice(start, i)))
            start = i
    return spans


def _lm_logits(spans: list[tuple[ServedTask, slice]], hidden: torch.Tensor) -> torch.Tensor:
    # hidden: (B, H) -> (B, V), each row through its task's LM head (the shared one unless the delta has its own)
    parts = [task.top.get_output_embeddings()(hidden[rows]) for task, rows in spans]
    return torch.cat(parts).float()
