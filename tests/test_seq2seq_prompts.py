"""prompt, ptuning, prefix on tiny random T5: soft tokens / prefixes in the encoder only.

Classification (pooling=hf: T5ForSequenceClassification, whose decoder reads input_ids shifted right)
and generation (pooling=lm: T5ForConditionalGeneration, whose `generate` runs the encoder itself)."""

import json

import pytest
import tiny
import torch

from deltatune.backbone import load_task_model
from deltatune.config import TrainConfig
from deltatune.data import Example, TaskData, load_task
from deltatune.delta import save_delta
from deltatune.errors import UserError
from deltatune.generation import encode_lm, evaluate_lm, generate_texts, prompt_ids
from deltatune.loading import load_delta
from deltatune.methods import resolve_method
from deltatune.workflow import TrainJob, run_train_job

METHODS = ["prompt", "ptuning", "prefix"]
POOLINGS = ["hf", "lm"]
EVERY_POOLING = POOLINGS + ["mean"]  # mean: T5EncoderModel (no decoder) under deltatune's pooled head
N = 4
SMALL = {"prompt": {"num_virtual_tokens": N}, "prefix": {"num_virtual_tokens": N, "encoder_hidden_size": 16},
         "ptuning": {"num_virtual_tokens": N, "encoder_hidden_size": 16}}
TEXTS = ["good movie", "the plot was awful and dull", "a film"]
TARGETS = ["very good", "a great film", "no"]
PAIRS = [("hello how are you", "very good"), ("what is the movie", "a great film"),
         ("who is the actor", "the director"), ("is it good", "yes it is"), ("hi", "hello"),
         ("what is the price", "the bank"), ("who is in the match", "the team"), ("are you dull", "no")]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


def load(tiny_dir, pooling):
    return load_task_model(tiny_dir("t5"), num_labels=0 if pooling == "lm" else 2, pooling=pooling)


def prepared(tiny_dir, name, pooling, **options):
    tm = load(tiny_dir, pooling)
    tm.label_names = [] if pooling == "lm" else ["bad", "good"]
    method, config = resolve_method(name, {**SMALL[name], **options})
    method.apply(tm, config)
    return tm, method, config


def batch(tm, pooling, texts=TEXTS):
    out = dict(tm.tokenizer(texts, padding=True, return_tensors="pt"))
    if pooling != "lm":
        out["labels"] = torch.tensor([0, 1, 1][:len(texts)])
    else:
        labels = tm.tokenizer(TARGETS[:len(texts)], padding=True, return_tensors="pt")
        out["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
    return out


def run(tm, inputs, **extra):
    tm.module.eval()
    with torch.no_grad():
        return tm.module(**inputs, **extra)


def own_tensor(tm):
    return tm.module.prompt_encoder["default"]().detach()  # prompt (n, H), prefix (L, 2, n, kv_dim)


def per_call(name, tensor, rows, mask=None):
    """The per-call arguments of a method: soft_prompt (B, n, H) or prefix_kv (B, L, 2, n, kv_dim)."""
    key = "prefix" if name == "prefix" else "soft_prompt"
    args = {("prefix_kv" if key == "prefix" else key): torch.stack([tensor] * rows)}
    if mask is not None:
        args["prefix_mask" if key == "prefix" else "soft_prompt_mask"] = mask
    return args


@pytest.mark.parametrize("pooling", EVERY_POOLING)
@pytest.mark.parametrize("name", METHODS)
def test_changes_the_output_and_the_gradient_reaches_the_method(tiny_dir, name, pooling):
    tm, _, _ = prepared(tiny_dir, name, pooling)
    tiny.perturb(tm.module.prompt_encoder)
    inputs = batch(tm, pooling)
    bare = run(load(tiny_dir, pooling), inputs)
    out = tm.module(**inputs)
    assert out.logits.shape == bare.logits.shape  # lm: one logit row per decoder position, nothing to cut
    assert not torch.allclose(out.logits, bare.logits, atol=1e-3)
    out.loss.backward()
    grads = {n: p.grad for n, p in tm.module.named_parameters() if n.startswith("prompt_encoder.")}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("name", METHODS)
def test_the_prompt_is_read_and_masked_slots_give_the_bare_model(tiny_dir, name, pooling):
    tm, _, _ = prepared(tiny_dir, name, pooling)
    tiny.perturb(tm.module.prompt_encoder)
    inputs, own = batch(tm, pooling), own_tensor(tm)
    rows = inputs["input_ids"].shape[0]
    loss = run(tm, inputs).loss
    assert torch.allclose(run(tm, inputs, **per_call(name, own, rows)).loss, loss)
    changed = own.clone()
    changed[..., 0, :] += 1.0  # the first soft token / prefix slot (of every layer)
    assert (run(tm, inputs, **per_call(name, changed, rows)).loss - loss).abs() > 1e-4
    # every slot masked out: the real tokens keep their relative positions, so the bare model's logits
    hidden = run(tm, inputs, **per_call(name, own, rows, mask=torch.zeros(rows, N, dtype=torch.long)))
    assert torch.allclose(hidden.logits, run(load(tiny_dir, pooling), inputs).logits, atol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("name", METHODS)
def test_padding_and_eager_attention_agree(tiny_dir, name, pooling):
    """A padded row gives what it gives alone, and sdpa's boolean masks what eager's additive ones do."""
    tm, _, _ = prepared(tiny_dir, name, pooling)
    tiny.perturb(tm.module.prompt_encoder)
    inputs = batch(tm, pooling)
    padded = run(tm, inputs).logits
    for i, text in enumerate(TEXTS):
        alone = {**tm.tokenizer([text], return_tensors="pt"), "labels": inputs["labels"][i:i + 1]}
        assert torch.allclose(padded[i], run(tm, alone).logits[0], atol=1e-5), i
    tm.module.set_attn_implementation("eager")
    assert torch.allclose(run(tm, inputs).logits, padded, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_classifier_training_lowers_the_loss_and_reloads(tiny_dir, toy_csv, tmp_path, name):
    task = load_task(data=toy_csv, train_size=96, val_size=24, test_size=24)
    config = TrainConfig(epochs=3, batch_size=16, lr=3e-2, max_length=32, progress=False, seed=0)
    run_train_job(TrainJob(method=name, task=task, model=tiny_dir("t5"), train=config, options=SMALL[name]),
                  tmp_path / "delta")
    history = json.loads((tmp_path / "delta" / "delta.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert load_delta(tmp_path / "delta").task_model.module.prompt_encoder["default"]().abs().sum() > 0


def toy_chat(copies: int = 4) -> TaskData:
    examples = [Example(text=p, target=t) for p, t in PAIRS]
    return TaskData(name="toy-chat", kind="generation", label_names=[], train=examples * copies,
                    validation=examples, test=examples)


@pytest.mark.parametrize("name", METHODS)
def test_lm_training_lowers_the_answer_loss_and_reloads(tiny_dir, tmp_path, name):
    """The LM head is frozen (tied to the frozen embeddings): only the prompt / prefix can lower the loss."""
    task = toy_chat()
    base = load_task_model(tiny_dir("t5"), 0, pooling="lm")
    rows = encode_lm(base.tokenizer, task.test, 32, "test", seq2seq=True)
    base_loss = evaluate_lm(base, rows)["loss"]
    config = TrainConfig(epochs=4, batch_size=8, lr=0.1, max_length=32, progress=False)
    metrics = run_train_job(TrainJob(method=name, task=task, model=tiny_dir("t5"), train=config,
                                     options=SMALL[name]), tmp_path / "delta")
    assert metrics["loss"] < base_loss - 0.1
    loaded = load_delta(tmp_path / "delta")
    assert evaluate_lm(loaded.task_model, rows)["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


@pytest.mark.parametrize("pooling", EVERY_POOLING)
@pytest.mark.parametrize("name", METHODS)
def test_save_load_gives_the_same_logits(tiny_dir, tmp_path, name, pooling):
    tm, method, config = prepared(tiny_dir, name, pooling)
    tiny.perturb(tm.module)
    inputs = batch(tm, pooling)
    before = run(tm, inputs).logits
    out = save_delta(tmp_path / "d", tm, method, config, {"head_names": tm.head_names})
    assert torch.allclose(run(load_delta(out).task_model, inputs).logits, before, atol=1e-5)


def greedy(tm, ids, steps):
    """Greedy decoding by full forwards of the task model (the training path): new ids, start token first."""
    eos = tm.tokenizer.eos_token_id
    decoded = torch.tensor([[tm.module.config.decoder_start_token_id]])
    scores = []
    for _ in range(steps):
        logits = run(tm, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "decoder_input_ids": decoded}).logits[:, -1]  # (1, V)
        scores.append(logits)
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
        if decoded[0, -1] == eos:
            break
    return decoded, scores


@pytest.mark.parametrize("name", METHODS)
def test_generate_reads_the_prompt_through_the_encoder(tiny_dir, tmp_path, name):
    """`generate` calls the encoder itself: its steps equal full forwards with the prompt."""
    tm, method, config = prepared(tiny_dir, name, "lm")
    tiny.perturb(tm.module.prompt_encoder, scale=1.0)
    loaded = load_delta(save_delta(tmp_path / "d", tm, method, config, {"head_names": tm.head_names})).task_model
    text = "what is the movie"
    ids = torch.tensor([prompt_ids(loaded.tokenizer, text, seq2seq=True)])
    expected, scores = greedy(loaded, ids, 6)
    assert generate_texts(loaded, [text], max_new_tokens=6) == [
        loaded.tokenizer.decode(expected[0], skip_special_tokens=True).strip()]
    with torch.no_grad():
        out = loaded.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False, pad_token_id=0, eos_token_id=loaded.tokenizer.eos_token_id,
                                     output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    for step, score in zip(out.scores, scores):
        assert torch.allclose(step, score, atol=1e-4)
    bare = run(load(tiny_dir, "lm"), {"input_ids": ids, "decoder_input_ids": expected[:, :1]}).logits[:, -1]
    assert not torch.allclose(bare, scores[0], atol=1e-3)  # the prompt changed the first step


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, name):
    tm, _, _ = prepared(tiny_dir, name, "lm")
    tiny.perturb(tm.module.prompt_encoder)
    inputs = batch(tm, "lm")

    plain, checkpointed = tiny.prompt_encoder_grads(tm, inputs, False), tiny.prompt_encoder_grads(tm, inputs, True)
    assert plain and plain.keys() == checkpointed.keys()
    for key in plain:
        assert plain[key].abs().sum() > 0 and torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


def test_prefix_in_some_layers_only(tiny_dir):
    """`layers` (S4): the other encoder blocks' prefix slots are masked, the chosen ones' are read."""
    tm, _, _ = prepared(tiny_dir, "prefix", "lm", layers=(1,))
    tiny.perturb(tm.module.prompt_encoder)
    own = own_tensor(tm)  # (1, 2, n, kv_dim): block 1 only
    assert own.shape[0] == 1
    inputs = batch(tm, "lm")
    base = run(tm, inputs).logits
    noise = torch.cat([torch.randn_like(own), own])  # (2, 2, n, kv_dim): block 0's slots hold noise
    assert torch.allclose(run(tm, inputs, **per_call("prefix", noise, 3)).logits, base, atol=1e-5)
    moved = torch.cat([torch.zeros_like(own), own + 1.0])
    assert not torch.allclose(run(tm, inputs, **per_call("prefix", moved, 3)).logits, base, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_peft_export_refuses_what_peft_runs_differently(tiny_dir, tmp_path, name):
    from deltatune.peft_format import export_peft

    tm, method, config = prepared(tiny_dir, name, "hf")
    delta = save_delta(tmp_path / "d", tm, method, config, {"head_names": tm.head_names})
    with pytest.raises(UserError, match="decoder" if name == "prefix" else "inputs_embeds"):
        export_peft(delta, tmp_path / "peft")


def test_a_peft_seq2seq_prompt_adapter_imports(tiny_dir, tmp_path):
    """peft's own SEQ_2_SEQ_LM default (two submodules: 2n rows, of which its forward uses the first n)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from deltatune.peft_format import import_peft

    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tiny_dir("t5")),
                           PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    assert model.peft_config["default"].num_transformer_submodules == 2
    tiny.perturb(model.prompt_encoder, scale=1.0)
    inputs = {**batch(load(tiny_dir, "lm"), "hf"), "decoder_input_ids": torch.tensor([[0, 7, 8, 9]] * 3)}
    inputs.pop("labels")
    model.eval()
    with torch.no_grad():
        theirs = model(**inputs).logits
    model.save_pretrained(tmp_path / "peft")
    loaded = load_delta(import_peft(tmp_path / "peft", tmp_path / "back", model=tiny_dir("t5"))).task_model
    assert torch.allclose(run(loaded, inputs).logits, theirs, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_serve_runs_t5_soft_tokens_and_prefixes_alone(tiny_dir, tmp_path, name):
    """The mixed pass splices soft tokens / prefixes at the top: on T5 such a task runs as its own group."""
    from deltatune.serve.engine import Engine

    tm, method, config = prepared(tiny_dir, name, "mean")
    tiny.perturb(tm.module)
    meta = {"task": {"name": name, "kind": "classification", "label_names": ["bad", "good"]},
            "train_config": {"max_length": 32}, "head_names": tm.head_names}
    delta = save_delta(tmp_path / name, tm, method, config, meta)
    engine = Engine(tiny_dir("t5"), device="cpu")
    engine.add_task(name, delta)
    assert engine.tasks[name].group == "own" and "encoder-decoder" in engine.tasks[name].reason
    results = engine.classify([(name, text) for text in TEXTS])
    expected = run(tm, batch(tm, "mean")).logits
    assert torch.allclose(torch.tensor([r["logits"] for r in results]), expected, atol=1e-4)
