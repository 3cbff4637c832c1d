"""Generation metrics (exact match, ROUGE-L, chrF, label accuracy), the `instruct` task, eval and compare on them."""

import json

import pytest

from deltatune.cli import main
from deltatune.data import load_task
from deltatune.data.instruct import PHRASINGS, SEEN, UNSEEN
from deltatune.generation_metrics import label_words, named_label, score_texts

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [("hello how are you", "very good"), ("what is the movie", "a great film"), ("who is the actor", "the director"),
         ("is it good", "yes it is"), ("hi", "hello"), ("what is the price", "the bank"),
         ("who is in the match", "the team"), ("are you dull", "no"), ("is the film good", "yes"),
         ("what is the score", "a goal")]


def test_scores_of_known_replies():
    scores = score_texts(["Very good.", "a film", "no idea"], ["very good", "a great film", "yes"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-L F: 1, then LCS 2 of 2 vs 3 words -> 2*1*(2/3)/(1+2/3) = 0.8, then 0
    assert scores["rouge_l"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert 0 < scores["chrf"] < 100 and "accuracy" not in scores  # free text: no label words
    refs = ["positive", "negative"] * 3
    replies = ["Positive!", "it is negative", "negative", "negative", "positive, not negative", "unsure"]
    assert label_words(refs) == ["negative", "positive"]
    assert named_label("positive, not negative", ["negative", "positive"]) == "positive"  # the first one named
    assert score_texts(replies, refs)["accuracy"] == pytest.approx(4 / 6)


def test_instruct_task_holds_one_phrasing_out_of_training():
    task = load_task("instruct", train_size=200, val_size=60, test_size=60)
    assert task.kind == "generation"
    unseen = {name: phrasings[-1].split("{text}")[0] for name, phrasings in PHRASINGS.items()}
    for example in task.train:
        name = example.group.split("/")[0]
        if name in unseen:
            assert example.group.endswith(SEEN) and not example.text.startswith(unseen[name] or "\0")
            assert example.target in ("positive", "negative", "business", "entertainment", "politics", "sport",
                                      "technology")
    groups = {e.group for e in task.test}
    assert {f"rotten-tomatoes/{UNSEEN}", f"bbc-news/{UNSEEN}", f"rotten-tomatoes/{SEEN}", "chatterbot"} <= groups
    assert all(e.text.startswith("A BBC journalist") for e in task.test if e.group == f"bbc-news/{UNSEEN}")


def write_pairs(path, copies=3):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * copies))
    return str(path)


def test_eval_of_a_generation_delta_reports_reply_scores(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    argv = ["--data", data, "--model", tiny_dir("llama")]
    with pytest.raises(SystemExit):
        main(["train", "--method", "lora", *argv, "--out", str(tmp_path / "d"), "--epochs", "2", "--no-progress",
              "--lr", "0.02"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "d"), "--data", data, "--json"])
    assert exit_info.value.code == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("loss", "perplexity", "exact_match", "rouge_l", "chrf"):
        assert isinstance(metrics[key], float)
    assert metrics["samples"][0]["reference"] in [r for _, r in PAIRS]


@pytest.mark.slow
def test_compare_on_a_generation_task_has_a_zero_shot_row(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--methods", "lora", "--data", data, "--model", tiny_dir("llama"), "--out",
              str(tmp_path / "c"), "--epochs", "1", "--no-progress"])
    assert exit_info.value.code == 0
    rows = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base (0-shot)", "lora"]
    assert all("rouge_l" in r and "loss" in r for r in rows)
    table = capsys.readouterr().out
    assert "ROUGE-L" in table and "chrF" in table and "base (0-shot)" in table
    assert (tmp_path / "c" / "accuracy_vs_params.png").exists()
