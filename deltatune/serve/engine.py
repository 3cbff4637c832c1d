"""The serving engine: one frozen backbone, any number of named task deltas, mixed-task batches.

    items [(sentiment, "these apples look nice"), (q&a, "when should I leave"), ...]
      │ tokenize (each task's max_length)
      ├── shared group: every task whose delta the row routers cover ── ONE pass of the mixed tree
      │       (per-row LoRA / AdaLoRA / IA³ / adapters / soft tokens / prefixes), then each task's head
      │       over its rows' slice of the output
      └── own groups: a task whose delta changes backbone weights (BitFit, unfrozen layers, full)
              runs its rows through its own model, one pass per task
    -> {task, label, probabilities} per item, in order

The backbone is loaded once and never written (`SharedBackbone`); tasks are added and removed at run
time under a lock that a running batch holds, so a batch in flight always finishes with the tasks it
started with. A failure in one task's delta fails that task's items only: the shared pass is retried
task by task. Library first: `deltatune.serve.app` puts HTTP in front of `Engine`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.backbone import fingerprint_module, load_task_model, pick_device
from deltatune.batching import Encoded, collate, encode
from deltatune.data import Example
from deltatune.delta import read_meta, read_tensors
from deltatune.errors import UserError
from deltatune.methods.prefix import prefix_inputs
from deltatune.methods.prompt import splice_soft_tokens
from deltatune.serve.routing import RowRouter, install_router, structural_clone
from deltatune.serve.task import OWN, SHARED, ServedTask, SharedBackbone, build_task, shared_lm_head


class UnknownTask(UserError):
    """A request names a task that is not served (HTTP 404)."""


@dataclass
class BatchRecord:
    """What one engine call did: rows, distinct tasks, and the groups it ran (visible in /metrics)."""

    rows: int
    tasks: int
    groups: list[tuple[str, int]] = field(default_factory=list)
    """(group, rows) per pass: 'shared' for the mixed pass, 'own:<task>' for a task run alone."""
    seconds: float = 0.0


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    passes: Counter = field(default_factory=Counter)
    """Passes by kind: 'shared', 'own', 'retry' (a failed shared pass rerun task by task)."""
    group_rows: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    """Failed items by task."""
    last: BatchRecord | None = None


class Engine:
    """Serve classification (and, on decoders, generation) for many task deltas on one backbone."""

    def __init__(self, model: str | None = None, device: str = "auto", pass_overhead_tokens: int | None = 128,
                 quantize: str | None = None):
        """`pass_overhead_tokens`: the shared group is split into passes of similar length when that
        saves more padded positions than this per extra pass (None: always one pass)."""
        self.device = pick_device(device)
        self.pass_overhead_tokens = pass_overhead_tokens
        base = load_task_model(model, num_labels=1, pooling="mean", device=self.device, quantize=quantize)
        self.shared = SharedBackbone(module=base.backbone, tokenizer=base.tokenizer, arch=base.arch,
                                     model_path=base.model_path, fingerprint=base.fingerprint, device=self.device)
        self.shared.lm_head = shared_lm_head(base) if base.arch.is_decoder else None
        self.shared.quantization = base.quantization  # --quantize: checked against each delta's
        self.mixed = structural_clone(base.backbone).eval()  # routers go here, never into the backbone
        self.tasks: dict[str, ServedTask] = {}
        self.routers: dict[tuple[str, str], RowRouter] = {}
        self.lock = threading.RLock()
        self.stats = EngineStats()

    @property
    def fingerprint(self) -> str:
        return self.shared.fingerprint

    @property
    def model_path(self) -> str:
        return self.shared.model_path

    def backbone_fingerprint(self) -> str:
        """The backbone's fingerprint recomputed from its weights now (equal to `fingerprint`: never written)."""
        return fingerprint_module(self.shared.module)

    # ---- tasks -----------------------------------------------------------------------------------------

    def load_task(self, name: str, path: str | Path) -> ServedTask:
        """Build a task from a delta directory without serving it yet (the slow part, lock not held)."""
        meta = read_meta(path)
        return build_task(self.shared, name, path, meta, read_tensors(path))

    def add_task(self, name: str, path: str | Path) -> ServedTask:
        """Serve a delta directory as `name` (replacing a task of that name); batches in flight finish first."""
        return self.install(self.load_task(name, path))

    def install(self, task: ServedTask) -> ServedTask:
        with self.lock:
            if task.name in self.tasks:
                self.remove_task(task.name)
            for path, site in task.sites.items():
                router = self.routers.get((path, site.row_key()))
                if router is None:
                    router = self.routers[(path, site.row_key())] = install_router(self.mixed, path, site)
                router.add(task.name, site)
            self.tasks[task.name] = task
        return task

    def remove_task(self, name: str) -> None:
        with self.lock:
            task = self.tasks.pop(name, None)
            if task is None:
                raise UnknownTask(f"unknown task '{name}'")
            for path, site in task.sites.items():
                self.routers[(path, site.row_key())].remove(name)

    def task(self, name: str) -> ServedTask:
        task = self.tasks.get(name)
        if task is None:
            raise UnknownTask(f"unknown task '{name}'")
        return task

    def generate(self, items: list[tuple[str, str, int]]) -> list[dict | Exception]:
        """{task, text} (the greedy reply) per (task, prompt, max_new_tokens) item, mixed across tasks."""
        from deltatune.serve.generate import generate

        return generate(self, items)

    # ---- classification --------------------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, items: list[tuple[str, str]]) -> list[dict | Exception]:
        """{task, label, probabilities, logits} (or the exception that failed it) per (task, text) item, in order."""
        start = time.perf_counter()
        results: list[dict | Exception | None] = [None] * len(items)
        with self.lock:
            by_task: dict[str, list[int]] = {}
            for i, (name, _) in enumerate(items):
                task = self.tasks.get(name)
                if task is None:
                    results[i] = UnknownTask(f"unknown task '{name}'")
                elif task.kind != "classification":
                    results[i] = UserError(f"task '{name}' is a {task.kind} task: use generate")
                else:
                    by_task.setdefault(name, []).append(i)
            record = BatchRecord(rows=sum(map(len, by_task.values())), tasks=len(by_task))
            rows = {name: encode(self.tasks[name].tokenizer, [Example(text=items[i][1]) for i in idx],
                                 self.tasks[name].max_length) for name, idx in by_task.items()}
            shared = [self.tasks[n] for n in by_task if self.tasks[n].group == SHARED]
            logits: dict[str, torch.Tensor | Exception] = {}
            if shared:
                logits.update(self._shared_or_retry(shared, rows, record))
            for name in by_task:
                if self.tasks[name].group == OWN:
                    logits[name] = self._alone(self.tasks[name], rows[name], record, OWN)
            for name, idx in by_task.items():
                out = logits[name]
                if isinstance(out, Exception):
                    self.stats.failures[name] += len(idx)
                    for i in idx:
                        results[i] = out
                    continue
                labels = self.tasks[name].labels or [str(k) for k in range(out.shape[1])]
                for i, row in zip(idx, out.float().cpu()):
                    p = row.softmax(-1)
                    results[i] = {"task": name, "label": labels[int(p.argmax())],
                                  "probabilities": {label: float(v) for label, v in zip(labels, p)},
                                  "logits": row.tolist()}
            record.seconds = time.perf_counter() - start
            self._record(record)
        return results

    def _record(self, record: BatchRecord) -> None:
        stats = self.stats
        stats.batches += 1
        stats.rows += record.rows
        stats.last = record
        for group, n in record.groups:
            stats.group_rows[group.split(":")[0]] += n

    def _shared_or_retry(self, tasks: list[ServedTask], rows: dict[str, list[Encoded]],
                         record: BatchRecord) -> dict[str, torch.Tensor | Exception]:
        """The shared group in as few mixed passes as padding allows (`length_buckets`); if one fails,
        every task of the group reruns alone, so only a failing delta's items fail."""
        entries = [(t, i, r) for t in tasks for i, r in enumerate(rows[t.name])]
        lengths = [len(r.input_ids) + t.soft_token_count for t, _, r in entries]
        out: dict[str, list] = {t.name: [None] * len(rows[t.name]) for t in tasks}
        try:
            for chunk in length_buckets(lengths, self.pass_overhead_tokens):
                part: dict[str, list[tuple[int, Encoded]]] = {}
                for k in sorted(chunk):  # a task's rows stay together (one head call per task)
                    task, i, row = entries[k]
                    part.setdefault(task.name, []).append((i, row))
                logits = self.shared_pass([self.tasks[n] for n in part], {n: [r for _, r in v] for n, v in part.items()})
                for name, v in part.items():
                    for (i, _), row in zip(v, logits[name]):
                        out[name][i] = row
                record.groups.append((SHARED, len(chunk)))
                self.stats.passes[SHARED] += 1
            return {name: torch.stack(v) for name, v in out.items()}
        except Exception:  # noqa: BLE001 - one task's delta must not fail the others: retry task by task
            return {t.name: self._alone(t, rows[t.name], record, "retry") for t in tasks}

    def _alone(self, task: ServedTask, rows: list[Encoded], record: BatchRecord, kind: str):
        """One task's rows through its own model (its own group), or the exception it raised."""
        try:
            batch = collate(rows, self.shared.tokenizer.pad_token_id, self.device)
            batch.pop("keys")
            out = task.top(**batch).logits
        except Exception as exc:  # noqa: BLE001 - reported per item, the other tasks go on
            return exc
        record.groups.append((f"{kind}:{task.name}", len(rows)))
        self.stats.passes[kind] += 1
        return out

    def shared_pass(self, tasks: list[ServedTask], rows: dict[str, list[Encoded]]) -> dict[str, torch.Tensor]:
        """One pass of the mixed tree over every row of `tasks`, then each task's head: logits per task."""
        order = [(t, r) for t in tasks for r in rows[t.name]]
        batch = collate([r for _, r in order], self.shared.tokenizer.pad_token_id, self.device)
        batch.pop("keys")
        inputs = self.row_inputs(batch, [t for t, _ in order])
        out = self.run_mixed([t.name for t, _ in order], **inputs)
        logits, start = {}, 0
        for task in tasks:
            n = len(rows[task.name])
            width = max(len(r.input_ids) for r in rows[task.name])
            sub = {k: v[start:start + n, :width] for k, v in batch.items()}
            task.stub.output = slice_output(out, slice(start, start + n), width + task.soft_token_count)
            logits[task.name] = task.view(**sub).logits
            start += n
        return logits

    def row_inputs(self, batch: dict, row_tasks: list[ServedTask]) -> dict:
        """The backbone's inputs for a mixed batch: ids, or embeddings with each row's soft tokens spliced
        in; each row's prefix for the attention functions, with the positions each row would have alone."""
        inputs = dict(batch)
        if any(t.soft_tokens is not None for t in row_tasks):
            embed = self.mixed.get_submodule(self.shared.arch.word_embeddings)
            embeds, mask, types = splice_soft_tokens(embed(inputs.pop("input_ids")), inputs["attention_mask"],
                                                     inputs.get("token_type_ids"), [t.soft_tokens for t in row_tasks])
            inputs.update(inputs_embeds=embeds, attention_mask=mask)
            if types is not None:
                inputs["token_type_ids"] = types
        if any(t.prefix is not None for t in row_tasks):
            inputs.update(prefix_inputs(self.mixed, [t.prefix for t in row_tasks], inputs["attention_mask"]))
        if self.shared.arch.is_decoder:
            inputs["use_cache"] = False
        return inputs

    def run_mixed(self, row_tasks: list[str], **inputs):
        """Call the mixed tree with every router prepared for these rows' tasks."""
        for router in self.routers.values():
            router.begin(row_tasks)
        try:
            return self.mixed(**inputs)
        finally:
            for router in self.routers.values():
                router.end()


def length_buckets(lengths: list[int], overhead: int | None) -> list[list[int]]:
    """Row indices split into passes that waste little on padding: longest first, cut where
    Σ rows × width + overhead × passes is least (`overhead`: one pass's fixed cost in token positions;
    None: one pass)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if overhead is None or len(order) < 2:
        return [order]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # rows order[i:j] in one pass, padded to the longest, lengths[order[i]]
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], len(order)
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def slice_output(output, rows: slice, width: int):
    """The rows' part of a backbone output, sequence outputs cut to `width` positions (what those rows
    alone, padded to their own longest, would have produced)."""
    fields = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            fields[key] = value[rows, :width] if value.dim() == 3 else value[rows]
    return type(output)(**fields)
