"""prompt, prefix, ptuning on tiny random BERT / Llama (GQA: 4 heads, 2 kv heads) / GPT-2."""

import sys
import warnings

import pytest
import tiny
import torch

from deltatune.backbone import load_task_model
from deltatune.batching import collate, encode
from deltatune.caching import frozen_prefix_depth
from deltatune.data import Example
from deltatune.delta import save_delta
from deltatune.errors import UserError
from deltatune.loading import load_delta
from deltatune.methods import prefix as prefix_method
from deltatune.methods import resolve_method

sys.path.insert(0, __file__.rsplit("/", 1)[0])

METHODS = ["prompt", "prefix", "ptuning"]
KINDS = ["bert", "llama", "gpt2"]
SMALL = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
         "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}}
TEXTS = ["good movie", "the plot was awful and dull", "a film"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


def prepared(tiny_dir, name, kind, pooling="hf", num_labels=2, **options):
    tm = load_task_model(tiny_dir(kind), num_labels=num_labels, pooling=pooling)
    tm.label_names = ["bad", "good"][:num_labels]
    method, config = resolve_method(name, {**SMALL[name], **options})
    method.apply(tm, config)
    return tm, method, config


def inputs(tm, texts=TEXTS):
    return dict(tm.tokenizer(texts, padding=True, return_tensors="pt"))


def logits(tm, batch):
    tm.module.eval()
    with torch.no_grad():
        return tm.module(**batch).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_only_the_method_and_the_head_train_and_nothing_is_cached(tiny_dir, name, kind):
    tm, _, _ = prepared(tiny_dir, name, kind)
    trainable = {n for n, p in tm.module.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("prompt_encoder.default.")}
    assert {n for n in trainable if not n.startswith("prompt_encoder.")} == set(tm.head_names)
    assert frozen_prefix_depth(tm) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_save_load_gives_the_same_logits(tiny_dir, tmp_path, name, kind):
    tm, method, config = prepared(tiny_dir, name, kind, pooling="hf" if kind != "gpt2" else "mean")
    tiny.perturb(tm.module)
    batch = inputs(tm)
    before = logits(tm, batch)
    out = save_delta(tmp_path / "d", tm, method, config, {"head_names": tm.head_names})
    loaded = load_delta(out)
    assert torch.allclose(logits(loaded.task_model, batch), before, atol=1e-5)
    if name != "prompt":  # folded: the reparametrisation is not saved
        assert not any(k for k in loaded.task_model.module.state_dict() if "transform" in k or "_head" in k)


def toy_losses(tm, lr, steps):
    rows = encode(tm.tokenizer, [Example(text=t, label=int(y == "pos")) for t, y in tiny.toy_sentiment_rows(64)],
                  32)
    optimizer = torch.optim.AdamW([p for p in tm.module.parameters() if p.requires_grad], lr=lr)
    tm.module.train()
    losses = []
    for step in range(steps):
        batch = collate(rows[(step % 4) * 16:(step % 4 + 1) * 16], tm.tokenizer.pad_token_id)
        batch.pop("keys")
        loss = tm.module(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return sum(losses[:4]) / 4, sum(losses[-4:]) / 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_loss_drops_on_toy_data(tiny_dir, name, kind):
    # tiny random BERT: its pooler's tanh over one token learns too slowly in 50 steps; mean pooling does
    torch.manual_seed(0)
    tm, _, _ = prepared(tiny_dir, name, kind, pooling="mean" if kind == "bert" else "hf")
    first, last = toy_losses(tm, lr=3e-2, steps=50)
    assert last < 0.85 * first


def test_the_prefix_alone_learns(tiny_dir):
    """The head frozen at its random start: only the prefix can lower the loss."""
    torch.manual_seed(0)
    tm, _, _ = prepared(tiny_dir, "prefix", "llama")
    for name in tm.head_names:
        tm.module.get_parameter(name).requires_grad_(False)
    first, last = toy_losses(tm, lr=0.1, steps=50)
    assert last < 0.9 * first


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, name, kind):
    tm, _, _ = prepared(tiny_dir, name, kind)
    tiny.perturb(tm.module.prompt_encoder)
    batch = {**inputs(tm), "labels": torch.tensor([0, 1, 1])}
    plain, checkpointed = tiny.prompt_encoder_grads(tm, batch, False), tiny.prompt_encoder_grads(tm, batch, True)
    assert plain and plain.keys() == checkpointed.keys()
    for key in plain:
        assert plain[key].abs().sum() > 0
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


def test_prefix_refuses_reentrant_checkpointing(tiny_dir):
    tm, _, _ = prepared(tiny_dir, "prefix", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tm.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tm.module.train()
    with pytest.raises(UserError, match="non-reentrant"):
        tm.module(**inputs(tm), labels=torch.tensor([0, 1, 1]))


def test_prefix_with_grouped_query_attention_starts_from_real_words(tiny_dir):
    tm, method, config = prepared(tiny_dir, "prefix", "llama")  # 4 query heads share 2 kv heads
    folded = method.delta_state(tm, config)[prefix_method.PREFIX_KEY]
    assert folded.shape == (2, 2, 4, 2 * 8)  # (layers, 2, n, kv_heads * head_dim)
    encoder = tm.module.prompt_encoder["default"]
    assert torch.equal(folded, encoder.base.cpu())  # P = P0 (the words' keys/values) at step 0
    assert folded.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_prefix_and_prompt_change_the_output(tiny_dir, name):
    tm, _, _ = prepared(tiny_dir, name, "llama")
    batch = inputs(tm)
    first = logits(tm, batch)
    tiny.perturb(tm.module.prompt_encoder)  # only the method's parameters move
    assert not torch.allclose(logits(tm, batch), first)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_soft_tokens_keep_the_hf_decoder_head_on_the_last_real_token(tiny_dir, name, kind):
    tm, _, _ = prepared(tiny_dir, name, kind)
    tiny.perturb(tm.module)
    padded = logits(tm, inputs(tm))  # right padding: rows 0 and 2 end in pad ids
    for i, text in enumerate(TEXTS):
        assert torch.allclose(padded[i], logits(tm, inputs(tm, [text]))[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_per_row_prompts_and_prefixes(tiny_dir, name, kind):
    """Rows of one batch can carry different prompts / prefixes (a later server mixes tasks)."""
    tm, _, _ = prepared(tiny_dir, name, kind)
    own = tm.module.prompt_encoder["default"]().detach()
    other = own + 0.5 * torch.randn_like(own)
    key = "prefix_kv" if name == "prefix" else "soft_prompt"
    batch = inputs(tm)
    mixed = torch.stack([own, other, own])
    with torch.no_grad():
        tm.module.eval()
        out = tm.module(**batch, **{key: mixed}).logits
        alone = tm.module(**batch, **{key: torch.stack([other] * 3)}).logits
    assert torch.allclose(out[[0, 2]], logits(tm, batch)[[0, 2]], atol=1e-5)
    assert torch.allclose(out[1], alone[1], atol=1e-5)


def test_prompt_inits(tiny_dir):
    tm, _, _ = prepared(tiny_dir, "prompt", "bert", init="labels")
    table = tm.backbone.embeddings.word_embeddings.weight
    prompt = tm.module.prompt_encoder["default"]().detach()
    good = tm.tokenizer("good", add_special_tokens=False)["input_ids"]
    assert torch.allclose(prompt[1], table[good].mean(0))  # class 1 is "good"
    tm, _, _ = prepared(tiny_dir, "prompt", "bert", init="text", init_text="great plot")
    ids = tm.tokenizer("great plot", add_special_tokens=False)["input_ids"]
    assert torch.equal(tm.module.prompt_encoder["default"]().detach(), table[ids * 2])
    with pytest.raises(UserError, match="init_text"):
        prepared(tiny_dir, "prompt", "bert", init="text")
    tm, _, _ = prepared(tiny_dir, "prompt", "bert", init="random")
    assert tm.module.prompt_encoder["default"]().abs().max() < 3 * table.std() * 3**0.5


def test_after_first_keeps_cls_first_and_is_not_exportable(tiny_dir):
    tm, method, config = prepared(tiny_dir, "prompt", "bert", insert_at="after_first")
    tiny.perturb(tm.module)
    seen = []
    hook = tm.backbone.embeddings.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]),
                                                            with_kwargs=True)
    batch = inputs(tm)
    logits(tm, batch)
    hook.remove()
    assert torch.equal(seen[0][:, 0], batch["input_ids"][:, 0])  # [CLS] stays at position 0
    assert seen[0].shape[1] == batch["input_ids"].shape[1] + 4
    with pytest.raises(UserError, match="insert_at=start"):
        method.to_peft(config, method.delta_state(tm, config) if hasattr(method, "delta_state") else
                       {k: v for k, v in tm.module.state_dict().items() if k.startswith("prompt_encoder")})


def test_too_many_positions_is_a_user_error(tiny_dir):
    tm, _, _ = prepared(tiny_dir, "prompt", "bert", num_virtual_tokens=60)  # tiny BERT: 64 positions
    with pytest.raises(UserError, match="positions"):
        logits(tm, inputs(tm))


@pytest.mark.parametrize("name", METHODS)
def test_language_model_generation_with_and_without_cache_agree(tiny_dir, name):
    tm, _, _ = prepared(tiny_dir, name, "llama", pooling="lm", num_labels=0)
    tiny.perturb(tm.module.prompt_encoder)
    ids = torch.tensor([[5, 7, 25, 34]])
    labels = ids.clone()
    tm.module.eval()
    with torch.no_grad():
        out = tm.module(input_ids=ids, labels=labels)
        assert out.logits.shape[:2] == (1, 4) and torch.isfinite(out.loss)
        runs = [tm.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0, use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    step = tm.module(input_ids=runs[0][:, :-1]).logits[0, -1].argmax()  # the no-cache forward = training's
    assert step == runs[0][0, -1]


# ---- peft: export and import --------------------------------------------------------------------------

def peft_logits(folder, exported, batch, num_labels):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if num_labels:
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    else:
        base = AutoModelForSeq2SeqLM.from_pretrained(folder)
    model = PeftModel.from_pretrained(base, exported)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# T5: peft runs soft tokens only as SEQ_2_SEQ_LM (T5ForSequenceClassification refuses inputs_embeds) and
# puts a prefix into the decoder (deltatune: the encoder), so prompt and ptuning LM deltas only
PEFT_CASES = [(name, kind) for kind in ("bert", "llama") for name in METHODS] + [("prompt", "t5"), ("ptuning", "t5")]


@pytest.mark.parametrize(("name", "kind"), PEFT_CASES)
def test_peft_export_gives_the_same_logits_and_imports_back(tiny_dir, tmp_path, name, kind):
    from deltatune.peft_format import export_peft, import_peft

    if kind != "t5":
        tiny.skip_if_peft_refuses_prefix(name)

    num_labels = 0 if kind == "t5" else 3
    tm, method, config = prepared(tiny_dir, name, kind, pooling="lm" if kind == "t5" else "hf", num_labels=num_labels)
    tiny.perturb(tm.module)
    # peft's decoder heads see only inputs_embeds for soft tokens (they pick the last position), so
    # prompt methods are compared on rows without padding there; prefix keeps the input ids
    texts = TEXTS if kind != "llama" or name == "prefix" else ["good movie was", "the plot was"]
    batch = inputs(tm, texts)
    if kind == "t5":  # the encoder's rows are padded; the decoder reads them through cross-attention
        batch["decoder_input_ids"] = torch.tensor([[0, 7, 8, 9]] * len(texts))
    ours = logits(tm, batch)
    delta = save_delta(tmp_path / "d", tm, method, config, {"head_names": tm.head_names})
    exported = export_peft(delta, tmp_path / "peft")
    assert (ours - peft_logits(tiny_dir(kind), exported, batch, num_labels)).abs().max() <= 1e-4
    back = load_delta(import_peft(exported, tmp_path / "back", labels="a,b,c" if num_labels else None))
    assert torch.allclose(logits(back.task_model, batch), ours, atol=1e-5)


def test_inference_overhead_sees_the_soft_tokens(tiny_dir):
    """48 soft tokens before a 4-token input: the prompted forward reads 13x the positions of the bare one."""
    from deltatune.batching import encode
    from deltatune.data import Example
    from deltatune.evaluate import inference_overhead

    task_model, _, _ = prepared(tiny_dir, "prompt", "bert", num_virtual_tokens=48)
    plain = load_task_model(tiny_dir("bert"), num_labels=2)
    rows = encode(plain.tokenizer, [Example(text="good movie", label=0)] * 64, 32)
    timing = inference_overhead(task_model, plain, rows, batch_size=64, rounds=3)
    assert timing["inference_ms_per_example"] > timing["backbone_ms_per_example"] > 0
    assert timing["inference_overhead_pct"] > 50
