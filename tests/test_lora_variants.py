"""LoRA's options (rsLoRA, PiSSA / OLoRA, LoRA+, random ranks) and the LoRA variants (DoRA, VeRA, LoHa, LoKr).

Each variant's layer against its formula computed directly (ΔW formed) on a small layer; every one an
identity at init on tiny BERT / Llama / GPT-2 / T5 models, PiSSA / OLoRA included; save -> load and
merge give the adapted logits; per-row serving (RowRouter) gives each row its own task's output, with
LoRA-shaped variants batched in LoRA's table; peft parity for the variants peft has.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification

from deltatune.backbone import load_task_model
from deltatune.delta import save_delta
from deltatune.errors import UserError
from deltatune.loading import load_delta
from deltatune.methods import resolve_method
from deltatune.methods.dora import DoRALinear
from deltatune.methods.loha import Config as LoHaConfigOurs
from deltatune.methods.loha import LoHaLinear
from deltatune.methods.lokr import Config as LoKrConfigOurs
from deltatune.methods.lokr import LoKrLinear
from deltatune.methods.lora import Config as LoRAConfig
from deltatune.methods.lora import LoRALinear
from deltatune.methods.vera import Config as VeRAConfigOurs
from deltatune.methods.vera import VeRALinear, projections
from deltatune.peft_format import export_peft, import_peft
from deltatune.serve.routing import RowRouter

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
TEXTS = ["good movie with a great actor", "bad plot", "the film was very dull and boring", "a story"]
VARIANTS = {"pissa": ("lora", {"init": "pissa"}), "olora": ("lora", {"init": "olora", "scaling": "rslora"}),
            "rrlora": ("rrlora", {}), "dora": ("dora", {}), "dora_pissa": ("dora", {"init": "pissa", "r": 4}),
            "vera": ("vera", {"r": 16}), "loha": ("loha", {"r": 4}), "lokr": ("lokr", {"r": 2})}


def randomise(module: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)


def frozen_linear(k: int = 12, d: int = 8) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, d).requires_grad_(False)


# ---- each formula against a direct computation (ΔW formed) ----------------------------------------------

def direct(layer: nn.Module) -> torch.Tensor:
    """The adapted weight W' (d, k), formed from the variant's own tensors by its paper's formula."""
    w0 = layer.base_layer.weight
    if isinstance(layer, DoRALinear):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w = w0 + layer.scaling["default"] * b @ a
        return layer.lora_magnitude_vector["default"][:, None] * w / w.norm(dim=1, keepdim=True)
    if isinstance(layer, LoRALinear):
        return w0 + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    if isinstance(layer, VeRALinear):
        d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
        return w0 + torch.diag(b) @ layer.vera_B @ torch.diag(d) @ layer.vera_A
    if isinstance(layer, LoHaLinear):
        f = {n: getattr(layer, n)["default"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        return w0 + layer.scaling["default"] * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    c, b, a = (getattr(layer, n)["default"] for n in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))
    return w0 + layer.scaling["default"] * torch.kron(c, b @ a)


def small_layers(base: nn.Linear) -> dict[str, nn.Module]:
    shared = projections(6, 12, 8, seed=3)
    return {"rslora": LoRALinear(base, 4, 8.0, 0.0, scale=LoRAConfig(r=4, scaling="rslora").scale(4)),
            "dora": DoRALinear(base, 3, 6.0, 0.0), "vera": VeRALinear(base, shared, VeRAConfigOurs(r=6)),
            "loha": LoHaLinear(base, LoHaConfigOurs(r=3, alpha=5.0)), "lokr": LoKrLinear(base, LoKrConfigOurs(r=2))}


@pytest.mark.parametrize("name", ["rslora", "dora", "vera", "loha", "lokr"])
def test_each_variant_computes_its_formula(name):
    base = frozen_linear()
    layer = small_layers(base)[name]
    x = torch.randn(2, 5, 12)  # (B, T, k)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)  # an identity at init
    randomise(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ direct(layer).T + base.bias, atol=1e-5, rtol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r_and_peft_export_says_so():
    assert LoRAConfig(r=16, alpha=8.0, scaling="rslora").scale(16) == 2.0
    assert LoRAConfig(r=16, alpha=8.0).scale(16) == 0.5
    fields, _ = resolve_method("lora")[0].to_peft(LoRAConfig(scaling="rslora"), {})
    assert fields["use_rslora"] is True


def test_vera_matrices_are_slices_of_one_seeded_pair():
    a, b = projections(6, 12, 8, seed=3)
    layer = VeRALinear(nn.Linear(10, 7), (a, b), VeRAConfigOurs(r=6))
    assert torch.equal(layer.vera_A, a[:, :10]) and torch.equal(layer.vera_B, b[:7])
    assert torch.equal(projections(6, 12, 8, seed=3)[0], a) and not torch.equal(projections(6, 12, 8, seed=4)[0], a)


# ---- LoRA+ and random ranks ---------------------------------------------------------------------------------

def test_lora_plus_puts_every_b_at_lr_ratio_times_the_lr(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=3)
    method, config = resolve_method("lora", {"lr_ratio": "16"})
    method.apply(tm, config)
    groups = method.param_groups(tm, config, 1e-3, 0.01)
    names = {id(p): n for n, p in tm.module.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in tm.module.parameters() if p.requires_grad)  # each once
    for group in groups:
        is_b = {".lora_B." in names[id(p)] for p in group["params"]}
        assert len(is_b) == 1 and group["lr"] == pytest.approx(1.6e-2 if is_b.pop() else 1e-3)
    plain = method.param_groups(tm, resolve_method("lora")[1], 1e-3, 0.01)
    assert {g["lr"] for g in plain} == {1e-3}


def test_random_ranks_are_seeded_per_matrix_and_checked(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), num_labels=3)
    method, config = resolve_method("rrlora", {"target_modules": "query,key,value,ffn_in,ffn_out"})
    method.apply(tm, config)
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in tm.module.named_modules()
             if isinstance(m, LoRALinear)}
    assert len(ranks) == 10 and all(1 <= r <= 16 for r in ranks.values()) and len(set(ranks.values())) > 1
    assert all(m.scaling["default"] == 16.0 / m.lora_A["default"].weight.shape[0]
               for m in tm.module.modules() if isinstance(m, LoRALinear))
    again = resolve_method("rrlora", {"target_modules": "query,key,value,ffn_in,ffn_out"})[1]
    assert all(again.rank_of(n) == r for n, r in ranks.items())
    other = resolve_method("rrlora", {"rank_seed": "1", "target_modules": "query,key,value,ffn_in,ffn_out"})[1]
    assert any(other.rank_of(n) != r for n, r in ranks.items())
    with pytest.raises(UserError, match="random_ranks"):
        resolve_method("lora", {"random_ranks": "8-2"})


# ---- on tiny models: identity at init, save -> load, merge ------------------------------------------------

def logits(module: nn.Module, inputs: dict) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(**inputs).logits


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "t5"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_starts_at_the_base_model_then_saves_loads_and_merges(tiny_dir, tmp_path, kind, variant):
    tm = load_task_model(tiny_dir(kind), num_labels=3)
    inputs = dict(tm.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    reference = logits(tm.module, inputs)
    name, options = VARIANTS[variant]
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    assert (logits(tm.module, inputs) - reference).abs().max() <= 1e-5  # PiSSA / OLoRA too: W0 x + s(BA − B0A0)x
    randomise(tm.module, std=0.1)
    adapted = logits(tm.module, inputs)
    assert (adapted - reference).abs().max() > 10 * TOL
    save_delta(tmp_path / "d", tm, method, config, {"task": {"name": "toy", "label_names": ["a", "b", "c"]}})
    loaded = load_delta(tmp_path / "d")
    assert (logits(loaded.task_model.module, inputs) - adapted).abs().max() <= 1e-5
    method.merge(tm, config)
    assert not any(isinstance(m, (LoRALinear, VeRALinear, LoHaLinear, LoKrLinear)) for m in tm.module.modules())
    assert (logits(tm.module, inputs) - adapted).abs().max() <= TOL


# ---- per row ----------------------------------------------------------------------------------------------

def two_sites(name: str, base: nn.Linear) -> list[nn.Module]:
    sites = []
    for seed in (1, 2):
        site = small_layers(base)[name]
        randomise(site, seed=seed)
        sites.append(site)
    return sites


@pytest.mark.parametrize("name", ["dora", "vera", "loha", "lokr"])
def test_rows_of_two_tasks_and_bare_rows_each_get_their_own_output(name):
    base = frozen_linear()
    sites = two_sites(name, base)
    router = RowRouter(base, sites[0].row_key(), type(sites[0]))
    for task, site in zip("ab", sites):
        router.add(task, site)
    x = torch.randn(4, 3, 12)  # (B, T, k)
    with torch.no_grad():
        for tasks in (["b", None, "a", "a"], ["a", None, "a", None], ["b"] * 4):
            router.begin(tasks)
            out = router(x)
            router.end()
            for row, task in enumerate(tasks):
                want = base(x[row]) if task is None else sites["ab".index(task)](x[row])
                torch.testing.assert_close(out[row], want, atol=1e-5, rtol=1e-5)


def test_loha_rows_share_lora_s_table_and_vera_passes_its_projections_once():
    base = frozen_linear()
    lora_site = LoRALinear(base, 2, 4.0, 0.0)
    loha, vera = (small_layers(base)[n] for n in ("loha", "vera"))
    for i, site in enumerate([lora_site, loha, vera]):
        randomise(site, seed=i)
    assert lora_site.row_key() == loha.row_key() == "lora" and vera.row_key().startswith("vera:")
    router = RowRouter(base, "lora", LoRALinear)
    for task, site in (("lora", lora_site), ("loha", loha)):
        router.add(task, site)
    x = torch.randn(4, 3, 12)
    tasks = ["loha", None, "lora", "loha"]
    with torch.no_grad():
        router.begin(tasks)
        out = router(x)
        for row, task in enumerate(tasks):
            site = {"lora": lora_site, "loha": loha, None: base}[task]
            torch.testing.assert_close(out[row], site(x[row]), atol=1e-5, rtol=1e-5)
    router = RowRouter(base, vera.row_key(), type(vera))
    router.add("v1", vera)
    router.add("v2", vera)
    with torch.no_grad():
        router.begin(["v1", "v2", None])
    shared_a = router.rows.tensors[0]
    assert shared_a.shape == vera.vera_A.shape and shared_a.data_ptr() == vera.vera_A.data_ptr()  # not stacked


# ---- peft parity --------------------------------------------------------------------------------------------

PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def export_a_random_delta(path: str, name: str, options: dict, tmp_path):
    """A 3-label classifier on `path` with a perturbed `name` delta, saved and exported to tmp_path/peft:
    (the method, its inputs, its logits)."""
    tm = load_task_model(path, num_labels=3)
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    randomise(tm.module, std=0.1)
    inputs = dict(tm.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = logits(tm.module, inputs)
    save_delta(tmp_path / "delta", tm, method, config,
               {"task": {"name": "toy", "label_names": ["a", "b", "c"]}, "head_names": tm.head_names})
    export_peft(tmp_path / "delta", tmp_path / "peft")
    return method, inputs, expected


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("variant", ["dora", "pissa", "olora", "vera", "loha", "lokr"])
def test_export_gives_peft_the_same_logits(tiny_dir, tmp_path, kind, variant):
    name, options = VARIANTS[variant]
    method, inputs, expected = export_a_random_delta(tiny_dir(kind), name, options, tmp_path)
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == method.PEFT_TYPE and adapter_config.get("use_dora", False) == (name == "dora")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir(kind), num_labels=3)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    assert (logits(peft_model, inputs) - expected).abs().max() <= TOL


def peft_variant(path: str, kind: str, name: str):
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    targets = PEFT_TARGETS[kind]
    config = {"vera": lambda: VeraConfig(task_type="SEQ_CLS", r=16, target_modules=targets, save_projection=True),
              "loha": lambda: LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, target_modules=targets),
              "lokr": lambda: LoKrConfig(task_type="SEQ_CLS", r=2, alpha=4, target_modules=targets)}[name]()
    return get_peft_model(base, config)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("name", ["vera", "loha", "lokr"])
def test_import_of_a_peft_adapter_gives_the_same_logits(tiny_dir, tmp_path, kind, name):
    path = tiny_dir(kind)
    peft_model = peft_variant(path, kind, name)
    randomise(peft_model, std=0.1)
    inputs = dict(load_task_model(path, num_labels=3).tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    import_peft(tmp_path / "peft", tmp_path / "delta", model=path, labels="a,b,c")
    loaded = load_delta(tmp_path / "delta")
    assert loaded.meta["method"] == name
    assert (logits(loaded.task_model.module, inputs) - expected).abs().max() <= TOL


def test_pissa_factors_are_the_top_singular_part_of_w0():
    base = frozen_linear()
    layer = LoRALinear(base, 3, 6.0, 0.0, init="pissa")
    u, s, vh = torch.linalg.svd(base.weight, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.scaling["default"] * b @ a, top, atol=1e-5, rtol=1e-5)
    assert not layer.lora_A0["default"].requires_grad and math.isclose(layer.scaling["default"], 2.0)


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_dora_and_pissa_read_a_quantised_weight_dequantised(tiny_dir, variant):
    """On an int8-stored backbone (--quantize), W0 for DoRA's norm and PiSSA's SVD is the dequantised weight."""
    tm = load_task_model(tiny_dir("llama"), num_labels=3, quantize="int8")
    inputs = dict(tm.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    reference = logits(tm.module, inputs)
    name, options = VARIANTS[variant]
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    assert (logits(tm.module, inputs) - reference).abs().max() <= 1e-5
    tm.module.train()
    tm.module(**inputs, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert all(p.grad is not None for n, p in tm.module.named_parameters() if p.requires_grad and "lora_" in n)


# peft LoRA with DoRA, rsLoRA, PiSSA, OLoRA: imported as `dora` (use_dora) or `lora`, with the options kept
PEFT_LORA = {"dora": {"use_dora": True}, "dora_rslora": {"use_dora": True, "use_rslora": True},
             "rslora": {"use_rslora": True}, "pissa": {"init_lora_weights": "pissa"},
             "olora": {"init_lora_weights": "olora", "use_rslora": True},
             "dora_pissa": {"use_dora": True, "init_lora_weights": "pissa"}}
PEFT_LORA_CASES = [("bert", c) for c in PEFT_LORA] + [("llama", "dora"), ("llama", "pissa"), ("gpt2", "dora")]


def import_and_compare(tmp_path, path: str, peft_dir, inputs: dict, expected: torch.Tensor) -> dict:
    import_peft(peft_dir, tmp_path / "imported", model=path, labels=None if expected.ndim == 3 else "a,b,c")
    loaded = load_delta(tmp_path / "imported")
    assert (logits(loaded.task_model.module, inputs) - expected).abs().max() <= TOL
    return loaded.meta


@pytest.mark.parametrize("kind,case", PEFT_LORA_CASES)
def test_import_of_peft_lora_options_gives_the_same_logits(tiny_dir, tmp_path, kind, case):
    """pissa / olora saved as peft saves them by default (A, B only; peft's base was W0 − s·B0A0): imported
    against the original base, as PeftModel.from_pretrained loads them."""
    path = tiny_dir(kind)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    targets = PEFT_TARGETS.get(kind, ["c_attn"])
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                                                 **PEFT_LORA[case]))
    randomise(peft_model, std=0.1)
    inputs = dict(load_task_model(path, num_labels=3).tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    meta = import_and_compare(tmp_path, path, tmp_path / "peft", inputs, expected)
    options = PEFT_LORA[case]
    assert meta["method"] == ("dora" if options.get("use_dora") else "lora")
    assert meta["method_config"]["scaling"] == ("rslora" if options.get("use_rslora") else "default")
    assert meta["method_config"]["init"] == options.get("init_lora_weights", "default")


def test_import_of_a_converted_peft_pissa_adapter_is_plain_lora(tiny_dir, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...): rank 2r, [A; A0], [B, −B0]. A causal LM
    (peft's conversion drops a classifier's modules_to_save tensors) on deltatune's load, whose lm_head (not
    in the tiny folder) is seeded as the import's is."""
    path = tiny_dir("llama")
    peft_model = get_peft_model(load_task_model(path, num_labels=0, pooling="lm").module, LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa",
        use_rslora=True))
    peft_model.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial adapter
    peft_model.save_pretrained(str(tmp_path / "init"))
    randomise(peft_model, std=0.1)
    inputs = dict(load_task_model(path, num_labels=3).tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = logits(peft_model, inputs)  # (B, T, vocab)
    peft_model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    meta = import_and_compare(tmp_path, path, tmp_path / "peft", inputs, expected)
    assert meta["method"] == "lora" and meta["method_config"]["r"] == 8 and meta["method_config"]["init"] == "default"


def test_peft_lora_and_dora_configs_go_to_their_own_method():
    from deltatune.peft_format import method_for_peft

    assert method_for_peft({"peft_type": "LORA"}).NAME == "lora"
    assert method_for_peft({"peft_type": "LORA", "use_dora": True}).NAME == "dora"
    assert method_for_peft({"peft_type": "LOKR"}).NAME == "lokr"
    with pytest.raises(UserError, match="cannot import peft type 'BOFT'"):
        method_for_peft({"peft_type": "BOFT"})


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_loha_lokr_on_gpt2_conv1d_are_refused_at_export_not_written_unloadable(tiny_dir, tmp_path, name):
    with pytest.raises(UserError, match=f"peft's {name.upper()} has no layer for gpt2's Conv1D"):
        export_a_random_delta(tiny_dir("gpt2"), name, {}, tmp_path)
    assert not (tmp_path / "peft").exists()


def test_vera_on_gpt2_conv1d_goes_to_peft_and_back(tiny_dir, tmp_path):
    """GPT-2's fused Conv1D c_attn (peft has no LoHa / LoKr for Conv1D; its VeRA reads it transposed)."""
    path = tiny_dir("gpt2")
    _, inputs, expected = export_a_random_delta(path, "vera", {"r": 16}, tmp_path)
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=3),
                                           str(tmp_path / "peft"))
    assert (logits(peft_model, inputs) - expected).abs().max() <= TOL
    assert import_and_compare(tmp_path, path, tmp_path / "peft", inputs, expected)["method"] == "vera"
