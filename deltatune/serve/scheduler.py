"""Continuous batching for generation: one thread owns the decode loops, requests join and leave between steps.

    submit(job)  ── the job's sequences fit in the KV bound? no -> Overloaded at once (the caller answers 503)
                   │ yes: queued for the next step
                   ▼
    decode thread, forever:   (under engine.lock, so classification batches interleave between steps)
        admit      queued sequences join their group's Decoder (deltatune.decoding): the MIXED group
                   (every shared task + the bare backbone, one batch, per-row deltas through the row
                   routers, soft tokens, prefixes) or a task's OWN group (BitFit, full, ...: its own model)
        drop       sequences of cancelled jobs (a client went away) or of a task unloaded meanwhile
        step       one step of every busy Decoder: prefill of the joiners + one token for the others
        deliver    job.on_token(i, token, logits) per new token (stop strings: it may end choice i);
                   finished choices leave; a job whose choices all ended completes
    idle Decoders are closed (the model gets its attention implementation back)

KV bound (tokens): a Decoder's cache is padded, so a group holding sequences s costs
|s| × max_s (prompt + soft tokens + prefix + max_new_tokens) slots; the sum over groups, counted at
admission with each sequence's worst case, never exceeds `max_kv_tokens`.
Greedy rows are independent of their batch mates (the decode loop's guarantee), so a request's greedy
output is the same whatever else is decoding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from deltatune.decoding.loop import Decoder, Sampling, Sequence
from deltatune.errors import UserError
from deltatune.serve.batcher import Overloaded
from deltatune.serve.generate import _sequence
from deltatune.serve.task import SHARED, ServedTask

MIXED = "mixed"
"""The group key of the mixed Decoder (shared tasks and the bare backbone)."""


class KVFull(Overloaded):
    """The KV bound is reached: answer 503 with Retry-After."""

    def __init__(self, retry_after: float, needed: int, used: int, bound: int):
        Exception.__init__(self, f"server overloaded: {used} of {bound} KV-cache tokens in use, this request "
                                 f"needs {needed} more; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """A job's sequences were taken out before they finished."""


@dataclass(eq=False)
class Job:
    """One request: `seqs` (n choices, or several prompts) for one task (None: the bare backbone).
    The scheduler thread calls the hooks; subclasses turn them into responses."""

    task: ServedTask | None
    seqs: list[Sequence]
    finished: list[str | None] = field(default_factory=list)
    """Per sequence: None while running, then 'stop' or 'length'."""
    cancelled: bool = False
    group: str = MIXED

    def on_token(self, i: int, token: int, logits: torch.Tensor | None) -> bool:
        """Sequence i produced `token` ((V,) logits when it asked for them); True ends it now."""
        return False

    def on_finish(self, i: int, reason: str) -> None:
        """Sequence i ended: 'stop' (a stop id or string) or 'length' (max_new_tokens)."""

    def on_done(self) -> None:
        """Every sequence has ended."""

    def on_error(self, exc: Exception) -> None:
        """The job failed (its task unloaded, a decode error); no further hook is called."""


def reserved(seq: Sequence) -> int:
    """Cache slots the sequence may hold: prefix + soft tokens + prompt + new tokens."""
    soft = 0 if seq.soft_tokens is None else seq.soft_tokens[0].shape[0]
    prefix = 0 if seq.prefix is None else seq.prefix.shape[2]
    return prefix + soft + len(seq.ids) + seq.sampling.max_new_tokens


def footprint(lengths: list[int]) -> int:
    """Slots of a padded cache holding sequences of these reserved lengths."""
    return len(lengths) * max(lengths, default=0)


class Scheduler:
    """The decode thread and its admission control (see the module docstring)."""

    def __init__(self, engine, max_kv_tokens: int = 65536):
        self.engine, self.max_kv_tokens = engine, max_kv_tokens
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.jobs: list[Job] = []  # admitted, not yet done (pending included)
        self.groups: dict[str, dict[Sequence, int]] = {}  # group -> its sequences' reserved slots
        self.decoders: dict[str, Decoder] = {}
        self.step_seconds = 0.05  # running estimate, for Retry-After
        self.steps = 0
        self.peak_tasks = 0  # most deltas (the bare backbone counted as one) in one step of the mixed Decoder
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ---- request side (any thread) ---------------------------------------------------------------------

    def sequence(self, task: ServedTask | None, ids: list[int], sampling: Sampling) -> Sequence:
        """A sequence of `task` (None: the bare backbone) carrying its soft tokens, prefix and LM head."""
        if task is None:
            if self.engine.shared.lm_head is None or not self.engine.shared.arch.is_decoder:
                raise UserError(f"{self.engine.model_path} has no LM head to generate with")
            return Sequence(ids=ids, sampling=sampling)
        seq = _sequence(self.engine, task, ids, sampling.max_new_tokens, top=task.group != SHARED)
        seq.sampling = sampling
        return seq

    def kv_tokens(self) -> int:
        with self.cond:
            return sum(footprint(list(g.values())) for g in self.groups.values())

    def check_fits(self, job: Job) -> None:
        """UserError when the job could never fit, even alone."""
        need = footprint([reserved(s) for s in job.seqs])
        if need > self.max_kv_tokens:
            raise UserError(f"this request needs {need} KV-cache tokens (prompt + max_tokens, times n), more than "
                            f"the server's bound of {self.max_kv_tokens}: shorten the prompt, max_tokens or n")

    def submit(self, job: Job) -> Job:
        """Queue a job for the next step; Overloaded (KVFull) when it does not fit in the KV bound now."""
        self.check_fits(job)
        job.group = MIXED if job.task is None or job.task.group == SHARED else job.task.name
        job.finished = [None] * len(job.seqs)
        with self.cond:
            if self.stopping:
                raise Overloaded(1.0)
            used = sum(footprint(list(g.values())) for g in self.groups.values())
            group = self.groups.get(job.group, {})
            after = footprint(list(group.values()) + [reserved(s) for s in job.seqs])
            if used - footprint(list(group.values())) + after > self.max_kv_tokens:
                raise KVFull(self.retry_after(), after - footprint(list(group.values())), used, self.max_kv_tokens)
            self.groups.setdefault(job.group, {}).update({s: reserved(s) for s in job.seqs})
            self.pending.append(job)
            self.jobs.append(job)
            self._start()
            self.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Take the job's sequences out at the next step (a client that went away)."""
        with self.cond:
            job.cancelled = True
            self.cond.notify_all()

    def retry_after(self) -> float:
        """Seconds until the sequence nearest its end has likely finished (at least 1)."""
        remaining = [s.sampling.max_new_tokens - len(s.new) for g in self.groups.values() for s in g]
        return max(1.0, min(remaining, default=1) * self.step_seconds)

    def stats(self) -> dict:
        with self.cond:
            running = sum(len(g) for g in self.groups.values())
            used = sum(footprint(list(g.values())) for g in self.groups.values())
        return {"sequences": running, "kv_tokens": used, "max_kv_tokens": self.max_kv_tokens,
                "steps": self.steps, "peak_tasks": self.peak_tasks, "decoders": sorted(list(self.decoders))}

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="deltatune-decode", daemon=True)
            self.thread.start()

    # ---- the decode thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.jobs:
                    self.cond.wait()
                if self.stopping:
                    break
                joining, self.pending = self.pending, []
                active = list(self.jobs)
            start = time.perf_counter()
            try:
                with self.engine.lock:
                    self._admit(joining)
                    self._drop(active)
                    self._step(active)
                    self._close_idle()
            except Exception as exc:  # noqa: BLE001 - a decode error fails the running jobs, not the thread
                for job in active:
                    self._end(job, exc)
                self._close_all()
            self.step_seconds = 0.8 * self.step_seconds + 0.2 * (time.perf_counter() - start)
            self.steps += 1
            time.sleep(0)  # let a waiting classification batch take the engine lock
        with self.cond:
            for job in self.jobs:
                job.on_error(Overloaded(1.0))
            self.jobs.clear()
        self._close_all()

    def _decoder(self, group: str, task: ServedTask | None) -> Decoder:
        decoder = self.decoders.get(group)
        if decoder is None:
            if group == MIXED:
                decoder = Decoder(self.engine.mixed, head=self.engine.shared.lm_head)
            else:
                decoder = Decoder(task.top.get_submodule(task.base_name))
            self.decoders[group] = decoder
        return decoder

    def _admit(self, joining: list[Job]) -> None:
        for job in joining:
            if job.cancelled:
                continue
            try:
                self._check_served(job)
                decoder = self._decoder(job.group, job.task)
                for seq in job.seqs:
                    decoder.add(seq)
            except Exception as exc:  # noqa: BLE001 - this job only
                self._end(job, exc)

    def _check_served(self, job: Job) -> None:
        if job.task is not None and self.engine.tasks.get(job.task.name) is not job.task:
            raise UserError(f"model '{job.task.name}' was unloaded or replaced while its request was running")

    def _drop(self, active: list[Job]) -> None:
        for job in active:
            if job not in self.jobs:
                continue
            try:
                if job.cancelled:
                    raise Cancelled("cancelled")
                self._check_served(job)
            except Exception as exc:  # noqa: BLE001
                self._end(job, exc)

    def _step(self, active: list[Job]) -> None:
        if MIXED in self.decoders:  # routers may have been used (classification) or added since the last step
            mixed = self.decoders[MIXED]
            mixed.routers = list(self.engine.routers.values())
            mixed.row_tasks = None
            self.peak_tasks = max(self.peak_tasks, len({s.task for s in mixed.live + mixed.waiting}))
        owner = {id(s): (job, i) for job in active for i, s in enumerate(job.seqs)}
        for decoder in list(self.decoders.values()):
            if not decoder.busy:
                continue
            for seq, token in decoder.step():
                job, i = owner.get(id(seq), (None, 0))
                if job is None or job.finished[i] is not None:
                    continue
                logits = seq.logits.pop() if seq.logits else None
                ended = job.on_token(i, token, logits)
                if ended or seq.done:
                    reason = "stop" if ended or token in seq.sampling.stop_ids else "length"
                    if not seq.done:
                        decoder.drop(seq)
                    self._finish(job, i, reason)

    def _finish(self, job: Job, i: int, reason: str) -> None:
        job.finished[i] = reason
        job.on_finish(i, reason)
        with self.cond:
            self.groups.get(job.group, {}).pop(job.seqs[i], None)
        if all(r is not None for r in job.finished):
            with self.cond:
                self.jobs.remove(job)
            job.on_done()

    def _end(self, job: Job, exc: Exception) -> None:
        """Take a job out (cancelled or failed): its sequences leave their Decoder, its slots are freed."""
        decoder = self.decoders.get(job.group)
        for seq in job.seqs:
            if decoder is not None and not seq.done:
                decoder.drop(seq)
        with self.cond:
            for seq in job.seqs:
                self.groups.get(job.group, {}).pop(seq, None)
            if job in self.jobs:
                self.jobs.remove(job)
            if job in self.pending:
                self.pending.remove(job)
        if not isinstance(exc, Cancelled):
            job.on_error(exc)

    def _close_idle(self) -> None:
        for group in [g for g, d in self.decoders.items() if not d.busy]:
            self.decoders.pop(group).close()
            with self.cond:
                if not self.groups.get(group):
                    self.groups.pop(group, None)

    def _close_all(self) -> None:
        for decoder in self.decoders.values():
            try:
                decoder.close()
            except Exception:  # noqa: BLE001, S110 - closing after a failure: the model's attention is reset best-effort
                pass
        self.decoders.clear()
