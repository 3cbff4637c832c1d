"""Tests for deltatune.data: built-in corpora (real installed data), user files, fixed seeded splits."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from deltatune.data import BUILTIN_TASKS, Example, TaskData, load_task
from deltatune.data.split import apportion, split_indices, subsample_indices
from deltatune.errors import UserError


def label_shares(task: TaskData, examples: list[Example]) -> dict[str, float]:
    counts = Counter(task.label_names[example.label] for example in examples)
    return {name: counts[name] / len(examples) for name in task.label_names}


def split_texts(task: TaskData) -> tuple[list[str], list[str], list[str]]:
    return tuple([example.text for example in split] for split in (task.train, task.validation, task.test))


def write_csv(path: Path, header: str, rows: list[str], delimiter: str = ",") -> Path:
    path.write_text("\n".join([header.replace(",", delimiter), *rows]) + "\n", encoding="utf-8")
    return path


def sentiment_rows(count: int) -> list[str]:
    return [f"review number {i},{'pos' if i % 3 else 'neg'}" for i in range(count)]


# ---------------------------------------------------------------- built-in tasks (real data)


def test_rotten_tomatoes_full_splits() -> None:
    task = load_task("rotten-tomatoes")
    assert task.kind == "classification"
    assert task.label_names == ["fresh", "rotten"]
    assert (len(task.train), len(task.validation), len(task.test)) == (10202, 1275, 1275)
    assert task.description
    assert task.summary() == "rotten-tomatoes: 2 labels (fresh, rotten), train 10202 / val 1275 / test 1275"
    assert all(
        example.text and example.label in (0, 1) and example.text_pair is None for example in task.train
    )


def test_rotten_tomatoes_splits_are_disjoint_and_stratified() -> None:
    task = load_task("rotten-tomatoes")
    train, validation, test = (set(texts) for texts in split_texts(task))
    assert not train & validation and not train & test and not validation & test
    corpus_shares = label_shares(task, task.train + task.validation + task.test)
    for split in (task.train, task.validation, task.test):
        for name, share in label_shares(task, split).items():
            assert abs(share - corpus_shares[name]) < 0.02


def test_split_is_deterministic_and_independent_of_seed() -> None:
    first = load_task("rotten-tomatoes")
    second = load_task("rotten-tomatoes", seed=7)
    assert split_texts(first) == split_texts(second)
    assert [example.label for example in first.test] == [example.label for example in second.test]
    # Not sorted by label: both labels appear within the first few examples of each split.
    assert len({example.label for example in first.train[:20]}) == 2


def test_split_is_identical_in_a_fresh_process() -> None:
    script = (
        "from deltatune.data import load_task; t = load_task('rotten-tomatoes', train_size=50, seed=3); "
        "print(repr([e.text for e in t.train][:50] + [e.text for e in t.test][:10]))"
    )
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    task = load_task("rotten-tomatoes", train_size=50, seed=3)
    expected = [example.text for example in task.train][:50] + [example.text for example in task.test][:10]
    assert other_process.stdout.strip() == repr(expected)


def test_subsampling_sizes_stratification_and_seed() -> None:
    task = load_task("rotten-tomatoes", train_size=2000, val_size=500, test_size=1000, seed=1)
    assert (len(task.train), len(task.validation), len(task.test)) == (2000, 500, 1000)
    full = load_task("rotten-tomatoes")
    full_train = {example.text for example in full.train}
    assert {example.text for example in task.train} <= full_train
    for split in (task.train, task.validation, task.test):
        assert abs(label_shares(task, split)["fresh"] - label_shares(full, full.train)["fresh"]) < 0.02
    again = load_task("rotten-tomatoes", train_size=2000, val_size=500, test_size=1000, seed=1)
    assert split_texts(again) == split_texts(task)
    other_seed = load_task("rotten-tomatoes", train_size=2000, val_size=500, test_size=1000, seed=2)
    assert split_texts(other_seed)[0] != split_texts(task)[0]
    # Resizing train does not change which validation examples are drawn.
    resized = load_task("rotten-tomatoes", train_size=100, val_size=500, seed=1)
    assert split_texts(resized)[1] == split_texts(task)[1]


def test_subsample_larger_than_split_uses_whole_split() -> None:
    task = load_task("rotten-tomatoes", val_size=10**6)
    assert len(task.validation) == 1275


def test_bbc_news() -> None:
    task = load_task("bbc-news")
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert (len(task.train), len(task.validation), len(task.test)) == (1699, 213, 213)
    assert all("\n" not in example.text and example.text == example.text.strip() for example in task.test)
    train, validation, test = (set(texts) for texts in split_texts(task))
    assert not train & validation and not train & test and not validation & test
    small = load_task("bbc-news", train_size=10, seed=0)
    assert len(small.train) == 10 and {example.label for example in small.train} == set(range(5))


def test_chatterbot_generation_pairs() -> None:
    task = load_task("chatterbot")
    assert task.kind == "generation" and task.label_names == []
    assert (len(task.train), len(task.validation), len(task.test)) == (940, 118, 118)
    assert all(example.label is None and example.target for example in task.train)
    pairs = {(example.text, example.target) for example in task.train + task.validation + task.test}
    assert (
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
    ) in pairs
    assert task.summary() == "chatterbot: generation, train 940 / val 118 / test 118"
    assert len(load_task("chatterbot", train_size=25).train) == 25


def test_builtin_loaders_return_fresh_examples() -> None:
    examples, label_names, kind, description = BUILTIN_TASKS["rotten-tomatoes"]()
    examples[0].text = "changed"
    assert BUILTIN_TASKS["rotten-tomatoes"]()[0][0].text != "changed"
    assert (label_names, kind) == (["fresh", "rotten"], "classification") and description


# ---------------------------------------------------------------- user files


def test_csv_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "reviews.csv", "text,label", sentiment_rows(60))
    task = load_task(data=str(path))
    assert task.name == "reviews" and task.label_names == ["neg", "pos"]
    assert (len(task.train), len(task.validation), len(task.test)) == (48, 6, 6)
    assert {example.label for example in task.validation} == {0, 1}
    assert "neg, pos" in task.description


def test_tsv_file_with_custom_columns(tmp_path: Path) -> None:
    rows = [f"{i}\tsentence {i}, with a comma\t{'a' if i % 2 else 'b'}" for i in range(20)]
    path = write_csv(tmp_path / "items.tsv", "id,sentence,category", rows, delimiter="\t")
    task = load_task(data=str(path), text_column="sentence", label_column="category")
    assert task.label_names == ["a", "b"]
    assert all(example.text.endswith("with a comma") for example in task.train)


def test_jsonl_text_pair_file_with_integer_labels(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    lines = [json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3}) for i in range(40)]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    task = load_task(data=str(path), text_column="premise", text_pair_column="hypothesis")
    assert task.name == "pairs" and task.label_names == ["0", "1", "2"]
    example = task.train[0]
    assert example.text_pair == "h" + example.text[1:]
    assert task.label_names[example.label] == str(int(example.text[1:]) % 3)


def test_jsonl_single_text(tmp_path: Path) -> None:
    path = tmp_path / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": "xy"[i % 2]}) + "\n" for i in range(30)))
    task = load_task(data=str(path), train_size=8, seed=5)
    assert len(task.train) == 8 and Counter(example.label for example in task.train) == {0: 4, 1: 4}
    assert all(example.text_pair is None for example in task.test)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "exactly one"),
        ({"task": "rotten-tomatoes", "data": "x.csv"}, "exactly one"),
        ({"task": "imdb"}, "bbc-news"),
        ({"task": "rotten-tomatoes", "train_size": 0}, "train_size"),
        ({"data": "/nonexistent/reviews.csv"}, "/nonexistent/reviews.csv"),
    ],
)
def test_argument_errors(kwargs: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        load_task(**kwargs)


@pytest.mark.parametrize(
    ("file_name", "content", "kwargs", "expected"),
    [
        ("data.xlsx", "text,label\n", {}, r"\.xlsx.*supported"),
        ("data.csv", "text,label\n" + "a,x\n" * 5, {"text_column": "review"}, "'review'.*'text', 'label'"),
        ("data.csv", "text,label\n" + "a,x\n" * 5, {"text_pair_column": "other"}, "'other'"),
        ("data.csv", "text,label\n" + "a,x\n" * 5, {"label_column": "y"}, "'y'"),
        ("data.csv", "", {}, "empty"),
        ("data.csv", "text,label\n", {}, "no data rows"),
        ("data.jsonl", "\n\n", {}, "no data rows"),
        ("data.csv", "text,label\na,x\n ,y\n", {}, r"row 2 \(line 3\).*empty text"),
        ("data.csv", "text,label\na,x\nb,\n", {}, "row 2.*missing label"),
        ("data.csv", "text,label\na,x\nb\n", {}, "row 2.*missing label"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"\n', {}, "line 2.*not valid JSON"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', {}, "line 2.*not a JSON object"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', {}, "line 2.*label"),
        ("data.jsonl", '{"text": ["a"], "label": "x"}\n', {}, "line 1.*'text'.*list"),
        ("data.csv", "text,label\n" + "a,x\n" * 50, {}, "at least 2 distinct labels.*found 1: x"),
        ("data.csv", "text,label\na,x\nb,y\nc,x\n", {}, "split is empty.*3 examples"),
        ("data.csv", "text,label\n" + "\n".join(sentiment_rows(30)), {"train_size": 1}, "never in train"),
    ],
)
def test_file_errors(tmp_path: Path, file_name: str, content: str, kwargs: dict, expected: str) -> None:
    path = tmp_path / file_name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=expected):
        load_task(data=str(path), **kwargs)


def test_non_utf8_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_task(data=str(path))


# ---------------------------------------------------------------- split helpers


def test_apportion_respects_total_minimums_and_caps() -> None:
    assert apportion(10, [50, 30, 20]) == [5, 3, 2]
    assert apportion(3, [98, 1, 1], minimums=[1, 1, 1]) == [1, 1, 1]
    assert apportion(4, [5, 1], caps=[2, 1]) == [2, 1]
    assert sum(apportion(7, [3, 3, 3])) == 7


def test_split_keeps_every_label_in_train_and_subsample_covers_labels() -> None:
    keys = ["a"] * 90 + ["b"] * 9 + ["c"]
    train, validation, test = split_indices(keys)
    assert sorted(train + validation + test) == list(range(100))
    assert (len(train), len(validation), len(test)) == (80, 10, 10)
    assert "c" in {keys[i] for i in train}
    picked = subsample_indices([keys[i] for i in train], 3, seed=0, split_name="train")
    assert {keys[train[i]] for i in picked} == {"a", "b", "c"}
