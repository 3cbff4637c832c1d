"""`deltatune chat` (streamed, multi-turn, history window) and `generate --raw`, through the decode loop."""

import os
import subprocess
import sys

import pytest

from deltatune.chat import reply_stream, window
from deltatune.cli import main
from deltatune.config import TrainConfig
from deltatune.data import Example, TaskData
from deltatune.generation import generate_texts
from deltatune.loading import load_delta
from deltatune.rendering import prompt_ids
from deltatune.workflow import TrainJob, run_train_job

PAIRS = [("hello how are you", "very good"), ("what is the movie", "a great film"), ("is it good", "yes it is"),
         ("hi", "hello"), ("who is in the match", "the team"), ("are you dull", "no")]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def delta(tiny_dir, tmp_path_factory):
    examples = [Example(text=p, target=t) for p, t in PAIRS]
    task = TaskData(name="toy", kind="generation", label_names=[], train=examples * 4, validation=examples,
                    test=examples[:2])
    out = tmp_path_factory.mktemp("chat") / "delta"
    run_train_job(TrainJob(method="lora", task=task, model=tiny_dir("llama"),
                           train=TrainConfig(epochs=20, batch_size=8, lr=3e-2, max_length=32, progress=False)), out)
    return str(out)


def test_streamed_reply_is_the_greedy_reply_in_pieces(delta):
    task_model = load_delta(delta).task_model
    turns = [("user", "is it good"), ("assistant", "yes it is"), ("user", "what is the movie")]
    pieces = list(reply_stream(task_model, turns, max_new_tokens=6))
    assert len(pieces) > 1  # one piece per token that adds text
    assert "".join(pieces).strip() == generate_texts(task_model, [turns], max_new_tokens=6)[0]


def test_history_window_keeps_the_system_turn_and_the_newest_exchanges():
    turns = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")]
    assert window("s", turns, 2) == [("system", "s"), ("user", "c"), ("assistant", "d"), ("user", "e")]
    assert window(None, turns, 1) == [("user", "e")]


def test_chat_reads_a_stdin_pipe_one_reply_per_line(delta, monkeypatch, capsys):
    read, write = os.pipe()
    os.write(write, b"hello how are you\n\n/reset\nis it good\n/exit\nnever read\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", delta, "--max-new-tokens", "4", "--history", "2"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    task_model = load_delta(delta).task_model
    expected = generate_texts(task_model, ["hello how are you", "is it good"], max_new_tokens=4)  # /reset: fresh
    assert all(expected)
    assert [line.strip() for line in lines] == expected


def test_generate_raw_skips_the_chat_template(delta, capsys):
    task_model = load_delta(delta).task_model
    tok = task_model.tokenizer
    tok.chat_template = TEMPLATE
    assert prompt_ids(tok, "is it good", raw=True) == tok("is it good")["input_ids"]
    assert prompt_ids(tok, "is it good") != prompt_ids(tok, "is it good", raw=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", delta, "is it good", "--raw", "--max-new-tokens", "3"])
    assert exit_info.value.code == 0
    tok.chat_template = None
    raw = generate_texts(task_model, ["is it good"], max_new_tokens=3, raw=True)
    assert capsys.readouterr().out.strip() == raw[0]


@pytest.mark.slow
def test_chat_in_a_real_terminal(delta):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "chat", delta, "--max-new-tokens", "4"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    os.write(master, b"hi\n/exit\n")
    output = b""
    while True:
        try:
            chunk = os.read(master, 1024)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    text = output.decode()
    assert "you> " in text and "bot> " in text and "/reset forgets" in text
