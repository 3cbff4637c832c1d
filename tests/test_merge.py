"""`deltatune merge`: LoRA-family deltas of one backbone combined per module's ΔW into a normal LoRA delta.

Linear with weights (1, 0) gives the first delta back exactly; weights apply to ΔW (1, -1 of one delta
is the zero update); svd at full rank equals the sum; TIES and DARE are deterministic with a seed and
TIES elects signs as its paper says; other backbones, other kinds, DoRA and differing heads are refused
with one line.
"""

from __future__ import annotations

import pytest
import torch
from test_serve_engine import make_delta as serve_delta

from deltatune.cli import main
from deltatune.delta import read_meta, read_tensors
from deltatune.errors import UserError
from deltatune.loading import load_delta
from deltatune.merge import merge_deltas, ties_combine

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["good movie with a great actor", "bad plot", "the film was very dull and boring"]


def make_delta(out, model: str, method: str = "lora", options: dict | None = None, seed: int = 0) -> str:
    """A delta of `method` with every trained tensor moved (seeded): test_serve_engine's."""
    return str(serve_delta(out, model, method, options or {"r": 4}, seed=seed))


def logits(path, texts=TEXTS) -> torch.Tensor:
    tm = load_delta(path).task_model
    with torch.no_grad():
        return tm.module(**tm.tokenizer(texts, padding=True, return_tensors="pt")).logits


def delta_ws(path) -> dict[str, torch.Tensor]:
    """Per module s·B·A of a saved LoRA delta."""
    tensors, meta = read_tensors(path), read_meta(path)
    scale = meta["method_config"]["alpha"] / meta["method_config"]["r"]
    return {k.removesuffix(".lora_A.default.weight"): scale * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
            for k in tensors if k.endswith(".lora_A.default.weight")}


@pytest.fixture(scope="module")
def two(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = tiny_dir("bert")
    return model, root, make_delta(root / "a", model, seed=1), make_delta(root / "b", model, seed=2)


def test_linear_with_weights_one_zero_gives_the_first_delta_back_exactly(two, tmp_path):
    _, _, a, b = two
    merge_deltas([a, b], [1.0, 0.0], "linear", str(tmp_path / "m"), head_from=a)
    merged, first = read_tensors(tmp_path / "m"), read_tensors(a)
    assert merged.keys() == first.keys() and all(torch.equal(merged[k], first[k]) for k in first)
    assert torch.equal(logits(tmp_path / "m"), logits(a))


def test_weights_apply_to_delta_w(two, tmp_path):
    _, _, a, b = two
    merge_deltas([a, b], [0.5, -1.5], "linear", str(tmp_path / "m"), head_from=b)
    wa, wb, wm = delta_ws(a), delta_ws(b), delta_ws(tmp_path / "m")
    assert all(torch.allclose(wm[k], 0.5 * wa[k] - 1.5 * wb[k], atol=1e-5) for k in wa)
    merge_deltas([a, a], [1.0, -1.0], "linear", str(tmp_path / "zero"))  # task arithmetic: a − a = 0
    assert all(w.abs().max() < 1e-6 for w in delta_ws(tmp_path / "zero").values())
    merge_deltas([a, b], [0.5, -1.5], "svd", str(tmp_path / "svd"), rank=8, head_from=b)  # full rank: the sum
    assert all(torch.allclose(delta_ws(tmp_path / "svd")[k], wm[k], atol=1e-4) for k in wa)
    assert read_tensors(tmp_path / "svd")["bert.encoder.layer.0.attention.self.query.lora_A.default.weight"].shape[0] == 8


def test_ties_and_dare_are_deterministic_with_a_seed(two, tmp_path):
    _, _, a, b = two
    for how in ("ties", "dare_linear", "dare_ties"):
        runs = []
        for i, seed in enumerate((0, 0, 1)):
            out = tmp_path / f"{how}{i}"
            merge_deltas([a, b], [0.7, 0.3], how, str(out), rank=4, density=0.5, seed=seed, head_from=a)
            runs.append(read_tensors(out))
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
        differs = any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
        assert differs == how.startswith("dare")  # the seed only draws DARE's drop


def test_ties_keeps_the_largest_entries_and_averages_those_of_the_elected_sign():
    d1 = torch.tensor([[3.0, -0.1], [1.0, -2.0]])
    d2 = torch.tensor([[-1.0, 0.2], [2.0, 4.0]])
    merged = ties_combine([d1, d2], [1.0, 1.0], density=0.5, generator=None)
    # kept: d1 {3, -2}, d2 {2, 4}; signs elected by the sums (3, 0, 2, 2) -> (+, +, +, +)
    assert torch.equal(merged, torch.tensor([[3.0, 0.0], [2.0, 4.0]]))


def test_lora_family_sources_merge_and_lokr_goes_through_the_svd(tiny_dir, tmp_path):
    model = tiny_dir("bert")
    for method, options in (("loha", {"r": 2}), ("lokr", {"r": 2}), ("vera", {"r": 8})):
        x = make_delta(tmp_path / f"{method}1", model, method, options, seed=1)
        y = make_delta(tmp_path / f"{method}2", model, method, options, seed=2)
        merge_deltas([x, y], [1.0, 0.0], "linear", str(tmp_path / f"{method}m"), rank=32, head_from=x)
        assert read_meta(tmp_path / f"{method}m")["method"] == "lora"
        torch.testing.assert_close(logits(tmp_path / f"{method}m"), logits(x), atol=1e-4, rtol=1e-4)


def test_refusals_are_one_line(two, tiny_dir, tmp_path, capsys):
    model, root, a, b = two
    with pytest.raises(UserError, match="task heads differ"):
        merge_deltas([a, b], [0.5, 0.5], "linear", str(tmp_path / "m"))
    other = make_delta(tmp_path / "other", tiny_dir("bert", seed=1))
    with pytest.raises(UserError, match="different backbone"):
        merge_deltas([a, other], [0.5, 0.5], "linear", str(tmp_path / "m"), head_from=a)
    loha = make_delta(tmp_path / "loha", model, "loha", {"r": 2})
    with pytest.raises(UserError, match="one kind"):
        merge_deltas([a, loha], [0.5, 0.5], "linear", str(tmp_path / "m"), head_from=a)
    dora = make_delta(tmp_path / "dora", model, "dora", {"r": 2})
    with pytest.raises(UserError, match="dora delta cannot be merged"):
        merge_deltas([dora, a], [0.5, 0.5], "linear", str(tmp_path / "m"))
    with pytest.raises(UserError, match="not one of the deltas"):
        merge_deltas([a, b], [0.5, 0.5], "linear", str(tmp_path / "m"), head_from=other)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", a, b, "--weights", "1,2,3", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "3 numbers for 2 deltas" in err
    assert not (tmp_path / "m").exists()


def test_the_command_writes_a_delta_eval_loads(two, tmp_path, capsys):
    _, _, a, b = two
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", a, b, "--how", "ties", "--rank", "4", "--head-from", b, "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 0 and "wrote" in capsys.readouterr().out
    assert read_meta(tmp_path / "m")["merged_from"]["how"] == "ties"
    assert logits(tmp_path / "m").shape == (len(TEXTS), 2)
