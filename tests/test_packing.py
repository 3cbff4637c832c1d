"""--packing: a packed row gives each example the logits and loss it has alone (block-diagonal mask, own positions)."""

import pytest
import torch

from deltatune.backbone import load_task_model
from deltatune.batching import collate
from deltatune.config import TrainConfig
from deltatune.data import Example, TaskData
from deltatune.errors import UserError
from deltatune.fast import prepare, restore, training_forward
from deltatune.generation import encode_lm
from deltatune.packing import pack_rows, packed_batch_size
from deltatune.workflow import TrainJob, run_train_job

PAIRS = [("hello how are you", "very good"), ("hi", "hello there you"), ("what is the movie about", "a film"),
         ("who is the actor", "the director of the film"), ("is it good", "yes"), ("are you dull", "no it is not")]

pytestmark = pytest.mark.usefixtures("one_thread")


def rows_of(tok, train_on_prompt=False):
    return encode_lm(tok, [Example(text=p, target=t) for p, t in PAIRS], 32, train_on_prompt=train_on_prompt)


def test_best_fit_packing_keeps_every_example_once():
    from deltatune.batching import Encoded

    rows = [Encoded(key=str(i), input_ids=[i] * n, token_type_ids=None, label=None, token_labels=[i] * n)
            for i, n in enumerate([7, 5, 4, 3, 3, 2, 1])]
    packed = pack_rows(rows, 8)
    assert all(len(p.input_ids) <= 8 for p in packed) and len(packed) == 4  # 25 tokens in 4 rows of 8
    assert sorted(t for p in packed for t in p.input_ids) == sorted(t for r in rows for t in r.input_ids)
    for p in packed:  # positions restart at each example; its last position predicts nothing
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.token_labels[s - 1] == -100 for s in starts[1:]) and p.token_labels[-1] == -100
    assert packed_batch_size(rows, packed, 7) == 4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["explicit", "model"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_logits_and_loss_equal_unpacked(tiny_dir, kind, attention, train_on_prompt):
    tm = load_task_model(tiny_dir(kind), 0, pooling="lm")
    tm.module.requires_grad_(True)  # full fine-tuning: the gradients of every weight compared
    prepare(tm, "fp32", attention, "auto")
    rows = rows_of(tm.tokenizer, train_on_prompt)
    packed = pack_rows(rows, 40)
    assert 1 < len(packed) < len(rows)
    tm.module.eval()
    with torch.no_grad():
        logits = tm.module(**{k: v for k, v in collate(packed, 0).items() if k != "keys"}).logits  # (P, T, V)
        for p, row in enumerate(packed):
            starts = [i for i, pos in enumerate(row.position_ids) if pos == 0] + [len(row.input_ids)]
            for s, e in zip(starts, starts[1:]):
                alone = tm.module(input_ids=torch.tensor([row.input_ids[s:e]])).logits[0]  # (T_i, V)
                torch.testing.assert_close(logits[p, s:e], alone, atol=1e-5, rtol=1e-5)
    forward = training_forward(tm)  # the chunked LM loss of training, honouring shift_labels
    tm.module.train()
    unpacked = forward(collate(rows, 0))
    unpacked.loss.backward()
    grads = [p.grad.clone() for p in tm.module.parameters() if p.grad is not None]
    tm.module.zero_grad()
    loss = forward(collate(packed, 0)).loss
    loss.backward()
    torch.testing.assert_close(loss, unpacked.loss, atol=1e-5, rtol=1e-5)
    for before, p in zip(grads, [p for p in tm.module.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, before, atol=1e-5, rtol=1e-4)
    restore(tm)


def toy_task(copies=4):
    examples = [Example(text=p, target=t) for p, t in PAIRS]
    return TaskData(name="toy", kind="generation", label_names=[], train=examples * copies, validation=examples,
                    test=examples)


def test_training_with_packing_lowers_the_loss(tiny_dir, tmp_path, capsys):
    config = TrainConfig(epochs=3, batch_size=8, lr=2e-2, max_length=32, progress=False, packing=True)
    metrics = run_train_job(TrainJob(method="lora", task=toy_task(), model=tiny_dir("llama"), train=config),
                            tmp_path / "d")
    assert "packing: 24 examples in" in capsys.readouterr().err
    assert metrics["loss"] < 4.0  # ln(99) = 4.6 at the start


@pytest.mark.parametrize("method,kind,task,message", [
    ("prompt", "llama", "generation", "its soft tokens would sit once at the start of a packed row"),
    ("prefix", "llama", "generation", "its prefix would sit once"),
    ("lora", "t5", "generation", "applies to decoder models"),
    ("lora", "llama", "classification", "applies to generation tasks"),
])
def test_packing_refusals(tiny_dir, tmp_path, method, kind, task, message):
    data = toy_task(1)
    if task == "classification":
        data = TaskData(name="c", kind="classification", label_names=["a", "b"],
                        train=[Example(text=p, label=i % 2) for i, (p, _) in enumerate(PAIRS)],
                        validation=[Example(text="hi", label=0)], test=[Example(text="hi", label=1)])
    config = TrainConfig(epochs=1, batch_size=8, max_length=32, progress=False, packing=True)
    with pytest.raises(UserError, match=message):
        run_train_job(TrainJob(method=method, task=data, model=tiny_dir(kind), train=config), tmp_path / "d")
