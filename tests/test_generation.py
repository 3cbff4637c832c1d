"""Generation tasks: answer-only labels, training an LM delta, `deltatune generate`; decoder classification."""

import json
import math

import pytest
import torch

from deltatune.backbone import load_task_model
from deltatune.batching import collate
from deltatune.cli import main
from deltatune.config import TrainConfig
from deltatune.data import Example, TaskData
from deltatune.generation import IGNORE, answer_ids, encode_lm, evaluate_lm, generate_texts, prompt_ids
from deltatune.loading import load_delta
from deltatune.workflow import TrainJob, run_train_job

PAIRS = [("hello how are you", "very good"), ("what is the movie", "a great film"),
         ("who is the actor", "the director"), ("is it good", "yes it is"), ("hi", "hello"),
         ("what is the price", "the bank"), ("who is in the match", "the team"), ("are you dull", "no")]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


def toy_chat(copies: int = 4) -> TaskData:
    examples = [Example(text=p, target=t) for p, t in PAIRS]
    return TaskData(name="toy-chat", kind="generation", label_names=[], train=examples * copies,
                    validation=examples, test=examples)


def test_only_answer_tokens_are_labelled(tiny_dir):
    tok = load_task_model(tiny_dir("llama"), 0, pooling="lm").tokenizer
    rows = encode_lm(tok, [Example(text=p, target=t) for p, t in PAIRS[:3]], max_length=32)
    for row, (prompt, target) in zip(rows, PAIRS):
        n_prompt = len(tok(prompt + "\n")["input_ids"])  # <s> + prompt words
        assert row.token_labels[:n_prompt] == [IGNORE] * n_prompt
        answer = row.input_ids[n_prompt:]
        assert row.token_labels[n_prompt:] == answer
        assert tok.decode(answer, skip_special_tokens=True) == target and answer[-1] == tok.eos_token_id
    batch = collate(rows, tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding is never scored


def test_chat_template_answer_ends_the_turn_and_pad_equal_to_eos_is_still_learned(tiny_dir):
    tok = load_task_model(tiny_dir("llama"), 0, pooling="lm").tokenizer
    tok.chat_template = TEMPLATE
    tok.pad_token = tok.eos_token  # like SmolLM2: pad = eos = end of turn
    row = encode_lm(tok, [Example(text="hi", target="hello")], max_length=32)[0]
    full = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                   tokenize=False)
    assert row.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    prompt = prompt_ids(tok, "hi")
    assert row.input_ids[:len(prompt)] == prompt and row.token_labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert row.token_labels[len(prompt):] == answer_ids(tok, "hi", "hello")
    assert row.token_labels[-1] == tok.eos_token_id == tok.pad_token_id  # the final EOS is a target


def test_truncation_keeps_the_answer(tiny_dir):
    tok = load_task_model(tiny_dir("llama"), 0, pooling="lm").tokenizer
    long_prompt = " ".join(["movie"] * 40)
    row = encode_lm(tok, [Example(text=long_prompt, target="very good")], max_length=16)[0]
    assert len(row.input_ids) == 16 and row.token_labels[-3:] == answer_ids(tok, long_prompt, "very good")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_lm_delta_lowers_the_answer_loss_and_reloads(tiny_dir, tmp_path, kind):
    task = toy_chat()
    base = load_task_model(tiny_dir(kind), 0, pooling="lm")
    seq2seq = kind == "t5"
    test_rows = encode_lm(base.tokenizer, task.test, 32, "test", seq2seq=seq2seq)
    base_loss = evaluate_lm(base, test_rows)["loss"]
    config = TrainConfig(epochs=4, batch_size=8, lr=2e-2, max_length=32, progress=False)
    metrics = run_train_job(TrainJob(method="lora", task=task, model=tiny_dir(kind), train=config,
                                     options={"target_modules": "query,value,attn_out,ffn_out"}),
                            tmp_path / "delta")
    # Llama's random lm_head is new at load, so it trains too; GPT-2 / T5 tie theirs to tiny random embeddings
    # behind a frozen final norm, which bounds how far LoRA alone moves the logits of a random model
    assert metrics["loss"] < (0.7 * base_loss if kind == "llama" else base_loss - 0.1)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert meta["task"]["kind"] == "generation" and meta["backbone"]["pooling"] == "lm" and meta["num_labels"] == 0
    loaded = load_delta(tmp_path / "delta")
    assert evaluate_lm(loaded.task_model, test_rows)["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


def test_generate_cli_runs_greedy_on_a_delta(tiny_dir, tmp_path, capsys):
    config = TrainConfig(epochs=10, batch_size=8, lr=2e-2, max_length=32, progress=False)
    run_train_job(TrainJob(method="lora", task=toy_chat(), model=tiny_dir("llama"), train=config),
                  tmp_path / "delta")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "delta"), "is it good", "hi", "--max-new-tokens", "4", "--json"])
    assert exit_info.value.code == 0
    replies = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in replies] == ["is it good", "hi"]
    assert replies[0]["reply"] == "yes it is"  # a training pair: generation formats prompts as training did
    loaded = load_delta(tmp_path / "delta")
    again = generate_texts(loaded.task_model, ["is it good", "hi"], max_new_tokens=4)
    assert [r["reply"] for r in replies] == again  # greedy: deterministic
    assert all(len(loaded.task_model.tokenizer(r, add_special_tokens=False)["input_ids"]) <= 4 for r in again)
    # eval scores a generation task's answers; predict points to generate
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "delta"), "--task", "chatterbot", "--test-size", "8", "--json"])
    assert exit_info.value.code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 8 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "delta"), "hello"])
    assert exit_info.value.code == 2 and "deltatune generate" in capsys.readouterr().err


def test_generate_refuses_a_classification_delta(tiny_dir, toy_csv, tmp_path, capsys):
    from deltatune.data import load_task

    task = load_task(data=toy_csv, train_size=16, val_size=8, test_size=8)
    run_train_job(TrainJob(method="head", task=task, model=tiny_dir("llama"),
                           train=TrainConfig(epochs=1, progress=False)), tmp_path / "cls")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "cls"), "hello"])
    assert exit_info.value.code == 2 and "classification delta" in capsys.readouterr().err


@pytest.mark.parametrize("pooling", ["hf", "last"])
def test_decoder_classification_reads_the_real_last_token_when_pad_is_eos(tiny_dir, pooling):
    """SmolLM2 pads with EOS: padded rows must give the logits of the same text alone."""
    tm = load_task_model(tiny_dir("llama"), 3, pooling=pooling)
    tok = tm.tokenizer
    tok.pad_token = tok.eos_token
    tm.module.config.pad_token_id = tok.pad_token_id
    texts = ["good movie with a great actor", "bad plot", "a story"]
    with torch.no_grad():
        batch = dict(tok(texts, padding=True, return_tensors="pt"))
        together = tm.module(**batch).logits
        alone = torch.cat([tm.module(**dict(tok([t], return_tensors="pt"))).logits for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.slow
def test_smollm2_lora_on_chatterbot_then_generate(tmp_path, capsys):
    from deltatune.backbone import resolve_model_path
    from deltatune.data import load_task

    out = tmp_path / "chat"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "lora", "--task", "chatterbot", "--model", "smollm2", "--out", str(out),
              "--train-size", "48", "--val-size", "8", "--test-size", "8", "--epochs", "1", "--batch-size", "4",
              "--max-length", "192", "--lr", "1e-3", "--no-progress", "--json", "--threads", "2"])
    assert exit_info.value.code == 0  # 192: chatterbot's longest response with SmolLM2's system prompt fits
    metrics = json.loads(capsys.readouterr().out)
    task = load_task("chatterbot", train_size=48, val_size=8, test_size=8)
    base = load_task_model(resolve_model_path("smollm2"), 0, pooling="lm")
    base_loss = evaluate_lm(base, encode_lm(base.tokenizer, task.test, 192, "test"))["loss"]
    assert metrics["loss"] < base_loss
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(out), "Tell me a joke", "--max-new-tokens", "24", "--json"])
    assert exit_info.value.code == 0
    reply = json.loads(capsys.readouterr().out)[0]["reply"]
    assert reply.strip()
    print(f"\nbase loss {base_loss:.3f} -> {metrics['loss']:.3f}; reply: {reply!r}")
