"""`deltatune search`: the S4 design space (Chen et al., ICLR 2023) under a trainable-parameter budget,
with successive halving (Jamieson & Talwalkar 2016) so that poor designs stop early.

    candidates: the paper's S4 design + random designs (grouping, allocation, tuned groups, strategies),
                each sized to the budget by `s4.plan_for`
    round k:    every survivor trains on to T / η^(K-k) steps (resumed: its tensors and AdamW moments are
                kept between rounds; one learning-rate schedule over T for all), is scored on validation,
                and the best 1/η go on; the last round trains to T
    then:       the winner's test accuracy beside LoRA and adapters sized to the same budget and full
                fine-tuning, each trained for the same T steps on the same batches

The test split is read only for that final table. Writes DIR/search.json and DIR/search.md.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from deltatune.backbone import TaskModel, load_task_model, pick_device, resolve_pooling
from deltatune.batching import Encoded, collate, encode, train_batches
from deltatune.config import TrainConfig
from deltatune.data import TaskArgs
from deltatune.errors import UserError
from deltatune.evaluate import evaluate, forward_batch
from deltatune.io import claim_output, run_folder, write_json_atomic, write_text_atomic
from deltatune.methods import resolve_method, s4
from deltatune.methods.base import count_parameters, linear_dims, resolve_targets, trainable_state
from deltatune.runtime import set_threads
from deltatune.train import build_optimizer, seed_everything, warmup_linear

DEFAULT_TASK = "rotten-tomatoes"
DEFAULT_SIZES = {"train_size": 1000, "val_size": 300, "test_size": 500}


def parse_budget(budget: str | float) -> float:
    """'0.5%' or '0.005' -> 0.005."""
    text = str(budget).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError as exc:
        raise UserError(f"--budget expects a fraction or a percentage (0.005 or 0.5%), got '{budget}'") from exc
    if not 0 < value <= 1:
        raise UserError(f"--budget must lie in (0, 100%], got '{budget}'")
    return value


@dataclass
class Candidate:
    """One design (or baseline) and its training so far."""

    name: str
    method: str
    options: dict[str, Any]
    description: str
    params: int
    """Trainable parameters besides the head."""
    steps: int = 0
    state: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    scores: list[tuple[int, float]] = field(default_factory=list)
    """(steps trained, validation accuracy) after each round."""
    test: dict[str, float] | None = None


# ---- the design space ----------------------------------------------------------------------------------

def s4_candidate(name: str, task_model: TaskModel, config: s4.Config) -> Candidate:
    """A design sized to its budget (raises UserError when it cannot fit)."""
    plan = s4.plan_for(task_model, config)
    options = {"grouping": config.grouping, "allocation": config.allocation, "groups": ",".join(config.groups),
               "budget": config.budget}
    return Candidate(name, "s4", options, f"{config.grouping}/{config.allocation}  {plan.describe()}", plan.params)


def random_design(rng: random.Random, has_biases: bool) -> tuple[str, str, tuple[str, ...]]:
    """S0: grouping, allocation, which groups are tuned, and each tuned group's strategies."""
    letters = "APBL" if has_biases else "APL"
    tuned = [rng.random() < 0.75 for _ in range(s4.GROUPS)]
    if not any(tuned):
        tuned[rng.randrange(s4.GROUPS)] = True
    groups = []
    for on in tuned:
        chosen = [c for c in letters if rng.random() < 0.5] or [rng.choice(letters)]
        groups.append("+".join(chosen) if on else s4.FROZEN)
    return rng.choice(list(s4.GROUPINGS)), rng.choice(list(s4.ALLOCATIONS)), tuple(groups)


def sample_candidates(task_model: TaskModel, trials: int, budget: float, seed: int) -> list[Candidate]:
    """The paper's final design first, then distinct random designs that fit the budget."""
    from deltatune.methods import bitfit

    has_biases = bool(bitfit.bias_names(task_model))
    paper = s4.Config(budget=budget, groups=s4.PAPER_GROUPS if has_biases else
                      ("adapter+lora", "adapter+prefix", "adapter+prefix", "prefix+lora"))
    candidates = [s4_candidate("s4-paper", task_model, paper)]
    seen = {(paper.grouping, paper.allocation, tuple(paper.groups))}
    rng = random.Random(seed)
    for _ in range(1000 * trials):
        if len(candidates) >= trials:
            break
        design = random_design(rng, has_biases)
        if design in seen:
            continue
        seen.add(design)
        config = s4.Config(grouping=design[0], allocation=design[1], groups=design[2], budget=budget)
        try:
            candidates.append(s4_candidate(f"design-{len(candidates)}", task_model, config))
        except UserError:  # this design cannot fit the budget (or tunes no layer of a small model)
            continue
    return candidates


def baselines(task_model: TaskModel, budget: float, names: list[str]) -> list[Candidate]:
    """LoRA (query, value) and Houlsby adapters at the largest size within the budget, and full fine-tuning."""
    limit = int(budget * count_parameters(task_model.backbone)[1])
    hidden, layers = task_model.module.config.hidden_size, len(task_model.layers())
    out = []
    for name in names:
        if name == "full":
            out.append(Candidate("full", "full", {}, "every weight", count_parameters(task_model.backbone)[1]))
        elif name == "lora":
            per_rank = sum(sum(linear_dims(task_model.module.get_submodule(t)))
                           for t in resolve_targets(task_model, ("query", "value")))
            if limit // per_rank >= 1:
                r = limit // per_rank
                out.append(Candidate("lora", "lora", {"r": r, "alpha": 2.0 * r}, f"r={r} on query,value", r * per_rank))
        elif name == "adapter":
            per_m, fixed = layers * 2 * (2 * hidden + 1), layers * 2 * hidden
            m = (limit - fixed) // per_m
            if m >= 1:
                out.append(Candidate("adapter", "adapter", {"bottleneck": m}, f"Houlsby m={m}", m * per_m + fixed))
        else:
            raise UserError(f"--baselines: unknown method '{name}' (lora, adapter, full)")
    return out


# ---- resumable training ----------------------------------------------------------------------------------

@dataclass
class Run:
    """What every candidate shares: the pristine model, the data, one batch order and one schedule."""

    pristine: TaskModel
    train: list[Encoded]
    validation: list[Encoded]
    config: TrainConfig
    total_steps: int
    order: list[list[int]]
    """Batch indices for steps 0..total_steps-1 (epochs of length-bucketed shuffles)."""


def build(candidate: Candidate, run: Run) -> tuple[TaskModel, Any, torch.optim.Optimizer]:
    """A fresh copy of the backbone with the candidate's method, tensors and optimizer state."""
    pristine = run.pristine
    task_model = replace(pristine, module=copy.deepcopy(pristine.module), head_names=list(pristine.head_names))
    method, config = resolve_method(candidate.method, candidate.options)
    seed_everything(run.config.seed)
    method.apply(task_model, config)
    if candidate.state is not None:
        task_model.module.load_state_dict(candidate.state, strict=False)
    lr = run.config.lr if run.config.lr is not None else method.default_lr(config)
    optimizer = build_optimizer(task_model.module, lr, run.config.weight_decay)
    if candidate.optimizer is not None:
        optimizer.load_state_dict(candidate.optimizer)
    return task_model, method, optimizer


def advance(candidate: Candidate, run: Run, until: int) -> float:
    """Train the candidate from its step count to `until`, score it on validation, keep its state."""
    task_model, _, optimizer = build(candidate, run)
    module, device = task_model.module, task_model.device()
    schedule = warmup_linear(run.total_steps, run.config.warmup_ratio)
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    for step in range(candidate.steps, until):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["initial_lr"], group["lr"] = base, base * schedule(step)
        batch = collate([run.train[i] for i in run.order[step]], task_model.tokenizer.pad_token_id, device)
        forward_batch(task_model, batch).loss.backward()
        if run.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    accuracy = evaluate(task_model, run.validation, run.config.eval_batch_size)["accuracy"]
    candidate.steps = until
    candidate.state = trainable_state(module)
    candidate.optimizer = copy.deepcopy(optimizer.state_dict())
    candidate.scores.append((until, accuracy))
    return accuracy


def test_accuracy(candidate: Candidate, run: Run, test: list[Encoded]) -> dict[str, float]:
    task_model, _, _ = build(candidate, run)
    return evaluate(task_model, test, run.config.eval_batch_size)


def successive_halving(candidates: list[Candidate], run: Run, eta: int, log) -> Candidate:
    """Rounds k = 0..K: survivors train to T / η^(K-k) steps; the best ceil(n/η) go on."""
    rounds = int(math.floor(math.log(len(candidates), eta) + 1e-9)) if len(candidates) > 1 else 0
    alive = list(candidates)
    for k in range(rounds + 1):
        until = max(1, run.total_steps // eta ** (rounds - k))
        log(f"\nround {k + 1}/{rounds + 1}: {len(alive)} designs to {until}/{run.total_steps} steps")
        for c in alive:
            start = time.perf_counter()
            accuracy = advance(c, run, until)
            log(f"  {c.name:<10} val acc {accuracy:.4f}  {c.params:>9,} params  {time.perf_counter() - start:6.1f} s"
                f"  {c.description}")
        alive.sort(key=lambda c: c.scores[-1][1], reverse=True)
        if k < rounds:
            keep = max(1, math.ceil(len(alive) / eta))
            log(f"  kept: {', '.join(c.name for c in alive[:keep])}; stopped: "
                f"{', '.join(c.name for c in alive[keep:]) or '-'}")
            alive = alive[:keep]
    return alive[0]


# ---- the command ---------------------------------------------------------------------------------------

def search(*, budget: str = "0.5%", trials: int = 8, eta: int = 2, out: str = "runs/search", data: TaskArgs,
           training: TrainConfig, model: str | None = None, baselines_: str = "lora,adapter,full",
           threads: int | None = None) -> int:
    """Search S4 designs under a trainable-parameter budget with successive halving; test the winner.

    Args:
        budget: Trainable parameters besides the head, as a share of the backbone: 0.5% or 0.005.
        trials: Designs to try (the paper's S4 design and random ones).
        eta: Successive-halving rate: each round keeps the best 1/eta and trains them eta times longer.
        out: Output folder for search.json and search.md: a new path, an empty folder, or a search run
            deltatune wrote; a file or any other folder is refused before the search.
        model: Hugging Face model folder or alias (default: the packaged all-MiniLM-L6-v2).
        baselines_: Methods trained at the same budget and steps for the final table (lora, adapter, full).
        threads: torch intra-op threads.
    """
    value = parse_budget(budget)
    claim_output(out, "search")
    if trials < 1 or eta < 2:
        raise UserError("--trials must be at least 1 and --eta at least 2")
    set_threads(threads)
    config = training.validate()
    data.default_to(DEFAULT_TASK, DEFAULT_SIZES)
    task = data.load(config.seed)
    if task.kind != "classification":
        raise UserError("search scores designs by validation accuracy: it needs a classification task")
    print(f"search: {task.summary()}; budget {100 * value:.3g}%, {trials} trials, eta {eta}", file=sys.stderr)
    pooling = resolve_pooling(model, "auto")  # as compare: MiniLM's own mean pooling (its BERT pooler is untrained)
    pristine = load_task_model(model, num_labels=len(task.label_names), device=pick_device(config.device),
                               seed=config.seed, pooling=pooling)
    pristine.label_names = list(task.label_names)
    rows = {split: encode(pristine.tokenizer, getattr(task, split), config.length_for(task.kind), split)
            for split in ("train", "validation", "test")}
    steps_per_epoch = math.ceil(len(rows["train"]) / config.batch_size)
    lengths = [len(r.input_ids) for r in rows["train"]]
    order = [b for epoch in range(1, config.epochs + 1)
             for b in train_batches(lengths, config.batch_size, seed=config.seed * 1000 + epoch)]
    run = Run(pristine, rows["train"], rows["validation"], config, steps_per_epoch * config.epochs, order)
    candidates = sample_candidates(pristine, trials, value, config.seed)
    limit = int(value * count_parameters(pristine.backbone)[1])
    print(f"budget: {limit:,} trainable parameters (+ the head); {len(candidates)} designs; "
          f"{run.total_steps} steps at most", file=sys.stderr)
    trace: list[str] = []

    def log(line: str) -> None:
        trace.append(line)
        print(line, file=sys.stderr)

    winner = successive_halving(candidates, run, eta, log)
    log(f"\nwinner: {winner.name}  {winner.description}")
    finalists = [winner]
    for base in baselines(pristine, value, [b.strip() for b in baselines_.split(",") if b.strip()]):
        log(f"baseline {base.name} ({base.description}): {run.total_steps} steps")
        advance(base, run, run.total_steps)
        finalists.append(base)
    for c in finalists:
        c.test = test_accuracy(c, run, rows["test"])
    table = final_table(finalists, pristine, value)
    report = {"task": task.name, "budget": value, "budget_params": limit, "trials": trials, "eta": eta,
              "total_steps": run.total_steps, "trace": trace, "winner": winner.name,
              "candidates": [candidate_json(c) for c in candidates], "final": [candidate_json(c) for c in finalists]}
    out_dir = run_folder(out, "search")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "search.json", report)
    write_text_atomic(out_dir / "search.md", f"# deltatune search: {task.summary()}\n\n```\n" + "\n".join(trace)
                      + "\n```\n\n" + table)
    print(table)
    print(f"results: {out_dir}/search.json, search.md")
    return 0


def candidate_json(c: Candidate) -> dict:
    return {"name": c.name, "method": c.method, "options": c.options, "description": c.description,
            "params": c.params, "scores": c.scores, "test": c.test}


def final_table(finalists: list[Candidate], pristine: TaskModel, budget: float) -> str:
    total = count_parameters(pristine.backbone)[1]
    lines = [f"budget {100 * budget:.3g}% of {total:,} backbone parameters; the head trains in every row",
             "", "| method | design | trainable params | % of backbone | validation acc | test acc |",
             "|---|---|---:|---:|---:|---:|"]
    for c in finalists:
        lines.append(f"| {c.name} | {c.description} | {c.params:,} | {100 * c.params / total:.3f} | "
                     f"{c.scores[-1][1]:.4f} | {c.test['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"

