"""A user's generation file: every format gives the same ids, labels on assistant turns only, bad input refused."""

import csv
import gzip
import json

import pytest

from deltatune.backbone import load_task_model
from deltatune.cli import main
from deltatune.data import load_task
from deltatune.errors import UserError
from deltatune.generation import IGNORE, encode_lm
from deltatune.rendering import Fitter, encode_turns

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
PAIRS = [("hello how are you", "very good"), ("what is the movie", "a great film"), ("who is the actor", "the director"),
         ("is it good", "yes it is"), ("hi", "hello"), ("what is the price", "the bank"),
         ("who is in the match", "the team"), ("are you dull", "no"), ("is the film good", "yes"),
         ("what is the score", "a goal")]
SYSTEM = "you are a good show"

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def all_formats(tmp_path):
    """The same conversations in each supported format (and extension)."""
    files = {"prompt-response": write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS]),
             "alpaca": write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": p, "input": "", "output": r}
                                                                for p, r in PAIRS]),
             "chat": write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": p},
                                                                         {"role": "assistant", "content": r}]}
                                                           for p, r in PAIRS]),
             "sharegpt": write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": p},
                                                                                {"from": "gpt", "value": r}]}
                                                             for p, r in PAIRS])}
    with open(tmp_path / "pr.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([("question", "answer"), *PAIRS])
    gz = tmp_path / "pr.csv.gz"
    gz.write_bytes(gzip.compress(("prompt,response\n" + "".join(f"{p},{r}\n" for p, r in PAIRS)).encode()))
    return files, str(tmp_path / "pr.tsv"), str(gz)


def task_rows(tok, path, seq2seq=False, **kw):
    task = load_task(data=path, **kw)
    examples = sorted(task.train + task.validation + task.test, key=lambda e: e.text)
    return task, encode_lm(tok, examples, 64, seq2seq=seq2seq)


@pytest.mark.parametrize("kind,template", [("llama", True), ("llama", False), ("gpt2", False), ("t5", False)])
def test_every_format_gives_the_same_token_ids(tiny_dir, tmp_path, kind, template):
    tok = load_task_model(tiny_dir(kind), 0, pooling="lm").tokenizer
    if template:
        tok.chat_template = TEMPLATE
    files, tsv, gz = all_formats(tmp_path)
    seq2seq = kind == "t5"
    results = {fmt: task_rows(tok, path, seq2seq) for fmt, path in files.items()}
    results["tsv"] = task_rows(tok, tsv, seq2seq, prompt_column="question", response_column="answer")
    results["gz"] = task_rows(tok, gz, seq2seq)
    reference = [(r.input_ids, r.token_labels) for r in results["chat"][1]]
    for fmt, (task, rows) in results.items():
        assert [(r.input_ids, r.token_labels) for r in rows] == reference, fmt
        assert task.kind == "generation" and task.source_format in (fmt, "prompt-response")
    assert "(chat format)" in results["chat"][0].summary()


def multi_turn():
    return [("system", SYSTEM), ("user", "hello how are you"), ("assistant", "very good"),
            ("user", "what is the movie"), ("assistant", "a great film")]


@pytest.mark.parametrize("kind,template", [("llama", True), ("llama", False), ("gpt2", False)])
def test_only_assistant_turns_are_labelled_in_a_multi_turn_chat(tiny_dir, kind, template):
    tok = load_task_model(tiny_dir(kind), 0, pooling="lm").tokenizer
    if template:
        tok.chat_template = TEMPLATE
    ids, labels = encode_turns(tok, multi_turn(), Fitter(64, "x"), "x")
    assert len(ids) == len(labels)
    learned = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True).split()
    assert learned == "very good a great film".split()  # both answers, no prompt word
    if template:  # the end of each turn is learned with it (the template's </s>)
        assert [t for t in labels if t != IGNORE].count(tok.convert_tokens_to_ids("</s>")) == 2
    else:  # the plain template: each answer ends with EOS
        assert sum(t == tok.eos_token_id for t in labels) == 2
    # --train-on-prompt: every token is a target
    _, all_labels = encode_turns(tok, multi_turn(), Fitter(64, "x"), "x", train_on_prompt=True)
    assert all_labels == ids


def test_t5_source_is_the_conversation_before_the_last_answer(tiny_dir):
    tok = load_task_model(tiny_dir("t5"), 0, pooling="lm").tokenizer
    source, target = encode_turns(tok, multi_turn(), Fitter(64, "x"), "x", seq2seq=True)
    assert tok.decode(source, skip_special_tokens=True).split() == \
        f"{SYSTEM} hello how are you very good what is the movie".split()
    assert tok.decode(target, skip_special_tokens=True) == "a great film" and target[-1] == tok.eos_token_id


def test_truncation_cuts_the_prompt_from_the_left_and_refuses_long_answers(tiny_dir, tmp_path, capsys):
    tok = load_task_model(tiny_dir("llama"), 0, pooling="lm").tokenizer
    long = " ".join(["movie"] * 30)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long if i % 2 else p, "response": r}
                                                 for i, (p, r) in enumerate(PAIRS * 2)])
    task = load_task(data=path)
    rows = encode_lm(tok, task.train, 16, "train")
    assert max(len(r.input_ids) for r in rows) == 16
    assert "prompts were cut from the left" in capsys.readouterr().err
    for row, example in zip(rows, task.train):  # the answer survives whole
        answer = [t for t in row.token_labels if t != IGNORE]
        assert tok.decode(answer, skip_special_tokens=True) == example.target
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": p, "response": long if i in (3, 5) else r}
                                               for i, (p, r) in enumerate(PAIRS * 2)])
    task = load_task(data=bad)
    examples = task.train + task.validation + task.test
    with pytest.raises(UserError, match=r"2 row\(s\) have a response longer than --max-length 16 .*line [46]"):
        encode_lm(tok, examples, 16, "train")


BAD = [
    ("a.jsonl", '{"question": "hi", "answer": "yo"}\n', {}, r"a.jsonl: no known format.*columns found: 'question', 'answer'"),
    ("a.jsonl", '{"prompt": "hi", "response": "yo"}\n{"prompt": " ", "response": "yo"}\n', {},
     r"a.jsonl: line 2: empty 'prompt'"),
    ("a.jsonl", '{"prompt": "hi", "response": ""}\n', {}, r"line 1: empty 'response'"),
    ("a.jsonl", '{"messages": "hi"}\n', {}, r"line 1: 'messages' must be a list"),
    ("a.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', {}, r"line 1: messages\[0\] has unknown role 'robot'"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {}, r"line 1: the conversation has no assistant turn"),
    ("a.jsonl", '{"conversations": [{"from": "alien", "value": "x"}]}\n', {}, r"unknown from 'alien'"),
    ("a.jsonl", '{"prompt": "hi", "response": "yo"}\n{"prompt": "hi"\n', {}, r"a.jsonl: line 2 is not valid JSON"),
    ("a.jsonl", '{"prompt": "a", "response": "b", "messages": []}\n', {}, r"more than one format .*--format"),
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n', {"fmt": "chat"}, r"--format chat needs column\(s\) 'messages'"),
    ("a.jsonl", '{"text": "a", "label": "b"}\n', {"task_type": "generation"}, r"no known format.*'prompt' \+ 'response'"),
]


@pytest.mark.parametrize("name,content,kwargs,expected", BAD)
def test_bad_generation_files_are_refused_with_file_and_line(tmp_path, name, content, kwargs, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=expected):
        load_task(data=str(path), **kwargs)


def test_non_utf8_generation_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "hi", "response": "yo"}\n{"prompt": "caf\xe9", "response": "yo"}\n')
    with pytest.raises(UserError, match=r"a.jsonl: line 2 is not valid UTF-8"):
        load_task(data=str(path))


@pytest.mark.parametrize("method", ["knn", "features"])
def test_generation_file_given_to_a_classifier_exits_2(tiny_dir, tmp_path, capsys, method):
    files, _, _ = all_formats(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", method, "--data", files["chat"], "--model", tiny_dir("llama"),
              "--out", str(tmp_path / "d"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("deltatune: error:")]
    assert len(errors) == 1 and f"chat is a generation task: method '{method}' only classifies" in errors[0]
    assert not (tmp_path / "d" / "delta.json").exists()


def test_train_and_eval_on_a_chat_file_through_the_cli(tiny_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "talk.jsonl", [{"messages": [{"role": "system", "content": SYSTEM},
                                                               {"role": "user", "content": p},
                                                               {"role": "assistant", "content": r}]}
                                                 for p, r in PAIRS * 3])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "lora", "--data", path, "--model", tiny_dir("llama"), "--out",
              str(tmp_path / "d"), "--epochs", "1", "--batch-size", "8", "--no-progress", "--json"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "talk: generation (chat format)" in captured.err and "--max-length 1024 (the default)" in captured.err
    assert "loss" in json.loads(captured.out)


@pytest.mark.slow
def test_smollm2_learns_a_user_chat_file(tmp_path, capsys):
    """The real SmolLM2 on a small multi-turn chat file: validation loss falls below the base model's."""
    from deltatune.backbone import resolve_model_path
    from deltatune.data import builtin
    from deltatune.generation import evaluate_lm

    pairs = list(builtin.read_chatterbot())[:120]
    records = [{"messages": [{"role": "system", "content": "You are a friendly chatbot."},
                             {"role": "user", "content": a[0]}, {"role": "assistant", "content": a[1]},
                             {"role": "user", "content": b[0]}, {"role": "assistant", "content": b[1]}]}
               for a, b in zip(pairs[::2], pairs[1::2])]
    path = write_jsonl(tmp_path / "talk.jsonl", records)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "lora", "--data", path, "--model", "smollm2", "--out", str(tmp_path / "d"),
              "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--json", "--threads", "2",
              "--packing"])
    assert exit_info.value.code == 0
    metrics = json.loads(capsys.readouterr().out)
    task = load_task(data=path)
    base = load_task_model(resolve_model_path("smollm2"), 0, pooling="lm")
    base_loss = evaluate_lm(base, encode_lm(base.tokenizer, task.validation, 1024, "validation"))["loss"]
    assert metrics["validation_loss"] < base_loss
    print(f"\nvalidation loss {base_loss:.3f} (base) -> {metrics['validation_loss']:.3f}")
