"""S4: grouping and allocation on 2- to 12-layer models, the budget, the `layers` option of the composed
methods (a hidden prefix is exact), a composite delta round trip, and a small search."""

import shutil

import pytest
import torch

from deltatune.backbone import load_task_model
from deltatune.delta import save_delta
from deltatune.errors import UserError
from deltatune.loading import load_delta
from deltatune.methods import resolve_method, s4
from deltatune.methods.base import count_parameters, layer_of
from deltatune.search import parse_budget

NO_BIAS_GROUPS = "A+L,A+P,A+P,P+L"  # Llama has no biases: no BitFit


@pytest.mark.parametrize("layers", range(2, 13))
def test_grouping_patterns(layers):
    sizes = {name: s4.group_sizes(layers, name) for name in s4.GROUPINGS}
    for name, groups in sizes.items():
        assert sum(groups) == layers and len(groups) == 4
        if layers >= 4:
            assert min(groups) >= 1, name
        flat = [i for group in s4.group_layers(layers, name) for i in group]
        assert flat == list(range(layers))  # consecutive, bottom to top
    inc, uni, dec = sizes["increasing"], sizes["uniform"], sizes["decreasing"]
    assert inc == sorted(inc) and dec == sorted(dec, reverse=True) and max(uni) - min(uni) <= 1
    spindle, bottleneck = sizes["spindle"], sizes["bottleneck"]
    assert max(spindle[0], spindle[3]) <= min(spindle[1], spindle[2]) + 1
    assert min(bottleneck[0], bottleneck[3]) + 1 >= max(bottleneck[1], bottleneck[2])


def test_twelve_layers_split_as_the_patterns_say():
    assert s4.group_sizes(12, "spindle") == [2, 4, 4, 2]
    assert s4.group_sizes(12, "bottleneck") == [4, 2, 2, 4]
    assert s4.group_sizes(12, "uniform") == [3, 3, 3, 3]
    assert s4.group_sizes(12, "increasing") == [1, 2, 4, 5]
    assert s4.group_sizes(12, "decreasing") == [5, 4, 2, 1]


@pytest.mark.parametrize("layers", [2, 5, 12])
def test_allocation_weights(layers):
    groups = s4.group_layers(layers, "spindle")
    for name in s4.ALLOCATIONS:
        weights = s4.allocation_weights(name, groups)
        mean = sum(w * len(g) for w, g in zip(weights, groups, strict=True)) / layers
        assert mean == pytest.approx(1.0)
    inc = s4.allocation_weights("increasing", groups)
    assert inc == sorted(inc) and inc[0] < inc[-1]


def test_parse_groups_and_budget():
    assert s4.parse_groups(("A+L", "none", "prefix+bitfit", "L")) == [
        ("adapter", "lora"), (), ("prefix", "bitfit"), ("lora",)]
    with pytest.raises(UserError, match="unknown strategy"):
        s4.parse_groups(("A+X", "A", "A", "A"))
    with pytest.raises(UserError, match="every group is frozen"):
        s4.parse_groups(("none",) * 4)
    assert parse_budget("0.5%") == pytest.approx(0.005) and parse_budget("0.01") == 0.01
    with pytest.raises(UserError):
        parse_budget("2x")


@pytest.fixture(scope="module")
def twelve_layer_bert(tiny_dir, tmp_path_factory):
    """The tiny BERT with 12 layers (same tokenizer)."""
    import tiny
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert12")
    config = tiny.tiny_config("bert")
    config.num_hidden_layers = 12
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    source = tiny_dir("bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source_file := __import__("pathlib").Path(source) / name).exists():
            shutil.copy(source_file, folder / name)
    return str(folder)


def delta_params(task_model) -> int:
    """Trainable parameters besides the head."""
    head = set(task_model.head_names)
    return sum(p.numel() for n, p in task_model.module.named_parameters() if p.requires_grad and n not in head)


@pytest.mark.parametrize("design", [("spindle", "uniform", s4.PAPER_GROUPS),
                                    ("increasing", "decreasing", ("A", "none", "P+B", "L+B")),
                                    ("bottleneck", "increasing", ("B", "A+P+B+L", "L", "none"))])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_budget_is_respected_on_twelve_layers(twelve_layer_bert, design, budget):
    tm = load_task_model(twelve_layer_bert, num_labels=2)
    backbone = count_parameters(tm.backbone)[1]
    config = s4.Config(grouping=design[0], allocation=design[1], groups=design[2], budget=budget)
    plan = s4.plan_for(tm, config)
    s4.apply(tm, config)
    assert delta_params(tm) == plan.params <= budget * backbone
    assert plan.params > 0.5 * budget * backbone  # the sizes grew to use the budget
    for g, layers in enumerate(plan.layers):  # frozen groups get nothing
        trained = {layer_of(tm, n) for n, p in tm.module.named_parameters() if p.requires_grad}
        assert bool(set(layers) & trained) == bool(plan.methods[g]) or "prefix" in plan.methods[g]


def test_a_budget_below_the_smallest_design_is_an_error(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=2)
    with pytest.raises(UserError, match="below this design's smallest size"):
        s4.plan_for(tm, s4.Config(budget=0.0001))


def test_layers_option_restricts_lora_adapter_bitfit(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=2)
    for name, options in (("bitfit", {"layers": "1"}), ("lora", {"layers": "1"}), ("adapter", {"layers": "1"})):
        method, config = resolve_method(name, options)
        method.apply(tm, config)
    trained = {layer_of(tm, n) for n, p in tm.module.named_parameters() if p.requires_grad and n not in tm.head_names}
    assert trained == {1}
    with pytest.raises(UserError, match="layer 7 does not exist"):
        resolve_method("lora", {"layers": "7"})[0].apply(tm, resolve_method("lora", {"layers": "7"})[1])


@pytest.mark.parametrize(("kind", "impl"), [("bert", "sdpa"), ("bert", "eager"), ("llama", "sdpa")])
def test_a_layer_outside_prefix_layers_sees_no_prefix(tiny_dir, kind, impl):
    tm = load_task_model(tiny_dir(kind), num_labels=2)
    for module in tm.module.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = impl
    method, config = resolve_method("prefix", {"num_virtual_tokens": 3, "layers": "0", "projection": "false"})
    method.apply(tm, config)
    attention = tm.layers()[1].get_submodule("attention.self" if kind == "bert" else "self_attn")
    seen = {}
    hook = attention.register_forward_hook(lambda m, a, kw, out: seen.update(
        x=a[0] if a else kw["hidden_states"], kw=kw, out=out[0]), with_kwargs=True)
    texts = ["good movie", "the plot was awful"]  # padded: a real mask
    inputs = dict(tm.tokenizer(texts, padding=True, return_tensors="pt"))
    tm.module.eval()
    with torch.no_grad():
        with_prefix = tm.module(**inputs).logits
        hook.remove()
        tm.module.prompt_encoder["default"].prefix.add_(1.0)  # layer 0's prefix does matter
        moved = tm.module(**inputs).logits
        tm.module.prefix_hooks.remove()
        mask = inputs["attention_mask"].bool()  # (B, T): layer 1 alone, without any cache or hook
        t = mask.shape[1]
        allowed = mask[:, None, None, :] & (torch.ones(t, t).tril().bool() if kind == "llama" else True)
        plain_mask = allowed if impl == "sdpa" else (~allowed).float() * torch.finfo(torch.float32).min
        extra = {"position_embeddings": seen["kw"]["position_embeddings"]} if kind == "llama" else {}
        alone = attention(hidden_states=seen["x"], attention_mask=plain_mask, **extra)[0]
    valid = mask[..., None]  # padded query rows may differ
    assert torch.allclose(alone * valid, seen["out"] * valid, atol=1e-5)
    assert not torch.allclose(with_prefix, moved)


@pytest.mark.parametrize(("kind", "groups"), [("bert", ",".join(s4.PAPER_GROUPS)), ("llama", NO_BIAS_GROUPS)])
def test_composite_delta_round_trip(tiny_dir, tmp_path, kind, groups):
    tm = load_task_model(tiny_dir(kind), num_labels=3)
    method, config = resolve_method("s4", {"groups": groups, "grouping": "uniform", "allocation": "increasing"})
    method.apply(tm, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = dict(tm.tokenizer(["good movie", "the plot was awful and dull"], padding=True, return_tensors="pt"))
    tm.module.eval()
    with torch.no_grad():
        expected = tm.module(**inputs).logits
    save_delta(tmp_path / "d", tm, method, config, {"task": {"name": "toy", "label_names": ["a", "b", "c"]}})
    loaded = load_delta(tmp_path / "d")
    with torch.no_grad():
        assert torch.allclose(loaded.task_model.module(**inputs).logits, expected, atol=1e-6)
    assert loaded.meta["method_config"]["grouping"] == "uniform"


def test_search_end_to_end(tiny_dir, toy_csv, tmp_path):
    import json

    from deltatune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--model", tiny_dir("bert"), "--data", str(toy_csv), "--budget", "5%", "--trials", "3",
              "--epochs", "1", "--batch-size", "32", "--baselines", "lora", "--out", str(tmp_path / "s"),
              "--threads", "1"])
    assert exit_info.value.code == 0
    report = json.loads((tmp_path / "s" / "search.json").read_text())
    assert report["candidates"][0]["name"] == "s4-paper" and len(report["candidates"]) == 3
    assert all(c["params"] <= report["budget_params"] for c in report["candidates"])
    steps = [c["scores"][-1][0] for c in report["candidates"]]
    assert max(steps) == report["total_steps"] and min(steps) < report["total_steps"]  # poor designs stopped
    assert [row["name"] for row in report["final"]] == [report["winner"], "lora"]
