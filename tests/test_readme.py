"""The README's commands are true: every `deltatune ...` line of its ```bash blocks parses with the real CLI
parser, and the fast ones (train, eval, predict, export, import, index) run in this process on a tiny model,
in README order, in a scratch folder."""

import shlex
from pathlib import Path

import pytest
import tiny
from test_cli import run

README = Path(__file__).parents[1] / "README.md"
RUNNABLE = {"train", "eval", "predict", "export", "import", "index"}
SLOW_WORDS = {"smollm2", "chatterbot", "icl", "runs/talk"}
"""Lines naming these need SmolLM2 or an LM: parsed, not run."""
OPERATORS = {"&&", "||", "|", ";"}
SMALL = {"--train-size": "48", "--val-size": "16", "--test-size": "16"}


def bash_lines(text: str) -> list[str]:
    """The logical lines (continuations joined) of every ```bash block."""
    lines, block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            lines.append(pending.strip())
        pending = ""
    return lines


def deltatune_commands(line: str) -> list[tuple[list[str], str | None]]:
    """(argv after `deltatune`, text piped in by `echo TEXT |` or None) of each deltatune command on a line."""
    tokens = shlex.split(line, comments=True)
    segments, current, ops = [], [], []
    for token in tokens:
        if token in OPERATORS:
            segments.append(current)
            ops.append(token)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for i, words in enumerate(segments):
        while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefix
            words = words[1:]
        if words and words[0].split("/")[-1] == "deltatune":
            before = segments[i - 1] if i and ops[i - 1] == "|" else None
            stdin = " ".join(before[1:]) + "\n" if before and before[0] == "echo" else None
            found.append((words[1:], stdin))
    return found


COMMANDS = [c for line in bash_lines(README.read_text()) for c in deltatune_commands(line)]


def test_the_readme_has_commands():
    names = {argv[0] for argv, _ in COMMANDS if argv}
    assert {"train", "eval", "predict", "export", "import", "compare", "serve", "index", "ask"} <= names


@pytest.mark.parametrize("argv", [argv for argv, _ in COMMANDS], ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_command_parses(argv):
    from deltatune.cli import make_parser

    args = make_parser().parse_args(argv)  # argparse exits (SystemExit 2) on anything it does not know
    assert args.command == argv[0]


def small(argv: list[str], model: str) -> list[str]:
    """The README's command on the tiny model with small splits: the same flags, cheaper values."""
    argv = list(argv)
    for flag, value in SMALL.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif argv[0] == "train" and "--data" not in argv:
            argv += [flag, value]
    if argv[0] == "train":
        argv += ["--model", model, "--epochs", "1", "--batch-size", "16", "--no-progress"]
    if argv[:2] == ["index", "build"]:
        argv += ["--encoder", model]
    return argv


def test_the_fast_readme_commands_run(tiny_dir, tmp_path, monkeypatch, one_thread):
    """The quick-start block as written (tiny model, small splits): train lora, eval, predict, stdin, export,
    import without --labels, bitfit on your own CSV, knn with no --task (the default task), index build/query."""
    monkeypatch.chdir(tmp_path)
    tiny.write_csv(tmp_path / "reviews.csv", tiny.toy_sentiment_rows(120), header=("review", "stars"))
    texts = tmp_path / "path" / "to" / "texts"
    texts.mkdir(parents=True)
    for i, topic in enumerate(["the central bank raised rates", "the film was a triumph", "shares fell today"]):
        (texts / f"doc{i}.txt").write_text(f"{topic}. " * 20)
    ran = []
    for argv, stdin in COMMANDS:
        if argv[0] not in RUNNABLE or SLOW_WORDS & set(argv):
            continue
        proc = run(*small(argv, tiny_dir("bert")), input_text=stdin)
        assert proc.returncode == 0, f"deltatune {' '.join(argv)}\n{proc.stderr}"
        ran.append(" ".join(argv[:2]))
    assert {"train --method", "eval runs/lora", "predict runs/lora", "export --format", "import runs/lora-peft",
            "index build", "index query"} <= set(ran)
    import json

    assert json.loads((tmp_path / "runs/knn/delta.json").read_text())["task"]["name"] == "rotten-tomatoes"
    assert json.loads((tmp_path / "runs/imported/delta.json").read_text())["task"]["label_names"] == ["fresh", "rotten"]
