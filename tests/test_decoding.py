"""deltatune's decode loop (`deltatune.decoding`): its KV cache against transformers' `generate`, mixed
batches whose rows join and leave against each row alone, seeded sampling, the ICL scorer's cache."""

from __future__ import annotations

import pytest
import tiny
import torch

from deltatune.backbone import load_task_model
from deltatune.decoding.loop import Decoder, Sampling, Sequence, decode
from deltatune.methods import resolve_method
from deltatune.methods.prefix import prefix_of
from deltatune.methods.prompt import soft_tokens_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)

OPTIONS = {"prompt": {"num_virtual_tokens": 3, "init": "random", "insert_at": "after_first"},
           "prefix": {"num_virtual_tokens": 4, "init": "random"}, "lora": {"r": 4}}
PROMPTS = [[5, 7, 25, 34], [5, 30, 31, 32, 33, 40, 41, 7, 8], [5]]


def lm_model(tiny_dir, kind: str, method: str | None, seed: int = 0):
    """A tiny LM (its own head) with `method` applied and every trained tensor moved off its start."""
    torch.manual_seed(seed)
    tm = load_task_model(tiny_dir(kind), 0, pooling="lm")
    if method is not None:
        module, config = resolve_method(method, OPTIONS.get(method, {}))
        module.apply(tm, config)
        tiny.perturb(tm.module, scale=0.5)
    tm.module.eval()
    return tm


def loop_greedy(tm, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Every prompt in one batch of the decode loop (EOS never stops it, as in `hf_greedy`)."""
    seqs = [Sequence(ids=p, soft_tokens=soft_tokens_of(tm.module), prefix=prefix_of(tm.module),
                     sampling=Sampling(max_new_tokens=steps)) for p in prompts]
    with Decoder(tm.backbone, head=tm.module.get_output_embeddings()) as decoder:
        return decode(decoder, seqs)


@torch.no_grad()
def hf_greedy(tm, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = tm.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [None, "lora", "prompt", "prefix", "ia3", "adapter"])
def test_greedy_equals_transformers_generate(tiny_dir, kind, method):
    tm = lm_model(tiny_dir, kind, method)
    got = loop_greedy(tm, PROMPTS, 8)  # three prompt lengths in one batch
    assert got == [hf_greedy(tm, p, 8) for p in PROMPTS]
    # the loop gives the model its attention back (a prefix model keeps deltatune's: its prefix needs it)
    assert tm.module.config._attn_implementation == ("deltatune_explicit" if method == "prefix" else "sdpa")


def test_sdpa_kernel_decodes_the_same(tiny_dir):
    """The kernel CUDA takes (torch's SDPA, grouped-query heads repeated) against the explicit one."""
    from deltatune.fast.attention import SDPA_NAME, explicit_kernel, register, sdpa_kernel

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    assert torch.allclose(explicit_kernel(q, k, v, mask, 0.3), sdpa_kernel(q, k, v, mask, 0.3), atol=1e-5)
    tm = lm_model(tiny_dir, "llama", "prefix")
    register()
    tm.module.set_attn_implementation(SDPA_NAME)
    assert loop_greedy(tm, PROMPTS, 6) == [hf_greedy(tm, p, 6) for p in PROMPTS]


def test_cache_grows_and_rows_leave(tiny_dir):
    """Geometric growth past the first capacity and compaction when rows finish keep every row exact."""
    tm = lm_model(tiny_dir, "llama", "lora")
    long = list(range(5, 75))  # 70 tokens: past the 64 slots the cache starts with
    with Decoder(tm.backbone, head=tm.module.get_output_embeddings()) as decoder:
        seqs = [decoder.add(Sequence(ids=p, sampling=Sampling(max_new_tokens=n)))
                for p, n in ((long, 6), (PROMPTS[0], 2), (PROMPTS[1], 4))]
        decoder.step()
        assert decoder.cache.capacity >= 128 and decoder.cache.rows == 3
        decoder.step()
        assert decoder.cache.rows == 2  # the 2-token row has left
        decoder.run()
        assert decoder.cache.rows == 0
    assert [s.new for s in seqs] == [hf_greedy(tm, p, n) for p, n in ((long, 6), (PROMPTS[0], 2), (PROMPTS[1], 4))]


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    """A serve engine over tiny Llama with a LoRA, a prompt, a prefix, an IA3 and an adapter delta."""
    from test_serve_engine import make_delta

    from deltatune.serve.engine import Engine

    model = tiny_dir("llama")
    root = tmp_path_factory.mktemp("deltas")
    engine = Engine(model, device="cpu")
    for seed, method in enumerate(["lora", "prompt", "prefix", "ia3", "adapter"]):
        engine.add_task(method, make_delta(root / method, model, method, OPTIONS.get(method), pooling="lm",
                                           labels=(), kind="generation", seed=seed))
    return engine


def served(engine, task: str | None, prompt: list[int], sampling: Sampling) -> Sequence:
    """A row of `task`'s delta (None: the bare backbone, read through the LoRA task's LM head)."""
    t = engine.tasks.get(task)
    return Sequence(ids=prompt, task=task, sampling=sampling, soft_tokens=t and t.soft_tokens,
                    prefix=t and t.prefix, head=(t or engine.tasks["lora"]).top.get_output_embeddings())


def alone(engine, seq: Sequence) -> list[int]:
    with Decoder(engine.mixed, routers=engine.routers.values()) as decoder:
        return decode(decoder, [served(engine, seq.task, seq.ids, seq.sampling)])[0]


def test_mixed_rows_join_and_leave_and_match_each_row_alone(engine):
    plan = [("lora", PROMPTS[0], 5), ("prefix", PROMPTS[1], 3), ("prompt", PROMPTS[2], 7), (None, PROMPTS[1], 4),
            ("ia3", PROMPTS[0], 6), ("adapter", PROMPTS[1], 5), ("prefix", PROMPTS[0], 4), ("prompt", PROMPTS[1], 2)]
    seqs = [served(engine, task, p, Sampling(max_new_tokens=n)) for task, p, n in plan]
    with Decoder(engine.mixed, routers=engine.routers.values()) as decoder:
        for s in seqs[:4]:
            decoder.add(s)
        decoder.step()
        decoder.step()
        for s in seqs[4:]:  # join while the first rows are running
            decoder.add(s)
        rows = []
        while decoder.busy:
            decoder.step()
            rows.append(decoder.cache.rows)
    assert rows[-1] == 0 and len(set(rows)) > 2  # rows left at different steps
    for s, (task, _, n) in zip(seqs, plan):
        assert len(s.new) == n and s.new == alone(engine, s), task


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    hot = Sampling(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=3)
    mates = [served(engine, t, p, Sampling(max_new_tokens=4, temperature=1.0, seed=9 + i))
             for i, (t, p) in enumerate([("lora", PROMPTS[1]), ("prefix", PROMPTS[2]), (None, PROMPTS[0])])]
    row = served(engine, "prompt", PROMPTS[0], hot)
    with Decoder(engine.mixed, routers=engine.routers.values()) as decoder:
        decode(decoder, [mates[0], row, *mates[1:]])
    assert row.new == alone(engine, row)
    other = alone(engine, served(engine, "prompt", PROMPTS[0], Sampling(max_new_tokens=6, temperature=1.5,
                                                                        top_p=0.95, seed=4)))
    greedy = alone(engine, served(engine, "prompt", PROMPTS[0], Sampling(max_new_tokens=6)))
    assert row.new != other or row.new != greedy  # the seed and the temperature matter


def test_icl_scorer_with_the_cache_equals_full_prompts(tiny_dir):
    from deltatune.notune.scoring import LabelScorer, load_language_model

    lm = load_language_model(tiny_dir("gpt2"))
    labels, prefix = [[10], [11, 12]], [5, 20, 21, 22, 23, 10, 24, 25, 11, 12]
    queries = [[30, 31], [32], [33, 34, 35, 36]]
    cached = LabelScorer(lm, labels, batch_size=2).score(prefix, queries)
    full = LabelScorer(lm, labels, use_cache=False).score(prefix, queries)
    assert torch.allclose(cached, full, atol=1e-4)
