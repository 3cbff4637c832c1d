"""Serving engine: a mixed-task batch gives every row the logits its task gives alone, for every method pair.

Deltas are random (every trained tensor perturbed, so LoRA's B, adapters' Up, IA³'s ones are not at
their identity values) on tiny random models; the reference is `load_delta` + the task model's forward
on that task's rows alone.
"""

from __future__ import annotations

import itertools
import random
import threading
from pathlib import Path

import pytest
import torch

from deltatune.backbone import arch_for, load_task_model
from deltatune.batching import collate, encode
from deltatune.data import Example
from deltatune.delta import save_delta
from deltatune.errors import UserError
from deltatune.generation import prompt_ids
from deltatune.loading import load_delta
from deltatune.methods import method_names, resolve_method
from deltatune.serve.engine import Engine, UnknownTask
from deltatune.serve.generate import decode_mixed
from deltatune.serve.task import BackboneMismatch

TOL = 1e-4
TEXTS = ["good movie", "the plot was very dull and boring and the actor was weak", "a",
         "great great film with the music and the cast", "bad", "it is not so good but the ending was fine"]
OPTIONS: dict[str, dict] = {
    "prompt": {"num_virtual_tokens": 3, "init": "random"},
    "ptuning": {"num_virtual_tokens": 4},
    "prefix": {"num_virtual_tokens": 4, "init": "random"},
    "mam": {"num_virtual_tokens": 2, "prefix_init": "random", "encoder_hidden_size": 16},
    "adalora": {"init_r": 4, "target_r": 2},
}
PER_ROW = {"features", "head", "lora", "adalora", "ia3", "adapter", "prompt", "ptuning", "prefix", "mam", "dora",
           "vera", "loha", "lokr"}
"""Methods whose deltas join the mixed pass (row sites / a row input); the others change shared weights."""
NOT_SERVED = {"icl", "knn"}  # predict through their own pipelines, not a model pass
METHODS = [m for m in method_names() if m not in NOT_SERVED]
# a second delta of some methods: other options, pooling and label count, so that a pair of the same
# method still differs in rank / prompt length / placement / head
VARIANTS: dict[str, tuple[str, dict, str, tuple[str, ...]]] = {
    "lora_b": ("lora", {"r": 4, "target_modules": "query,key,value,ffn_out"}, "mean", ("x", "y", "z")),
    "prompt_b": ("prompt", {"num_virtual_tokens": 6, "init": "random", "insert_at": "after_first"}, "mean",
                 ("x", "y", "z")),
    "prefix_b": ("prefix", {"num_virtual_tokens": 2}, "mean", ("x", "y", "z")),
    "adapter_b": ("adapter", {"parallel": True, "activation": "gelu"}, "mean", ("x", "y", "z")),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


def make_delta(out: Path, model: str, method: str, options: dict | None = None, pooling: str = "hf",
               labels: tuple[str, ...] = ("neg", "pos"), kind: str = "classification", seed: int = 0) -> Path:
    """A delta with every trained tensor moved away from its initial value (seeded)."""
    module, config = resolve_method(method, dict(options or OPTIONS.get(method, {})))
    if hasattr(module, "pooling_for") and pooling != "lm":
        from transformers import AutoConfig

        pooling = module.pooling_for(pooling, arch_for(AutoConfig.from_pretrained(model)))
    task_model = load_task_model(model, num_labels=len(labels), pooling=pooling)
    task_model.label_names = list(labels)
    module.apply(task_model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task_model.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    meta = {"task": {"name": out.name, "kind": kind, "label_names": list(labels)},
            "train_config": {"max_length": 32}, "metrics": {"accuracy": 0.75}, "head_names": task_model.head_names}
    save_delta(out, task_model, module, config, meta)
    return out


@torch.no_grad()
def reference_logits(path: Path, model: str, texts: list[str]) -> torch.Tensor:
    """The task alone: its delta loaded the ordinary way, its rows in one batch."""
    loaded = load_delta(path, model=model)
    tokenizer = loaded.task_model.tokenizer
    rows = encode(tokenizer, [Example(text=t) for t in texts], 32)
    batch = collate(rows, tokenizer.pad_token_id)
    batch.pop("keys")
    return loaded.task_model.module(**batch).logits.float()


class Served:
    """An engine with one task per method (and the variants), plus each task's reference logits."""

    def __init__(self, root: Path, model: str, kind: str):
        self.model, self.paths = model, {}
        specs = {m: (m, OPTIONS.get(m, {}), "hf", ("neg", "pos")) for m in METHODS}
        specs.update(VARIANTS)
        for seed, (name, (method, options, pooling, labels)) in enumerate(specs.items()):
            if kind == "llama" and method == "bitfit":
                continue  # Llama has no biases
            self.paths[name] = make_delta(root / f"{kind}-{name}", model, method, options, pooling, labels,
                                          seed=seed)
        self.engine = Engine(model, device="cpu")
        self.before = {k: v.clone() for k, v in self.engine.shared.module.state_dict().items()}
        for name, path in self.paths.items():
            self.engine.add_task(name, path)
        self.reference = {name: reference_logits(path, model, TEXTS) for name, path in self.paths.items()}

    def check(self, names: list[str], seed: int = 0) -> dict[str, float]:
        """Classify an interleaved batch of every text for each task; worst |logit - reference| per task."""
        items = [(name, i) for name in names for i in range(len(TEXTS))]
        random.Random(seed).shuffle(items)
        results = self.engine.classify([(name, TEXTS[i]) for name, i in items])
        worst: dict[str, float] = {}
        for (name, i), result in zip(items, results):
            assert not isinstance(result, Exception), (name, result)
            diff = (torch.tensor(result["logits"]) - self.reference[name][i]).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
        return worst


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    return Served(tmp_path_factory.mktemp("serve-bert"), tiny_dir("bert"), "bert")


PAIRS = list(itertools.combinations(METHODS, 2)) + [(m, f"{m}_b") for m in ("lora", "prompt", "prefix", "adapter")]


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_mixed_pair_equals_each_task_alone(served, pair):
    worst = served.check(list(pair), seed=len(pair[0]) * 31 + len(pair[1]))
    assert max(worst.values()) <= TOL, worst


def test_every_task_in_one_batch_and_groups_visible(served):
    worst = served.check(list(served.paths), seed=1)
    assert max(worst.values()) <= TOL, worst
    record = served.engine.stats.last
    groups = dict(record.groups)
    groups["shared"] = sum(n for g, n in record.groups if g == "shared")  # passes of similar lengths
    engine_tasks = served.engine.tasks
    own = {n for n, t in engine_tasks.items() if t.group == "own"}
    per_row = {n for n, t in engine_tasks.items() if t.method in PER_ROW and n != "last2"}  # unfrozen layers
    assert own == set(engine_tasks) - per_row, {n: t.reason for n, t in engine_tasks.items()}
    assert {"full", "bitfit", "last2"} <= own and all(engine_tasks[n].reason for n in own)
    assert engine_tasks["bitfit"].reason == "its delta changes backbone weights"
    assert set(groups) == {"shared"} | {f"own:{n}" for n in own}
    assert groups["shared"] == len(TEXTS) * (len(served.paths) - len(own))  # mixed passes for all the others
    assert record.tasks == len(served.paths)


def test_backbone_never_modified(served):
    served.check(["bitfit", "lora", "full", "last2", "prompt"], seed=2)
    after = served.engine.shared.module.state_dict()
    assert all(torch.equal(served.before[k], after[k]) for k in served.before)
    assert served.engine.backbone_fingerprint() == served.engine.fingerprint


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_families_mixed(tiny_dir, tmp_path, kind):
    model = tiny_dir(kind)
    names = ["lora", "prompt", "prefix", "ia3", "adapter", "adalora", "head", "full", "bitfit"]
    names = [n for n in names if not (kind == "llama" and n == "bitfit")]
    paths = {n: make_delta(tmp_path / n, model, n, pooling="hf" if i % 2 else "last", seed=i)
             for i, n in enumerate(names)}
    engine = Engine(model, device="cpu")
    for name, path in paths.items():
        engine.add_task(name, path)
    items = [(n, t) for n in names for t in TEXTS]
    random.Random(3).shuffle(items)
    results = engine.classify(items)
    reference = {n: reference_logits(p, model, TEXTS) for n, p in paths.items()}
    for (name, text), result in zip(items, results):
        diff = (torch.tensor(result["logits"]) - reference[name][TEXTS.index(text)]).abs().max().item()
        assert diff <= TOL, (name, text, diff)


def test_fingerprint_mismatch_refused(served, tiny_dir, tmp_path):
    other = make_delta(tmp_path / "other", tiny_dir("bert", seed=1), "lora")
    with pytest.raises(BackboneMismatch, match="different backbone"):
        served.engine.add_task("other", other)
    assert "other" not in served.engine.tasks


def test_not_a_delta_refused(served, tmp_path):
    with pytest.raises(UserError, match="not a deltatune delta"):
        served.engine.add_task("nothing", tmp_path)


def test_hot_add_remove_while_serving(served, tmp_path):
    """Batches keep running while a task is added and removed; the other tasks' answers never change."""
    path = make_delta(tmp_path / "extra", served.model, "lora", {"r": 2}, seed=42)
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic():
        try:
            while not stop.is_set():
                assert max(served.check(["lora", "prompt", "bitfit"], seed=5).values()) <= TOL
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(3):
            served.engine.add_task("extra", path)
            out = served.engine.classify([("extra", "good"), ("lora", "good")])
            assert all(not isinstance(r, Exception) for r in out)
            served.engine.remove_task("extra")
            out = served.engine.classify([("extra", "good"), ("lora", "good")])
            assert isinstance(out[0], UnknownTask) and not isinstance(out[1], Exception)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors


def test_one_failing_task_does_not_fail_the_others(served, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("corrupt delta")

    monkeypatch.setattr(served.engine.tasks["lora_b"].view, "forward", broken)
    monkeypatch.setattr(served.engine.tasks["lora_b"].top, "forward", broken)
    items = [("lora", TEXTS[0]), ("lora_b", TEXTS[1]), ("prompt", TEXTS[2]), ("bitfit", TEXTS[3])]
    results = served.engine.classify(items)
    assert isinstance(results[1], RuntimeError)
    for (name, text), result in zip(items, results):
        if name != "lora_b":
            diff = (torch.tensor(result["logits"]) - served.reference[name][TEXTS.index(text)]).abs().max()
            assert diff <= TOL
    assert any(group.startswith("retry:") for group, _ in served.engine.stats.last.groups)


@torch.no_grad()
def greedy_alone(module, ids: list[int], steps: int, eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference decoding: the task's own model, the whole sequence recomputed every step, no cache."""
    x, new, logits = torch.tensor([ids]), [], []
    for _ in range(steps):
        last = module(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
        logits.append(last)
        new.append(int(last.argmax()))
        if new[-1] == eos:
            break
        x = torch.cat([x, torch.tensor([[new[-1]]])], dim=1)
    return new, logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_generation_equals_each_task_alone(tiny_dir, tmp_path, kind):
    model = tiny_dir(kind)
    methods = ["lora", "prompt", "ia3", "adapter", "prefix", "full"]
    paths = {m: make_delta(tmp_path / m, model, m, pooling="lm", labels=(), kind="generation", seed=i)
             for i, m in enumerate(methods)}
    paths["prompt_b"] = make_delta(tmp_path / "prompt_b", model, "prompt", VARIANTS["prompt_b"][1], pooling="lm",
                                   labels=(), kind="generation", seed=9)
    engine = Engine(model, device="cpu")
    for name, path in paths.items():
        engine.add_task(name, path)
    tokenizer = engine.shared.tokenizer
    prompts = ["good movie", "the plot was very dull and boring and so on", "hi"]
    items = [(name, text, 6) for name in paths for text in prompts]
    random.Random(4).shuffle(items)
    replies = engine.generate(items)
    references = {name: load_delta(path, model=model).task_model.module for name, path in paths.items()}
    for (name, text, steps), reply in zip(items, replies):
        new, _ = greedy_alone(references[name], prompt_ids(tokenizer, text), steps, tokenizer.eos_token_id)
        assert reply == {"task": name, "text": tokenizer.decode(new, skip_special_tokens=True).strip()}, name
    # the logits of every step of a mixed batch (LoRA, soft prompts of two lengths, IA3, adapters)
    shared = [engine.tasks[n] for n in ("adapter", "ia3", "lora", "prompt", "prompt_b") for _ in prompts]
    ids = [prompt_ids(tokenizer, p) for _ in range(5) for p in prompts]
    step_logits: list[torch.Tensor] = []
    with torch.no_grad():
        mixed = decode_mixed(engine, shared, ids, [5] * len(ids), step_logits)
    for b, task in enumerate(shared):
        new, logits = greedy_alone(references[task.name], ids[b], 5, tokenizer.eos_token_id)
        assert mixed[b] == new
        for step, expected in enumerate(logits):
            assert (step_logits[step][b] - expected).abs().max() <= TOL


def test_verbalizer_objective_served(tiny_dir, tmp_path):
    """PET / LM-BFF deltas: texts go through the task's template, the head is the LM head's label words."""
    from deltatune.data.templates import prompt_spec
    from deltatune.label_head import attach_label_head

    model = tiny_dir("gpt2")
    paths = {}
    for seed, method in enumerate(("lora", "prompt")):
        task_model = load_task_model(model, 2, "last")
        task_model.label_names = ["neg", "pos"]
        spec = prompt_spec("toy", ["neg", "pos"], "", "Review: {text} Sentiment: {label}", "neg=bad,pos=good")
        prompt_meta = attach_label_head(task_model, spec.to_dict())
        module, config = resolve_method(method, OPTIONS.get(method, {}))
        module.apply(task_model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in task_model.module.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        meta = {"task": {"name": method, "kind": "classification", "label_names": ["neg", "pos"]},
                "train_config": {"max_length": 32}, "head_names": [], "prompt": prompt_meta}
        paths[method] = save_delta(tmp_path / method, task_model, module, config, meta)
    engine = Engine(model, device="cpu")
    for name, path in paths.items():
        assert engine.add_task(name, path).group == "shared"
    items = [(name, text) for text in TEXTS for name in paths]
    results = engine.classify(items)
    for name, path in paths.items():
        reference = reference_logits(path, model, TEXTS)
        got = torch.tensor([r["logits"] for (n, _), r in zip(items, results) if n == name])
        assert (got - reference).abs().max() <= TOL


def test_one_pass_or_length_buckets_same_logits(served):
    engine = served.engine
    items = [(name, text) for name in ("lora", "prompt_b", "prefix", "adapter_b") for text in TEXTS]
    bucketed = engine.classify(items)
    assert sum(g == "shared" for g, _ in engine.stats.last.groups) >= 1
    engine.pass_overhead_tokens = None
    try:
        single = engine.classify(items)
        assert [g for g, _ in engine.stats.last.groups] == ["shared"]
    finally:
        engine.pass_overhead_tokens = 128
    for a, b in zip(bucketed, single):
        assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"])) <= TOL
