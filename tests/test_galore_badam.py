"""GaLore and BAdam: full-parameter methods whose optimizer keeps little state; they learn and reload."""

import pytest
import tiny
import torch

from deltatune.backbone import load_task_model
from deltatune.methods import resolve_method
from deltatune.train import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def batch():
    ids = torch.randint(7, tiny.VOCAB_SIZE, (8, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}


def train(tm, method, config, steps, lr=1e-2):
    groups = method.param_groups(tm, config, lr, 0.0)
    opt = method.make_optimizer(tm, config, groups, lr, "adamw") if method.make_optimizer else \
        build_optimizer(tm.module, lr, 0.0, groups)
    tm.module.train()
    losses = []
    for _ in range(steps):
        loss = tm.module(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tm.module.eval()
    return losses


@pytest.mark.parametrize("name,options", [("galore", {"rank": 4, "update_proj_gap": 5, "scale": 1.0}),
                                          ("badam", {"switch_every": 3})])
def test_reduces_the_loss_and_the_full_weight_delta_reloads(tiny_dir, tmp_path, name, options):
    from deltatune.delta import save_delta
    from deltatune.loading import load_delta

    torch.manual_seed(0)
    tm = load_task_model(tiny_dir("bert"), 2)
    before = {n: p.detach().clone() for n, p in tm.module.named_parameters()}
    method, config = resolve_method(name, options)
    method.apply(tm, config)
    losses = train(tm, method, config, 12)
    assert losses[-1] < losses[0] - 0.1, losses
    changed = {n for n, p in tm.module.named_parameters() if not torch.equal(p, before[n])}
    assert any(".layer.0." in n for n in changed) and any(".layer.1." in n for n in changed)  # both blocks
    assert not any("embeddings" in n for n in changed)
    save_delta(tmp_path / "d", tm, method, config, {})
    with torch.no_grad():
        want = tm.module(**batch()).logits
        got = load_delta(tmp_path / "d").task_model.module(**batch()).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_badam_keeps_state_and_gradients_for_one_block_at_a_time(tiny_dir):
    tm = load_task_model(tiny_dir("bert"), 2)
    method, config = resolve_method("badam", {"switch_every": 2, "order": "ascending"})
    method.apply(tm, config)
    opt = method.make_optimizer(tm, config, method.param_groups(tm, config, 1e-3, 0.0), 1e-3, "adamw")
    blocks = method.module.blocks(tm)
    for step in range(4):
        tm.module(**batch()).loss.backward()
        active = [i for i, b in enumerate(blocks) if any(p.grad is not None for p in b)]
        assert active == [step // 2]
        opt.step()
        opt.zero_grad(set_to_none=True)
        with_state = {i for i, b in enumerate(blocks) if any(p in opt.state for p in b)}
        assert with_state <= {opt.active}
