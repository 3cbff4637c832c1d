"""`export --format merged`: transformers' own Auto class on OUT gives the delta's logits; unmergeable refused."""

import json

import pytest
import torch
from tiny import perturb

from deltatune.backbone import load_task_model
from deltatune.cli import main
from deltatune.delta import save_delta
from deltatune.loading import load_delta
from deltatune.methods import resolve_method

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 10, 20, 30, 40, 50, 60], [5, 11, 21, 31, 41, 51, 61]])  # (2, 7)
OPTIONS = {"lora": {"target_modules": "query,value,attn_out,ffn_out"}, "adalora": {"target_modules": "query,ffn_in"},
           "ia3": {}, "bitfit": {}, "full": {}, "head": {"unfreeze_last": 1}}


def write_delta(tmp_path, model_dir, method_name, pooling, labels=()):
    method, config = resolve_method(method_name, OPTIONS[method_name])
    tm = load_task_model(model_dir, len(labels), pooling=pooling, seed=0)
    method.apply(tm, config)
    torch.manual_seed(0)
    perturb(tm.module, 0.05)  # every trainable tensor away from its identity start
    save_delta(tmp_path / "delta", tm, method, config,
               {"task": {"name": "toy", "label_names": list(labels)}, "head_names": tm.head_names})
    return str(tmp_path / "delta")


def delta_logits(delta):
    with torch.no_grad():
        return load_delta(delta).task_model.module(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_merged_causal_lm_gives_the_delta_logits(tiny_dir, tmp_path, capsys, kind, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (kind, method) == ("llama", "bitfit"):
        pytest.skip("Llama has no bias terms")
    delta = write_delta(tmp_path, tiny_dir(kind), method, "lm")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", delta, str(tmp_path / "merged"), "--format", "merged"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        logits = merged(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    expected = delta_logits(delta)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    bare = load_task_model(tiny_dir(kind), 0, pooling="lm").module
    with torch.no_grad():  # the delta changes the logits: the test would notice a merge that did nothing
        assert (bare(input_ids=IDS).logits - expected).abs().max() > 1e-3
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").convert_ids_to_tokens([7]) == ["good"]


@pytest.mark.parametrize("method", ["lora", "head"])
def test_merged_sequence_classifier_gives_the_delta_logits(tiny_dir, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    delta = write_delta(tmp_path, tiny_dir("llama"), method, "hf", labels=("neg", "pos"))
    with pytest.raises(SystemExit):
        main(["export", delta, str(tmp_path / "merged"), "--format", "merged"])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        logits = merged(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    torch.testing.assert_close(logits, delta_logits(delta), atol=1e-4, rtol=1e-4)
    assert merged.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("method,pooling,message", [
    ("prompt", "lm", "method 'prompt' cannot be merged .*--format peft"),
    ("prefix", "lm", "method 'prefix' cannot be merged"),
    ("ptuning", "lm", "method 'ptuning' cannot be merged"),
    ("adapter", "lm", "method 'adapter' cannot be merged"),
    ("lora", "mean", r"pooled head \(--pooling mean\) has no transformers class"),
])
def test_unmergeable_deltas_are_refused(tiny_dir, tmp_path, capsys, method, pooling, message):
    import re

    labels = ("neg", "pos") if pooling == "mean" else ()
    method_, config = resolve_method(method, OPTIONS.get(method, {}))
    tm = load_task_model(tiny_dir("llama"), len(labels), pooling=pooling, seed=0)
    method_.apply(tm, config)
    save_delta(tmp_path / "delta", tm, method_, config, {"task": {"name": "toy", "label_names": list(labels)}})
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "delta"), str(tmp_path / "merged"), "--format", "merged"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "merged").exists()


def test_merged_export_keeps_the_chat_template(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    write_delta(tmp_path, tiny_dir("llama"), "lora", "lm")
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    model_copy = tmp_path / "model"
    import shutil

    shutil.copytree(meta["backbone"]["path"], model_copy)
    tok = AutoTokenizer.from_pretrained(model_copy)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(model_copy)
    from deltatune.export_merged import export_merged

    meta["backbone"]["path"] = str(model_copy)
    (tmp_path / "delta" / "delta.json").write_text(json.dumps(meta))
    export_merged(tmp_path / "delta", tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template
