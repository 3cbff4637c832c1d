"""Intrinsic dimension: Fastfood against a dense reference, orthogonality, d = D recovers full training,
the `intrinsic` method (identity at init, what trains, save -> load, SAID, tied weights), d90 and its table."""

import pytest
import torch
from torch import nn

from deltatune.backbone import ARCHITECTURES, TaskModel, load_task_model
from deltatune.delta import read_meta, read_tensors, save_delta
from deltatune.errors import UserError
from deltatune.intrinsic import said
from deltatune.intrinsic.projection import (
    DenseProjection,
    FastfoodProjection,
    hadamard_matrix,
    make_projection,
)
from deltatune.intrinsic.run import find_d90, markdown, plot
from deltatune.loading import load_delta
from deltatune.methods import resolve_method
from deltatune.methods.base import count_parameters


@pytest.mark.parametrize(("full_dim", "dim"), [(1000, 7), (300, 20), (1030, 33)])
def test_fastfood_matches_its_dense_reference(full_dim, dim):
    projection = FastfoodProjection(full_dim, dim, seed=3)
    reference = projection.dense_reference()  # explicit H, Π, G_c, B_c matrices
    x, g = torch.randn(dim), torch.randn(full_dim)
    assert torch.allclose(projection.matvec(x), reference @ x, atol=1e-5)
    assert torch.allclose(projection.rmatvec(g), reference.T @ g, atol=1e-4)
    x.requires_grad_(True)
    (projection(x) * g).sum().backward()  # the autograd Function's backward is Pᵀ g
    assert torch.allclose(x.grad, reference.T @ g, atol=1e-4)
    assert torch.allclose(projection.matrix(), reference, atol=1e-5)


def test_hadamard_is_orthogonal_up_to_scale():
    h = hadamard_matrix(32)
    assert torch.equal(h @ h.T, 32 * torch.eye(32))


def test_fastfood_is_orthogonal_ish():
    gram = FastfoodProjection(8192, 16, seed=0).matrix()
    gram = gram.T @ gram  # PᵀP ≈ I
    assert torch.allclose(torch.diag(gram), torch.ones(16), atol=0.05)
    assert (gram - torch.diag(torch.diag(gram))).abs().max() < 0.1


def test_projections_are_regenerated_from_the_seed():
    for cls in (DenseProjection, FastfoodProjection):
        a, b, c = cls(500, 9, seed=1).matrix(), cls(500, 9, seed=1).matrix(), cls(500, 9, seed=2).matrix()
        assert torch.equal(a, b) and not torch.allclose(a, c)
    dense = DenseProjection(500, 9, seed=1).matrix()
    assert torch.allclose(dense.norm(dim=0), torch.ones(9), atol=1e-5)
    assert isinstance(make_projection("auto", 100, 10, 0), DenseProjection)
    assert isinstance(make_projection("auto", 10**7, 10, 0), FastfoodProjection)


def toy_model(module: nn.Module) -> TaskModel:
    """A TaskModel around any module: every parameter is backbone, none is head."""
    return TaskModel(module=module, tokenizer=None, arch=ARCHITECTURES["bert"], model_path="", pooling="hf",
                     num_labels=1, fingerprint="")


def least_squares_loss(kind: str | None, dim: int | None) -> float:
    """Fit y = W x + b (D = 15) by L-BFGS, fully (kind None) or in a d-dimensional subspace."""
    torch.manual_seed(0)
    x, w_true = torch.randn(200, 4), torch.randn(3, 4)
    y = x @ w_true.T + 0.3 + 0.1 * torch.randn(200, 3)
    linear = nn.Linear(4, 3)
    task_model = toy_model(linear)
    if kind is not None:
        said.apply(task_model, said.Config(dim=dim, projection=kind, seed=0))
    else:
        linear.requires_grad_(True)
    params = [p for p in linear.parameters() if p.requires_grad]  # θ_d (in `linear.intrinsic`), or W and b
    optimizer = torch.optim.LBFGS(params, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = ((linear(x) - y) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((linear(x) - y) ** 2).mean().item()


def test_d_equal_to_D_recovers_full_training_on_a_toy_problem():
    full = least_squares_loss(None, None)
    for kind in ("dense", "fastfood"):
        assert least_squares_loss(kind, 15) == pytest.approx(full, abs=1e-4)  # the subspace is everything
        assert least_squares_loss(kind, 3) > full + 0.05  # a 3-dimensional subspace cannot reach it


def tiny(tiny_dir, kind="bert", pooling="hf"):
    return load_task_model(tiny_dir(kind), num_labels=3, pooling=pooling)


def batch(task_model):
    return dict(task_model.tokenizer(["good movie", "the plot was awful and dull"], padding=True,
                                     return_tensors="pt"))


def test_intrinsic_is_the_identity_at_init_and_trains_only_the_vector_and_head(tiny_dir):
    tm = tiny(tiny_dir)
    inputs = batch(tm)
    tm.module.eval()
    with torch.no_grad():
        reference = tm.module(**inputs).logits
    backbone_params = count_parameters(tm.backbone)[1]
    said.apply(tm, said.Config(dim=40))
    with torch.no_grad():
        assert torch.equal(tm.module(**inputs).logits, reference)
    trainable = {n for n, p in tm.module.named_parameters() if p.requires_grad}
    assert trainable == {"intrinsic.vector", *tm.head_names}
    assert said.full_dim(tm) == backbone_params  # D: every backbone weight moves
    tm.module.train()
    loss = tm.module(**inputs, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert said.subspace_of(tm).vector.grad.abs().sum() > 0


def test_intrinsic_delta_is_the_vector_and_the_seed(tiny_dir, tmp_path):
    tm = tiny(tiny_dir)
    method, config = resolve_method("said", {"dim": 200, "seed": 5})
    method.apply(tm, config)
    with torch.no_grad():
        said.subspace_of(tm).vector.normal_(0, 0.5)
        said.subspace_of(tm).scales.uniform_(0.5, 2)
    inputs = batch(tm)
    tm.module.eval()
    with torch.no_grad():
        expected = tm.module(**inputs).logits
    save_delta(tmp_path / "d", tm, method, config, {"task": {"name": "toy", "label_names": ["a", "b", "c"]}})
    meta, tensors = read_meta(tmp_path / "d"), read_tensors(tmp_path / "d")
    assert meta["method"] == "intrinsic" and meta["method_config"]["seed"] == 5 and meta["method_config"]["said"]
    scales = tensors["intrinsic.scales"].numel()
    assert tensors["intrinsic.vector"].numel() + scales == 200  # SAID: d numbers in all
    assert set(tensors) == {"intrinsic.vector", "intrinsic.scales", *tm.head_names}
    loaded = load_delta(tmp_path / "d")
    loaded.task_model.module.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.task_model.module(**inputs).logits, expected, atol=1e-5)


def test_said_needs_more_dimensions_than_tensors(tiny_dir):
    with pytest.raises(UserError, match="SAID needs dim"):
        said.apply(tiny(tiny_dir), said.Config(dim=5, said=True))


def test_tied_weights_stay_tied_and_exclude_keeps_weights_frozen(tiny_dir):
    tm = tiny(tiny_dir, "gpt2", pooling="lm")
    said.apply(tm, said.Config(dim=30, exclude=("wpe.weight",)))
    wpe = tm.backbone.wpe.weight.detach().clone()
    with torch.no_grad():
        said.subspace_of(tm).vector.normal_()
    assert torch.equal(tm.module.lm_head.weight, tm.backbone.wte.weight)  # both see θ0 + Pθ_d
    assert torch.equal(tm.backbone.wpe.weight, wpe)


def test_d90_table_and_plot(tmp_path):
    rows = [{"dim": 0, "accuracy": 0.6}, {"dim": 10, "accuracy": 0.62}, {"dim": 100, "accuracy": 0.73},
            {"dim": 1000, "accuracy": 0.79}]
    full = {"accuracy": 0.8}
    assert find_d90(rows[1:], full["accuracy"]) == 100  # 0.73 >= 0.9 · 0.8
    assert find_d90(rows[1:2], full["accuracy"]) is None
    table = markdown(rows, full, 100, [{"label": "full fine-tuning", "seconds_per_step": 1.0, "measured_mb": 300}])
    assert "d90 = 100" in table and "0 (head only)" in table and "full fine-tuning" in table
    plot(rows, 0.8, 100, tmp_path / "p.png", "toy")
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.slow
def test_intrinsic_command_end_to_end(tiny_dir, toy_csv, tmp_path):
    from deltatune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["intrinsic", "--model", tiny_dir("bert"), "--data", str(toy_csv), "--dims", "8,64", "--epochs", "1",
              "--out", str(tmp_path / "i"), "--cost-steps", "1", "--threads", "1", "--no-progress"])
    assert exit_info.value.code == 0
    assert (tmp_path / "i" / "accuracy_vs_d.png").exists() and "d90" in (tmp_path / "i" / "intrinsic.md").read_text()
