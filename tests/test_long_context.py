"""Long sequences (issue 15): checkpointing chosen by memory, and what must keep working with deltatune's
blockwise attention and chunked LM loss (the frozen-prefix cache, gradient checkpointing, --compile)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny import assert_same_with_grads, reference_attention

from deltatune import fast
from deltatune.backbone import load_task_model
from deltatune.caching import FrozenPrefixCache, frozen_prefix_depth
from deltatune.config import TrainConfig
from deltatune.errors import UserError
from deltatune.fast import attention as attention_impl
from deltatune.fast import blockwise, heap
from deltatune.fast.lm_loss import IGNORE
from deltatune.fast.precision import is_projection
from deltatune.memory import rss_mb
from deltatune.methods import resolve_method
from deltatune.train import gradient_checkpointing


def test_blockwise_skips_the_causal_upper_triangle_exactly(monkeypatch):
    """Small blocks (16 query rows): each block reads only the keys up to its last row, with a row whose keys are
    all masked (left padding) keeping every key, as the unblocked softmax does; outputs and gradients agree."""
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 16 * 4 * 64)
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 4, 2, 64, 8
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, hk, t, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    allowed = torch.ones(t, t).tril().bool().expand(b, 1, t, t).clone()  # (B, 1, T, Tk)
    allowed[1, :, :, :5] = False  # row 1 is left-padded by 5: its first 5 queries attend nothing
    mask = torch.zeros(b, 1, t, t, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    assert blockwise.block_span(mask[..., :16, :].unsqueeze(2), t) == (0, t)  # fully masked rows: every key
    assert blockwise.block_span(mask[:1, ..., :16, :].unsqueeze(2), t) == (0, 16)  # causal: up to the last row
    assert_same_with_grads(blockwise.blockwise_attention(q, k, v, mask, 0.3), reference_attention(q, k, v, mask, 0.3),
                           (q, k, v))


def lora_model(tiny_dir, kind="llama", pooling="lm", **options):
    torch.manual_seed(0)
    tm = load_task_model(tiny_dir(kind), num_labels=0 if pooling == "lm" else 2, pooling=pooling)
    method, config = resolve_method("lora", {"target_modules": "query,value,ffn_out", **options})
    method.apply(tm, config)
    with torch.no_grad():  # B away from 0, so every LoRA matrix gets a gradient
        for name, p in tm.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return tm, method, config


def lm_batch(length=24, rows=2):
    ids = torch.randint(7, 99, (rows, length))
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE  # an instruction row: only the answer half is scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "keys": None}


def step_grads(tm, batch, layers=None, checkpointing=False, cache=None):
    params = {n: p for n, p in tm.module.named_parameters() if p.requires_grad}
    with gradient_checkpointing(tm, checkpointing, layers):
        flags = [layer.gradient_checkpointing for layer in tm.layers()]
        tm.module.train()
        loss = fast.training_forward(tm, cache)(batch).loss
        grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True)), flags


@pytest.fixture
def blockwise_everywhere(monkeypatch):
    """Every training attention goes through the blockwise kernel (at these tiny lengths too)."""
    monkeypatch.setattr(attention_impl, "BLOCKWISE_MIN", 1)
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64)  # several query blocks per sequence


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_checkpointing_part_of_the_layers_gives_the_same_gradients(tiny_dir, blockwise_everywhere):
    """--gradient-checkpointing on, and partial (the lowest layer only), with blockwise attention and the chunked
    loss: the same loss and gradients as no checkpointing; the flags are switched off again after."""
    tm, _, _ = lora_model(tiny_dir)
    info = fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    assert info.lm_loss == "chunked" and info.attention == "explicit"
    batch = lm_batch()
    calls = [0, 0]
    leaves = [next(m for m in layer.modules() if m in tm.loaded_modules and is_projection(m))
              for layer in tm.layers()]  # a projection inside each layer: its hook also sees the recomputation
    hooks = [leaf.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, leaf in enumerate(leaves)]
    loss, plain, _ = step_grads(tm, batch)
    assert calls == [1, 1]
    for layers, flags in ((None, [True, True]), (1, [True, False])):
        calls[:] = [0, 0]
        checkpointed_loss, grads, seen = step_grads(tm, batch, layers, checkpointing=True)
        assert seen == flags and calls == [1 + f for f in flags]  # recomputed in backward where checkpointed
        torch.testing.assert_close(checkpointed_loss, loss)
        assert_same(grads, plain)
    assert not any(layer.gradient_checkpointing for layer in tm.layers())
    for hook in hooks:
        hook.remove()
    fast.restore(tm)


def test_blockwise_and_chunked_match_transformers_own_path(tiny_dir, blockwise_everywhere):
    tm, _, _ = lora_model(tiny_dir)
    batch = lm_batch()
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    ours = step_grads(tm, batch)
    fast.restore(tm)
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0", attention="model"))
    theirs = step_grads(tm, batch)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert_same(ours[1], theirs[1])


def test_the_frozen_prefix_cache_with_blockwise_attention_and_the_chunked_loss(tiny_dir, blockwise_everywhere):
    """LoRA on the top layer only: the bottom layer's output comes from the cache, the top layer runs the
    blockwise kernel and the chunked loss; gradients as without the cache, checkpointed or not."""
    tm, _, _ = lora_model(tiny_dir, layers=(1,))
    assert frozen_prefix_depth(tm) == 1
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    batch = lm_batch()
    cache = FrozenPrefixCache(tm, 1)
    tm.module.eval()
    cache.add({k: v for k, v in batch.items() if k != "labels"} | {"keys": ["a", "b"]})
    batch = {**batch, "keys": ["a", "b"]}
    loss, plain, _ = step_grads(tm, batch)
    for checkpointing in (False, True):
        cached_loss, cached, _ = step_grads(tm, batch, checkpointing=checkpointing, cache=cache)
        torch.testing.assert_close(cached_loss, loss)
        assert_same(cached, plain)
    fast.restore(tm)


@pytest.mark.slow
def test_compile_with_blockwise_attention_and_the_chunked_loss(tiny_dir, blockwise_everywhere):
    tm, _, _ = lora_model(tiny_dir)
    batch = lm_batch(length=32)
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0"))
    loss, plain, _ = step_grads(tm, batch)
    fast.restore(tm)
    fast.prepare_for_training(tm, TrainConfig(precision="fp32", dropout="0", compile=True))
    compiled_loss, compiled, _ = step_grads(tm, batch)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    assert_same(compiled, plain)


# --- --gradient-checkpointing off|on|auto, --max-memory -------------------------------------------------------

def test_auto_checkpoints_fewer_layers_as_the_budget_grows(tiny_dir):
    from deltatune.estimate.budget import checkpointed_layers, run_estimator

    tm, method, config = lora_model(tiny_dir)
    fast.prepare_for_training(tm, TrainConfig(precision="fp32"))
    train = TrainConfig(batch_size=16, max_length=256, gradient_checkpointing="auto", precision="fp32")
    estimate, layers = run_estimator(tm, "lora", config, train)
    needs = [estimate(k).total_gb * 1024 for k in range(layers + 1)]  # MB with the k lowest layers checkpointed
    assert layers == 2 and needs[0] > needs[1] >= needs[2]  # (checkpointing the top layer alone saves nothing)
    budgets = [needs[2] * 0.5, needs[1], (needs[0] + needs[1]) / 2, needs[0], needs[0] * 2]
    counts = [checkpointed_layers(tm, "lora", config, TrainConfig(**{**vars(train), "max_memory": budget}))
              for budget in budgets]
    assert counts == [2, 1, 1, 0, 0]  # none fits: every layer; then the fewest that fit
    fast.restore(tm)


def test_the_checkpointing_flag_and_its_config_values():
    from deltatune.cli import make_parser
    from deltatune.cliargs import parse_command_line

    parser = make_parser()

    def parsed(*flags):
        namespace = parse_command_line(parser, ["train", "--out", "x", *flags])
        return vars(namespace)["training.gradient_checkpointing"], vars(namespace)["training.max_memory"]

    assert parsed() == ("off", None)
    assert parsed("--gradient-checkpointing") == ("on", None)  # the bare flag still means on
    assert parsed("--gradient-checkpointing", "--lr", "0.1") == ("on", None)
    assert parsed("--gradient-checkpointing", "auto", "--max-memory", "900") == ("auto", 900.0)
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "on"  # a config file's true
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    with pytest.raises(UserError, match="--gradient-checkpointing must be one of: off, on, auto") as info:
        TrainConfig(gradient_checkpointing="sometimes").validate()
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="--max-memory"):
        TrainConfig(max_memory=0).validate()


def test_the_training_loop_checkpoints_what_auto_chooses(tiny_dir, toy_csv, capsys):
    from deltatune.batching import encode
    from deltatune.data import load_task
    from deltatune.train import train_model

    task = load_task(data=toy_csv, train_size=16, val_size=8, test_size=8)
    losses = {}
    for budget in (0.001, 10_000.0):  # MB: nothing fits (every layer), everything fits (none)
        tm, method, config = lora_model(tiny_dir, pooling="last")
        train, validation = (encode(tm.tokenizer, getattr(task, s), 32, s) for s in ("train", "validation"))
        result = train_model(tm, method, config, train, validation,
                             TrainConfig(epochs=1, batch_size=16, progress=False, gradient_checkpointing="auto",
                                         max_memory=budget))
        losses[budget] = result.history[-1]["train_loss"]
        assert not any(layer.gradient_checkpointing for layer in tm.layers())
    err = capsys.readouterr().err
    assert "even with every layer checkpointed" in err and "0 of 2 layers checkpointed" in err
    assert losses[0.001] == pytest.approx(losses[10_000.0], abs=1e-5)


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the file `path` (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(path):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_bf16_path_lets_the_checkpoint_mapping_go(tiny_dir):
    """A safetensors checkpoint is memory-mapped: while one fp32 norm vector points into the file, the whole
    file stays resident next to the bf16 copies (513 MB for SmolLM2). After `prepare` no tensor does."""
    tm, _, _ = lora_model(tiny_dir)
    file = str(Path(tiny_dir("llama")).resolve() / "model.safetensors")

    def in_file() -> list[str]:
        ranges = mapped_ranges(file)
        return [name for name, t in [*tm.module.named_parameters(), *tm.module.named_buffers()]
                if any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]

    assert any("norm" in name for name in in_file())  # loaded memory-mapped
    before = {name: p.detach().clone() for name, p in tm.module.named_parameters()}
    fast.prepare(tm, precision="bf16")
    assert in_file() == []
    fast.restore(tm)
    for name, p in tm.module.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.skipif(heap._trim() is None, reason="glibc's malloc_trim")
def test_release_freed_returns_the_holes_a_step_left():
    big = torch.ones(16 << 20, dtype=torch.uint8)  # freed: glibc's mmap threshold rises to 16 MB
    del big
    blocks, pins = [], []
    for _ in range(32):  # 2 MB blocks from the heap, each followed by a live one
        blocks.append(torch.ones(2 << 20, dtype=torch.uint8))
        pins.append(torch.ones(1 << 18))  # 1 MB
    del blocks  # 64 MB of holes between live tensors: freed, still resident
    before = rss_mb()
    assert heap.release_freed()
    assert before - rss_mb() > 32
    assert all(bool((p == 1).all()) for p in pins)


def test_each_long_training_forward_on_the_cpu_first_releases_the_freed_heap(tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "release_freed", lambda: calls.append(1) or heap.release_freed())
    tm, _, _ = lora_model(tiny_dir)
    fast.prepare(tm, precision="bf16")
    forward = fast.training_forward(tm)
    for width, n in ((fast.RELEASE_MIN_WIDTH, 1), (fast.RELEASE_MIN_WIDTH, 2), (12, 2)):  # short rows: no trim
        ids = torch.randint(5, 90, (1, width))
        forward({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).loss.backward()
        assert len(calls) == n
    fast.restore(tm)
