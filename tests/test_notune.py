"""No-tuning strategies: templates and verbalizers, prompt fitting, label scoring with a cached prefix
(equal to the full prompt), calibration, icl/knn train -> save -> eval, the vector index, and the
verbalizer objective (PET / LM-BFF) on tiny random Llama / GPT-2 / BERT models."""

import json
from pathlib import Path

import pytest
import torch

from deltatune.config import TrainConfig
from deltatune.data import Example, load_task
from deltatune.data.templates import (
    PromptArgs,
    PromptSpec,
    Template,
    label_token_ids,
    parse_verbalizer,
    prompt_argv,
    prompt_options,
    prompt_spec,
)
from deltatune.errors import UserError
from deltatune.loading import load_strategy
from deltatune.methods import REGISTRY
from deltatune.notune.chunking import Document, chunk_text
from deltatune.notune.encoder import TextEncoder
from deltatune.notune.index import VectorIndex, example_index
from deltatune.notune.job import predict_with_strategy, strategy_metrics
from deltatune.notune.prompts import PromptBuilder
from deltatune.notune.scoring import LabelScorer, _row_contexts, calibrate, load_language_model
from deltatune.workflow import TrainJob, run_train_job

TOY_WORDS = "pos=good,neg=bad"
CUE_TEMPLATE = "{text} so it was {label}"  # words the tiny word-level tokenizer knows


@pytest.fixture(scope="module")
def lms(tiny_dir):
    return {kind: load_language_model(tiny_dir(kind)) for kind in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def toy_task(toy_csv):
    return load_task(data=toy_csv)


def fast(**kw) -> TrainConfig:
    return TrainConfig(max_length=8, eval_batch_size=8, progress=False, **kw)


# templates and verbalizers ------------------------------------------------------------------------

def test_template_parts():
    t = Template("Review: {text}\nSentiment: {label}")
    assert t.query("A gem.") == "Review: A gem.\nSentiment:"
    assert t.label("great") == " great"  # the space before {label} belongs to the label continuation
    assert t.demo("A gem.", "great") == "Review: A gem.\nSentiment: great"


@pytest.mark.parametrize("text, message", [
    ("Review: {label}", "{text} exactly once"),
    ("{text} {text} {label}", "{text} exactly once"),
    ("Review: {text}", "{label} exactly once"),
    ("{label} {text}", "after the input"),
])
def test_bad_templates_are_clear_errors(text, message):
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Template(text)


def test_verbalizer_errors(lms):
    labels = ["neg", "pos"]
    with pytest.raises(UserError, match="label 'pos' is missing from the verbalizer"):
        parse_verbalizer("neg=bad", labels)
    with pytest.raises(UserError, match="names label 'meh'"):
        parse_verbalizer("neg=bad,pos=good,meh=so", labels)
    with pytest.raises(UserError, match="LABEL=WORD"):
        parse_verbalizer("neg:bad", labels)
    with pytest.raises(UserError, match="is empty"):
        parse_verbalizer("neg=bad,pos= ", labels)
    tok = lms["llama"].tokenizer
    with pytest.raises(UserError, match="same verbalizer tokens"):
        label_token_ids(tok, Template(CUE_TEMPLATE), ["good", "good"], labels)

    def drops_everything(text, add_special_tokens=False):  # a tokenizer whose normaliser drops the word
        return {"input_ids": []}

    with pytest.raises(UserError, match="'\u200b' of label 'neg' tokenizes to nothing"):
        label_token_ids(drops_everything, Template(CUE_TEMPLATE), ["\u200b", "good"], labels)


def test_builtin_and_user_prompts():
    spec = prompt_spec("rotten-tomatoes", ["fresh", "rotten"])
    assert spec.words == ["positive", "negative"] and "{text}" in spec.template.text
    user = prompt_spec("rotten-tomatoes", ["fresh", "rotten"], template="R: {text}\\nS: {label}",
                       verbalizer="fresh=great,rotten=terrible")
    assert user.template.text == "R: {text}\nS: {label}" and user.words == ["great", "terrible"]
    assert prompt_spec("mine", ["a_b", "c"]).words == ["a b", "c"]  # a data file: its label names
    assert PromptSpec.from_dict(user.to_dict(), ["fresh", "rotten"]).words == user.words


def test_prompt_flags_go_where_they_apply():
    icl, lora, features = REGISTRY["icl"], REGISTRY["lora"], REGISTRY["features"]
    assert prompt_options(icl, PromptArgs(shots=8, calibrate=True))[0] == {"shots": 8, "calibrate": True}
    with pytest.raises(UserError, match="--shots does not apply to method 'lora'"):
        prompt_options(lora, PromptArgs(shots=8))
    with pytest.raises(UserError, match="needs --objective verbalizer"):
        prompt_options(lora, PromptArgs(template="{text} {label}"))
    _, tuned = prompt_options(lora, PromptArgs(objective="verbalizer", verbalizer=TOY_WORDS))
    assert tuned.objective == "verbalizer" and tuned.verbalizer == TOY_WORDS
    # compare passes each child only its own flags
    both = PromptArgs(shots=4, objective="verbalizer")
    assert prompt_argv(icl, both) == ["--shots", "4"]
    assert prompt_argv(lora, both) == ["--objective", "verbalizer"]
    assert prompt_argv(features, both) == []


# scoring ------------------------------------------------------------------------------------------

def test_single_token_labels_share_one_row():
    assert _row_contexts([[7], [8], [9]]) == ([[]], [0, 0, 0])
    contexts, owner = _row_contexts([[7], [7, 8, 9], [10, 11]])
    assert contexts == [[7, 8], [10]] and owner == [0, 0, 1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_prefix_gives_the_same_scores_as_the_full_prompt(lms, kind):
    lm = lms[kind]
    labels = [[7], [15, 16], [15, 17, 18]]  # one-token and multi-token labels sharing a first token
    prefix = [5, 20, 21, 22, 23, 24, 25]
    queries = [[30, 31, 32], [33], [34, 35, 36, 37, 38], [39, 40]]
    cached = LabelScorer(lm, labels, batch_size=2).score(prefix, queries)  # several padded batches
    full = LabelScorer(lm, labels, use_cache=False).score(prefix, queries)
    reference = torch.zeros(len(queries), len(labels))
    with torch.no_grad():
        for n, query in enumerate(queries):
            for k, label in enumerate(labels):
                logp = lm.lm(torch.tensor([prefix + query + label])).logits[0].log_softmax(-1)
                start = len(prefix) + len(query) - 1
                reference[n, k] = sum(logp[start + j, t] for j, t in enumerate(label))
    assert torch.allclose(cached, full, atol=1e-5)
    assert torch.allclose(cached, reference, atol=1e-5)


def test_calibration_makes_content_free_inputs_uniform():
    content_free = torch.tensor([[-0.1, -2.5]]).log_softmax(-1)  # the model prefers label 0 on "N/A"
    assert torch.allclose(calibrate(content_free, content_free).exp(), torch.full((1, 2), 0.5))
    scores = torch.tensor([[-0.3, -1.4], [-0.9, -0.5]]).log_softmax(-1)
    assert scores.argmax(-1).tolist() == [0, 1]
    p_cf = torch.tensor([0.9, 0.1])  # dividing by p_cf favours the label the model under-predicts
    assert calibrate(scores, p_cf.log()[None]).argmax(-1).tolist() == [1, 1]


# prompts fitted to the context window -----------------------------------------------------------------

def builder(lm, budget: int, text_max: int = 6, description: str = "") -> PromptBuilder:
    spec = PromptSpec(Template(CUE_TEMPLATE), ["bad", "good"], ["neg", "pos"], description)
    return PromptBuilder(lm.tokenizer, spec, budget, text_max, demo_max_tokens=6, max_label_tokens=1)


def test_demonstrations_are_dropped_then_the_input_truncated(lms, toy_task):
    lm = lms["llama"]
    demos = toy_task.train[:6]
    wide = builder(lm, 200)
    prefix, used = wide.fit_shared(demos)
    assert used == 6
    narrow = builder(lm, 40)
    prefix, used = narrow.fit_shared(demos)
    assert 0 < used < 6 and len(prefix) + narrow.overhead + narrow.text_max_tokens <= 40
    cue = narrow._ids(" so it was")
    long_text = Example(text=" ".join(["movie"] * 50), label=0)
    tight = builder(lm, 12)  # no demonstration fits; the long input is cut, never the cue
    prefix, used = tight.fit_shared(demos)
    query = tight.query(long_text, len(prefix))
    assert used == 0 and len(prefix) + len(query) <= 12 and query[-len(cue):] == cue
    with pytest.raises(UserError, match="no room for the input"):
        builder(lm, 12, description=" ".join(["film"] * 20)).query(long_text, 21)


def test_retrieved_prompts_drop_the_least_similar_demonstration_first(lms, toy_task):
    b = builder(lms["llama"], 30)
    demos = toy_task.train[:4]  # most similar last
    prompt = b.fit_one(demos, toy_task.test[0])
    assert 0 < prompt.shots_used < 4
    kept = [t for d in demos[4 - prompt.shots_used:] for t in b.demo(d)]
    assert prompt.prefix == b.start + kept


# icl and knn as methods: train -> delta -> eval / predict ---------------------------------------------

def test_icl_trains_nothing_and_reloads_to_the_same_predictions(tiny_dir, toy_task, tmp_path):
    job = TrainJob("icl", toy_task, model=tiny_dir("llama"), train=fast(),
                   options={"shots": 2, "verbalizer": TOY_WORDS, "calibrate": True})
    metrics = run_train_job(job, tmp_path / "icl")
    for key in ("accuracy", "macro_f1", "peak_memory_mb", "train_seconds", "inference_ms_per_example",
                "delta_bytes", "prompt_tokens", "examples_per_second"):
        assert metrics[key] is not None, key
    assert metrics["trainable_params"] == 0 and metrics["shots_used"] == 2
    assert metrics["prompt_tokens"] <= 64  # the tiny model's context window
    meta = json.loads((tmp_path / "icl" / "delta.json").read_text())
    assert len(meta["strategy"]["demonstrations"]) == 2 and meta["backbone"]["pooling"] == "lm"
    strategy = load_strategy(tmp_path / "icl", meta)
    again = strategy_metrics(strategy, toy_task.test, 2)
    assert again["accuracy"] == metrics["accuracy"]
    out = predict_with_strategy(strategy, ["good film", "bad plot"], meta["task"]["label_names"])
    assert {r["label"] for r in out} <= {"neg", "pos"}
    assert abs(sum(out[0]["probabilities"].values()) - 1) < 1e-5


def test_icl_retrieved_and_knn_keep_an_index_and_check_its_encoder(tiny_dir, toy_task, tmp_path):
    encoder = tiny_dir("bert")
    job = TrainJob("icl", toy_task, model=tiny_dir("gpt2"), train=fast(),
                   options={"shots": 2, "demos": "retrieved", "verbalizer": TOY_WORDS, "encoder": encoder})
    metrics = run_train_job(job, tmp_path / "icl")
    assert 0 < metrics["shots_used"] <= 2 and (tmp_path / "icl" / "index" / "index.faiss").exists()
    meta = json.loads((tmp_path / "icl" / "delta.json").read_text())
    assert strategy_metrics(load_strategy(tmp_path / "icl", meta), toy_task.test, 2)["accuracy"] == metrics["accuracy"]

    knn = run_train_job(TrainJob("knn", toy_task, model=encoder, train=fast(), options={"k": 5}), tmp_path / "knn")
    assert knn["trainable_params"] == 0 and knn["delta_bytes"] > 0
    meta = json.loads((tmp_path / "knn" / "delta.json").read_text())
    assert strategy_metrics(load_strategy(tmp_path / "knn", meta), toy_task.test, 2)["accuracy"] == knn["accuracy"]
    with pytest.raises(UserError, match="different model"):
        load_strategy(tmp_path / "knn", meta, model=tiny_dir("bert", seed=1))


# the vector index -----------------------------------------------------------------------------------

def test_chunks_overlap_and_respect_the_size():
    text = " ".join(f"Sentence number {i} has some words in it." for i in range(40))
    chunks = chunk_text(text, max_words=20, overlap=5)
    assert len(chunks) > 5 and all(len(c.split()) <= 20 for c in chunks)
    for a, b in zip(chunks, chunks[1:]):
        assert a.split()[-1] in b.split()[:6]  # the next chunk repeats the end of the previous one
    assert chunks[-1].endswith("number 39 has some words in it.")
    with pytest.raises(UserError, match="overlap"):
        chunk_text(text, max_words=5, overlap=5)


def test_index_is_persistent_incremental_and_tied_to_its_encoder(tiny_dir, tmp_path):
    enc = TextEncoder(tiny_dir("bert"))
    docs = [Document("a", "the movie was good. the cast was great."), Document("b", "the bank price of shares"),
            Document("c", "the team won the match with a goal")]
    index = VectorIndex(enc.info)
    assert index.add_documents(docs[:2], enc)["added"] == 2
    index.save(tmp_path / "idx")
    index = VectorIndex.load(tmp_path / "idx")
    counts = index.add_documents([docs[0], Document("b", "the market profit"), docs[2]], enc)
    assert (counts["added"], counts["updated"], counts["unchanged"]) == (1, 1, 1)
    assert len(index) == 3 and {r["doc"] for r in index.records.values()} == {"a", "b", "c"}
    hits = index.query(enc, ["the market profit"], k=2)[0]
    assert hits[0].record["doc"] == "b" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    other = TextEncoder(tiny_dir("bert", seed=1))
    with pytest.raises(UserError, match="was built with encoder"):
        index.query(other, ["the market"], k=1)
    labelled = example_index(enc, [Example("good film", 1), Example("bad film", 0)], ["neg", "pos"])
    assert {r["label"] for r in labelled.records.values()} == {"neg", "pos"}


def test_index_cli_build_and_query(tiny_dir, tmp_path, capsys, monkeypatch):
    from deltatune.cli import main

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "sport.txt").write_text("the team won the match with a late goal")
    (tmp_path / "docs" / "money.md").write_text("the bank said shares and profit rose in the market")
    idx = str(tmp_path / "idx")
    for argv in (["index", "build", "--docs", str(tmp_path / "docs"), "--index", idx, "--encoder", tiny_dir("bert")],
                 ["index", "query", "shares and profit in the market", "--index", idx, "-k", "1", "--json"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    hits = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert len(hits) == 1 and hits[0]["doc"].endswith("money.md")
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "build", "--index", idx])
    assert exit_info.value.code == 2



def test_ask_puts_the_retrieved_chunks_that_fit_into_the_prompt(tiny_dir, lms, tmp_path):
    from deltatune.notune.ask import answer, search

    enc = TextEncoder(tiny_dir("bert"))
    index = VectorIndex(enc.info)
    index.add_documents([Document(f"d{i}", f"the team won the match {'and the goal ' * i}") for i in range(4)], enc)
    index.save(tmp_path / "idx")
    hits = search(str(tmp_path / "idx"), "who won the match", k=4, encoder=tiny_dir("bert"), device="cpu")
    assert len(hits) == 4 and hits[0].score >= hits[-1].score
    text, used, prompt_tokens = answer(lms["gpt2"], "who won the match", hits, max_new_tokens=4, max_prompt_tokens=40)
    assert isinstance(text, str) and 0 < len(used) < 4 and prompt_tokens <= 40
    assert used == hits[:len(used)]  # the lowest-ranked chunks are the ones dropped

# the verbalizer objective (PET / LM-BFF) ----------------------------------------------------------------

def test_verbalizer_head_is_the_lm_head_at_the_label_words(tiny_dir):
    from transformers import AutoModelForCausalLM

    from deltatune.backbone import load_task_model
    from deltatune.label_head import attach_label_head

    tm = load_task_model(tiny_dir("gpt2"), num_labels=2, pooling="last")
    prompt = attach_label_head(tm, prompt_spec("toy", ["neg", "pos"], template=CUE_TEMPLATE,
                                               verbalizer=TOY_WORDS).to_dict())
    assert tm.head_names == [] and not any(p.requires_grad for p in tm.module.parameters())
    ids = tm.tokenizer(["the movie was good"])["input_ids"]
    assert ids == tm.tokenizer.tokenizer(["the movie was good so it was"])["input_ids"]
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir("gpt2"))
    with torch.no_grad():
        expected = lm(torch.tensor(ids)).logits[:, -1, prompt["label_token_ids"]]
        got = tm.module(input_ids=torch.tensor(ids)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    cut = tm.tokenizer(["good " * 40], truncation=True, max_length=10)["input_ids"][0]
    assert len(cut) <= 10 and cut[-3:] == ids[0][-3:]  # truncation cuts the text, never the cue


@pytest.mark.parametrize("name", [m for m in ("lora", "prompt") if m in REGISTRY])
def test_prompt_based_tuning_trains_only_the_delta_and_reloads(tiny_dir, toy_task, tmp_path, name):
    from deltatune.batching import encode
    from deltatune.evaluate import evaluate
    from deltatune.loading import load_delta

    job = TrainJob(name, toy_task, model=tiny_dir("gpt2"), train=fast(epochs=1),
                   prompt=PromptArgs(objective="verbalizer", template=CUE_TEMPLATE, verbalizer=TOY_WORDS))
    metrics = run_train_job(job, tmp_path / "pet")
    loaded = load_delta(tmp_path / "pet")
    assert loaded.meta["prompt"]["objective"] == "verbalizer" and loaded.meta["head_names"] == []
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "pet" / "delta.safetensors"))
    assert tensors and not any(n.startswith("classifier.") for n in tensors)  # no classification head
    assert metrics["trainable_params"] == sum(t.numel() for t in tensors.values())
    rows = encode(loaded.task_model.tokenizer, toy_task.test, 8, "test")
    assert evaluate(loaded.task_model, rows)["accuracy"] == metrics["accuracy"]


def test_cli_train_icl_with_shots(tiny_dir, toy_csv, tmp_path, capsys):
    from deltatune.cli import main

    common = ["train", "--method", "icl", "--model", tiny_dir("llama"), "--data", toy_csv, "--max-length", "8",
              "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--shots", "1", "--verbalizer", TOY_WORDS, "--out", str(tmp_path / "d"), "--json"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out)["shots_used"] == 1
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--template", "no text here {label}", "--out", str(tmp_path / "e")])
    assert exit_info.value.code == 2 and "exactly once" in capsys.readouterr().err
    assert not Path(tmp_path / "e").exists()


# the real models -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_few_shot_cached_equals_full_and_predicts_labels():
    from deltatune.methods.icl import Config
    from deltatune.notune.icl import ICL

    torch.set_num_threads(2)
    task = load_task("rotten-tomatoes", train_size=200, test_size=6)
    lm = load_language_model("smollm2")
    spec = prompt_spec(task.name, task.label_names, task.description)
    scores = {}
    for cached in (True, False):
        icl = ICL(lm, spec, Config(shots=2, calibrate=True), use_cache=cached)
        icl.fit(task.train, seed=0)
        scores[cached] = icl.scores(task.test)
    assert icl.stats["shots_used"] == 2 and icl.stats["prefix_tokens"] > 20
    assert torch.allclose(scores[True], scores[False], atol=1e-4)
    assert torch.allclose(scores[True].exp().sum(-1), torch.ones(len(task.test)), atol=1e-5)


@pytest.mark.slow
def test_bbc_titles_find_their_articles():
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "bbc_retrieval.py"
    spec = importlib.util.spec_from_file_location("bbc_retrieval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    result = bench.evaluate(per_topic=10)  # 50 articles, their titles removed from the index
    assert result["second_build"]["unchanged"] == 25 and result["second_build"]["added"] == 25
    assert result["recall@5"] >= 0.8, result
